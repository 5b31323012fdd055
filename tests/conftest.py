"""Shared fixtures: tiny random HF checkpoints (Llama / Qwen2 / Qwen3; Qwen3-MoE / Qwen2-MoE), a calibration file,
the real SmolLM2; and how the suite runs on pytest-xdist (pyproject's addopts: `-n auto --dist loadgroup`).

The builders live in tests/helpers.py (import helpers from there, never from test modules).

pytest-xdist: the CPUs are shared out between the workers (torch threads per worker = CPUs // workers, set
before torch is imported and passed to the CLI subprocesses through OMP_NUM_THREADS / QC_THREADS: N workers
each running torch's default of all CPUs would oversubscribe them, and OpenMP threads spin while they wait).
Every test file is one xdist group (its module fixtures are built once), unless the test names its own group
(the e2e tests of one compiled artifact); groups listed in LONG_FIRST start first, so the long ones do not
start last and leave one worker running alone. `-n 0` runs the suite in one process as before.
"""
import os

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    os.environ.setdefault("OMP_NUM_THREADS", _THREADS)
    os.environ.setdefault("QC_THREADS", _THREADS)

import pytest  # noqa: E402
import torch  # noqa: E402

import qcompiler.backends.ascend  # noqa: E402,F401  the target the tests run: the qc ops' kernels, the "lower" pass
from tests.helpers import SHARED, make_tiny_model, smollm2_checkpoints, write_calib_file  # noqa: E402

os.environ.setdefault("QC_NO_PROGRESS", "1")
if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["QC_THREADS"]))  # in case a plugin imported torch before this file

#: most workers `-n auto` starts: the long e2e groups bound the run's length, more workers only add start-up
MAX_WORKERS = 8

#: xdist groups that take minutes (`--durations`, CI's 2-core host), longest first; every other group follows in
#: collection order. xdist hands groups out in that order (`--no-loadscope-reorder`), so this is longest-first
#: scheduling of the long ones.
LONG_FIRST = (
    "e2e-artifact-w8a8",
    "tests/test_distributed.py",
    "e2e-artifact-qwen2",
    "tests/test_resume.py",
    "e2e-artifact-w8a8s",
)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per CPU this process may run on (not xdist's physical-core count), at most
    MAX_WORKERS."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the xdist_group marks into node ids
def pytest_collection_modifyitems(config, items):
    """Every test without an xdist_group mark joins its file's group; LONG_FIRST's groups move to the front."""
    def group(item):
        mark = item.get_closest_marker("xdist_group")
        if mark is None:
            name = item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(name))
            return name
        return mark.args[0] if mark.args else mark.kwargs.get("name", "default")

    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    order = {id(item): rank.get(group(item), len(rank)) for item in items}
    items.sort(key=lambda item: order[id(item)])  # stable: collection order within and after LONG_FIRST


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'llama': dir, 'qwen2': dir, 'qwen3': dir} of tiny bf16 checkpoints (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory):
    """{'qwen3_moe': dir, 'qwen2_moe': dir} of tiny bf16 mixture-of-experts checkpoints (4 experts, top-2)."""
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("qwen3_moe", "qwen2_moe")}


@pytest.fixture(params=["float32", "native", "onednn"])
def int8_gemm(request, monkeypatch):
    """Runs the test with each way of computing int8 products (qnumerics.int8_gemm_native: exact float32 GEMMs,
    or `torch._int_mm`; backends/ascend/onednn_linear.applies: full-sequence layers on oneDNN's int8 linear with
    packed weights), whatever this host would pick, so every path is held to the reference bits everywhere
    ("onednn" skips where oneDNN's product is missing or inexact, as on CPUs without int8 dot products).
    Layers prepare their layouts when they are first loaded, so load models inside the test."""
    from qcompiler.backends.ascend import onednn_linear
    from qcompiler.ir import qnumerics
    if request.param == "onednn" and not onednn_linear._is_exact():
        pytest.skip("no exact oneDNN int8 linear on this CPU (onednn_linear._is_exact)")
    monkeypatch.setattr(qnumerics, "_INT8_NATIVE", [request.param != "float32"])
    monkeypatch.setattr(onednn_linear, "_DECIDED", [request.param == "onednn"])
    return request.param


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    return write_calib_file(tmp_path_factory.mktemp("calib") / "calib.jsonl")


@pytest.fixture
def model_copy(tiny_models, tmp_path):
    """A private copy of the tiny llama checkpoint that a test may corrupt."""
    import shutil
    return shutil.copytree(tiny_models["llama"], tmp_path / "model")


@pytest.fixture(scope="session")
def smollm2():
    """{'llama': dir, 'qwen2': dir}: the real SmolLM2-135M (tests.helpers.smollm2_checkpoints); skips when
    ../shared is absent."""
    if not (SHARED / "models" / "get_models.py").is_file():
        pytest.skip(f"needs ../shared ({SHARED / 'models' / 'get_models.py'} absent)")
    return smollm2_checkpoints()
