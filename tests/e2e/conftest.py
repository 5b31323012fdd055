"""Real-model fixtures shared by the e2e tests: SmolLM2-135M (built by ../shared/models/get_models.py), compiled
lazily and once per session per (arch, dtype, passes, target, extra args), so the conformance checker, the
vLLM-Ascend loader check and the perplexity tests read the same artifacts. Skipped when ../shared is absent."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qcompiler.cli import main
from tests.conftest import SHARED

CALIB = SHARED / "data" / "calib" / "wiki_calib.jsonl"
EVAL = SHARED / "data" / "calib" / "wiki_eval.jsonl"
CHECKER = SHARED / "tools" / "check_ascend_artifact.py"
LOADER = SHARED / "tools" / "loader_check" / "vllm_ascend_load.py"


#: every e2e module: pytestmark = NEEDS_SHARED
NEEDS_SHARED = pytest.mark.skipif(not (SHARED / "models" / "get_models.py").is_file(), reason="needs ../shared")


@pytest.fixture(scope="session")
def smollm2():
    dest = os.environ.get("QC_MODELS", str(Path.home() / ".cache" / "qc-models"))
    out = subprocess.run([sys.executable, str(SHARED / "models" / "get_models.py"), "--dest", dest],
                         check=True, capture_output=True, text=True).stdout.split()
    return {"llama": Path(out[0]), "qwen2": Path(out[1])}


@pytest.fixture(scope="session")
def compiled(smollm2, tmp_path_factory):
    """compiled(arch, dtype="bfloat16", *extra, passes="w8a8", target="ascend910b", calib=(8, 256)) -> OUT.

    Compiles once per distinct request. Perplexity tests need real calibration (8 x 256 tokens of wiki_calib);
    artifacts only loaded and checked use 4 x 64 (calib=(4, 64)): dynamic and weight-only schemes do not read
    calibration statistics at all, static ones only need valid ranges."""
    cache = {}
    root = tmp_path_factory.mktemp("e2e")

    def get(arch, dtype="bfloat16", *extra, passes="w8a8", target="ascend910b", calib=(8, 256)):
        key = (arch, dtype, passes, target, calib, extra)
        if key not in cache:
            out = root / f"{arch}-{dtype}-{len(cache)}"
            args = [str(smollm2[arch]), "--passes", passes, "--target", target, "--calib", str(CALIB),
                    "--calib-samples", str(calib[0]), "--seq-len", str(calib[1]), "--dtype", dtype, "-o", str(out),
                    *extra]
            assert main(args) == 0
            cache[key] = out
        return cache[key]
    return get


def run_checker(out: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, str(CHECKER), str(out)], capture_output=True, text=True)
    return r.returncode, r.stdout


@pytest.fixture(scope="session")
def loader_check():
    """run(out, engine="0.23.0") -> (exit code, output) of vLLM-Ascend's own loader on `out` (CPU, torch_npu
    stubbed; ../shared/tools/loader_check). The tool needs PyPI once to fill its cache: when it cannot set itself
    up (exit 2, e.g. no network on a CI machine), every loader test is skipped, not failed."""
    if not LOADER.is_file():
        pytest.skip(f"{LOADER} absent")
    ready = set()

    def run(out: Path, engine: str = "0.23.0"):
        if engine not in ready:
            r = subprocess.run([sys.executable, str(LOADER), "--setup-only", "--engine", engine, str(out)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"vLLM-Ascend loader check {engine} unavailable: {(r.stdout + r.stderr)[-500:]}")
            ready.add(engine)
        r = subprocess.run([sys.executable, str(LOADER), "--engine", engine, str(out)], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        return r.returncode, r.stdout + r.stderr
    return run
