"""The artifacts as the real engines load them: vLLM-Ascend's own loader (../shared/tools/loader_check: its
ModelSlim config, schemes and vLLM's parallel Linear weight loaders on CPU, tp 1 and 3) on a SmolLM2 artifact of
every scheme, next to the conformance checker. Each must load (exit 0) or hit an engine limit the engine support
matrix lists (exit 3: backends/ascend/engines.py `expected_loader_exit`), and the checker must accept the same
artifact (0 errors): the two tools agree.

Every artifact the e2e tests make is here: the w8a8 ones test_smollm2.py evaluates and runs (the whole 30-layer
model, 8 x 256 calibration, shared through the `compiled` fixture), one more 30-layer artifact (Qwen2
architecture), and one per scheme and per float16 variant compiled from SmolLM2 cut to its first 2 layers with
4 x 64 calibration (`layers=CUT`: real widths, tensor names and dtypes, what the checker and the loader read per
layer, at about a third of the compile and load time). About 20-30 s of loader time per artifact (warm cache);
skipped, not failed, when the tool cannot fill its cache (no PyPI).
"""
import json

import pytest

from qcompiler.backends.ascend.engines import expected_loader_exit, features_of_artifact
from tests.e2e.helpers import NEEDS_SHARED, artifact_group, run_checker

pytestmark = NEEDS_SHARED

SMALL = (4, 64)
FULL = (8, 256)  # the calibration of test_smollm2.py's artifacts, so these entries reuse them
WHOLE = None     # every decoder layer of SmolLM2
CUT = 2          # SmolLM2's first 2 decoder layers
#: name: (arch, dtype, passes, target, calibration, layers, extra args, vLLM-Ascend releases to load it with)
ARTIFACTS = {
    # the artifacts test_smollm2.py evaluates and runs
    "w8a8": ("llama", "bfloat16", "w8a8", "ascend910b", FULL, WHOLE, (), ("0.23.0",)),  # helpers.SMOLLM2_W8A8
    "w8a8-down-float": ("llama", "bfloat16", "w8a8", "ascend910b", FULL, WHOLE, ("--exclude", r"mlp\.down_proj"),
                        ("0.23.0",)),
    # the whole Qwen2-architecture model (q/k/v biases)
    "qwen2": ("qwen2", "bfloat16", "w8a8", "ascend910b", SMALL, WHOLE, (), ("0.23.0",)),
    # float16 models
    "w8a8-fp16": ("llama", "float16", "w8a8", "ascend910b", SMALL, CUT, (), ("0.23.0",)),
    "qwen2-fp16": ("qwen2", "float16", "w8a8", "ascend910b", SMALL, CUT, (), ("0.23.0",)),
    # one per scheme
    "w8a8d": ("llama", "bfloat16", "w8a8d", "ascend910b", SMALL, CUT, (), ("0.23.0",)),
    "w8a16": ("llama", "bfloat16", "w8a16", "ascend910b", SMALL, CUT, (), ("0.23.0",)),
    # C8 on llama: 0.23.0 has no parameter for the scales (documented limit, 3), 0.26.0rc1 maps them (0)
    "w8a8d+kv8": ("llama", "bfloat16", "w8a8d,kv8", "ascend910b", SMALL, CUT, (), ("0.23.0", "0.26.0rc1")),
    "w8a8mix": ("llama", "bfloat16", "w8a8mix", "ascend910b", SMALL, CUT, (), ("0.23.0",)),
    "w4a16": ("llama", "bfloat16", "w4a16", "ascend910b", SMALL, CUT, (), ("0.23.0",)),
    # two-stage per-group (group 32): vLLM-Ascend loads it (its dense scheme is deprecated in 0.26.0rc1)
    "w4a8d": ("llama", "bfloat16", "w4a8d", "ascend910b", SMALL, CUT, (), ("0.23.0",)),
    "w8a8s": ("llama", "float16", "sparse:ratio=0.5,w8a8s", "ascend310p", SMALL, CUT, (), ("0.23.0",)),
    "fa3": ("llama", "bfloat16", "w8a8,fa3", "ascend910b", SMALL, CUT, (), ("0.23.0",)),
}
CASES = [pytest.param(name, engine, id=f"{name}-{engine}", marks=artifact_group(name))
         for name, spec in ARTIFACTS.items() for engine in spec[-1]]


def _artifact(compiled, name):
    arch, dtype, passes, target, calib, layers, extra, _ = ARTIFACTS[name]
    return compiled(arch, dtype, *extra, passes=passes, target=target, calib=calib, layers=layers)


@pytest.mark.parametrize("name,engine", CASES)
def test_vllm_ascend_loader_and_checker_agree(compiled, loader_check, name, engine):
    out = _artifact(compiled, name)
    if engine == ARTIFACTS[name][-1][0]:  # the checker and the file layout once per artifact
        rc_checker, report = run_checker(out)
        assert rc_checker == 0 and report.splitlines()[-1].startswith("0 errors"), report[-2000:]
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == ARTIFACTS[name][1]
        assert sorted(p.name for p in out.glob("*.safetensors")) == ["quant_model_weights.safetensors"]
    want = expected_loader_exit(features_of_artifact(out), engine)
    rc, text = loader_check(out, engine)
    assert rc == want, f"{name} with vLLM-Ascend {engine}: exit {rc}, the engine matrix expects {want}\n{text[-3000:]}"
    if rc == 3:  # only documented engine limits, no format problem
        assert "UNSUPPORTED BY ENGINE" in text and "FAIL" not in text, text[-3000:]


@artifact_group("w8a8s")
def test_w8a8s_artifact_has_exactly_the_310p_scheme_tensors(compiled):
    """vLLM-Ascend's 310P W8A8S scheme creates weight, input_scale, input_offset, quant_bias, deq_scale (and the
    Linear's bias) and aborts on anything else (_310p/quantization/methods/w8a8_base.py)."""
    from safetensors import safe_open
    out = _artifact(compiled, "w8a8s")
    with safe_open(str(out / "quant_model_weights.safetensors"), "pt") as f:
        suffixes = {k.rsplit(".", 1)[1] for k in f.keys() if ".layers.0.self_attn.q_proj." in k}
    assert suffixes == {"weight", "input_scale", "input_offset", "quant_bias", "deq_scale"}
    assert json.loads((out / "quant_model_description.json").read_text())["model_quant_type"] == "W8A8S"
