"""Shared code of the e2e tests (real SmolLM2-135M): paths into ../shared, the skip mark, the conformance
checker and vLLM-Ascend's loader as subprocesses. Fixtures live in tests/e2e/conftest.py; test modules import
from here (tests/test_helpers_layout.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CHECKER, SHARED

CALIB = SHARED / "data" / "calib" / "wiki_calib.jsonl"
EVAL = SHARED / "data" / "calib" / "wiki_eval.jsonl"
LOADER = SHARED / "tools" / "loader_check" / "vllm_ascend_load.py"


#: every e2e module: pytestmark = NEEDS_SHARED
NEEDS_SHARED = pytest.mark.skipif(not (SHARED / "models" / "get_models.py").is_file(), reason="needs ../shared")


def run_checker(out: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, str(CHECKER), str(out)], capture_output=True, text=True)
    return r.returncode, r.stdout


def loader_runner(loader: Path = LOADER):
    """run(out, engine="0.23.0") -> (exit code, output) of vLLM-Ascend's own loader on `out` (CPU, torch_npu
    stubbed; ../shared/tools/loader_check).

    The tool needs PyPI once per engine to fill its cache (`--setup-only`). When that set-up exits 2 (the tool
    could not run: no network on a CI machine, README "Output and exit code"), the calling test is skipped, not
    failed. Any other set-up failure is a failure. Once set up, every exit code of the real run is returned to
    the test (an exit 2 there means bad usage or an unsupported model: the test's assertion reports it)."""
    if not loader.is_file():
        pytest.skip(f"{loader} absent")
    ready = set()

    def run(out: Path, engine: str = "0.23.0"):
        if engine not in ready:
            r = subprocess.run([sys.executable, str(loader), "--setup-only", "--engine", engine, str(out)],
                               capture_output=True, text=True)
            tail = (r.stdout + r.stderr)[-500:]
            if r.returncode == 2:
                pytest.skip(f"vLLM-Ascend loader check {engine} cannot set itself up (exit 2): {tail}")
            if r.returncode != 0:
                pytest.fail(f"vLLM-Ascend loader check {engine} --setup-only exited {r.returncode}: {tail}")
            ready.add(engine)
        r = subprocess.run([sys.executable, str(loader), "--engine", engine, str(out)], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        return r.returncode, r.stdout + r.stderr
    return run
