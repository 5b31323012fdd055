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


@pytest.fixture(scope="session")
def loader_check():
    """loader_runner() shared by the session: each engine's cache is set up (or found missing) once."""
    return loader_runner()
