"""Real-model fixtures shared by the e2e tests: SmolLM2-135M (the `smollm2` fixture of tests/conftest.py), compiled
lazily and once per session per (arch, dtype, passes, target, extra args), so the conformance checker, the
vLLM-Ascend loader check and the perplexity tests read the same artifacts. Under pytest-xdist a session is one
worker: the tests of one artifact share an xdist_group (tests/e2e/helpers.artifact_group), so it is compiled once.
Skipped when ../shared is absent.
Shared non-fixture code: tests/e2e/helpers.py."""
import pytest

from qcompiler.cli import main
from tests.e2e.helpers import CALIB, first_layers, loader_runner


@pytest.fixture(scope="session")
def compiled(smollm2, tmp_path_factory):
    """compiled(arch, dtype="bfloat16", *extra, passes="w8a8", target="ascend910b", calib=(8, 256), layers=None)
    -> OUT.

    Compiles once per distinct request. Perplexity tests need real calibration (8 x 256 tokens of wiki_calib);
    artifacts only loaded and checked use 4 x 64 (calib=(4, 64)): dynamic and weight-only schemes do not read
    calibration statistics at all, static ones only need valid ranges. `layers=N`: SmolLM2 cut to its first N
    decoder layers (helpers.first_layers: real widths, tensors and tokenizer), for artifacts whose format is
    checked layer by layer (a 2-layer compile and load take about a third of the 30-layer ones' CPU time)."""
    cache = {}
    root = tmp_path_factory.mktemp("e2e")
    cut = {}

    def model(arch, layers):
        if layers is None:
            return smollm2[arch]
        if (arch, layers) not in cut:
            cut[arch, layers] = first_layers(smollm2[arch], layers, root / f"smollm2-{arch}-first{layers}")
        return cut[arch, layers]

    def get(arch, dtype="bfloat16", *extra, passes="w8a8", target="ascend910b", calib=(8, 256), layers=None):
        key = (arch, dtype, passes, target, calib, extra, layers)
        if key not in cache:
            out = root / f"{arch}-{dtype}-{len(cache)}"
            args = [str(model(arch, layers)), "--passes", passes, "--target", target, "--calib", str(CALIB),
                    "--calib-samples", str(calib[0]), "--seq-len", str(calib[1]), "--dtype", dtype, "-o", str(out),
                    *extra]
            assert main(args) == 0
            cache[key] = out
        return cache[key]
    return get


@pytest.fixture(scope="session")
def loader_check():
    """loader_runner() shared by the session: each engine's cache is set up (or found missing) once."""
    return loader_runner()
