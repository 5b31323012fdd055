"""Tiny Qwen3-MoE artifacts as vLLM-Ascend's own loader loads them (../shared/tools/loader_check: its ModelSlim
config, AscendW8A8DynamicFusedMoEMethod / AscendW4A8DynamicFusedMoEMethod get_weight / get_dynamic_quant_param,
vLLM's FusedMoE weight_loader and Qwen3MoeModel.load_weights with the expert-params mapping; tp 1 and 2): w8a8d
everywhere, w4a8d experts with w8a8d attention, and w4a16 experts (AscendW4A16FusedMoEMethod's weight_packed
layout) with w8a8d attention; a w4a16 copy missing one expert's weight_packed must fail (MISSING). Both must load (exit 0), as the engine matrix says
(`expected_loader_exit`). Skipped only when the tool cannot set itself up (exit 2). The conformance checker must
accept the w8a8d artifact; for w4a8d experts it reads n from the packed weight of a model type it has no structure
for (qwen3_moe / qwen2_moe), so exactly those shape errors are expected (tests/helpers.py
`assert_checker_clean_on_moe`: the checker is wrong there, the loader below accepts the same tensors).

Qwen2-MoE: vLLM-Ascend 0.23.0 cannot build quantized qwen2_moe experts (no qwen2_moe entry in
quantization/modelslim_config.py `packed_modules_model_mapping`: KeyError `<layer>.mlp.experts.weight`, an engine
limit, engines.py "MoE experts on qwen2_moe"; the tool exits 2 for the model type). With that one entry given
(tests/e2e/helpers.py `loader_with_qwen2_moe_mapping`: the qwen3_moe entry's `experts` rule), the engine's own MoE
loading (fused-MoE schemes, FusedMoE.weight_loader, Qwen2MoeModel.load_weights, the shared expert's Linears) takes
every tensor of our w8a8d and w4a8d-experts qwen2_moe artifacts at tp 1 and 2; a copy missing one expert's
weight_scale_second fails (MISSING).
"""
import json

import pytest

from qcompiler import cli
from qcompiler.backends.ascend.engines import expected_loader_exit, features_of_artifact
from tests.e2e.helpers import NEEDS_SHARED, loader_with_qwen2_moe_mapping
from tests.helpers import assert_checker_clean_on_moe, checker_report, make_tiny_model, write_calib_file

pytestmark = NEEDS_SHARED

CASES = {"w8a8d": "w8a8d", "w4a8d-experts": r"w4a8d:match=mlp\.experts,w8a8d",
         # group 32: at tp=2 each rank holds 128/2/32 = 2 groups of down_proj. With one group per rank (group 64)
         # the real loader narrows weight_scale [64, 2] to rank r's column correctly, but the tool's padding check
         # (va_harness._moe_shape_problem) takes a [E, H, 1] parameter for a per-channel one and reports SHAPE
         "w4a16-experts": r"w4a16:match=mlp\.experts:group=32,w8a8d"}


@pytest.fixture(scope="module")
def moe_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-e2e")
    model = make_tiny_model(root / "qwen3_moe", "qwen3_moe")
    calib = write_calib_file(root / "calib.jsonl")
    outs = {}
    for name, passes in CASES.items():
        outs[name] = root / name
        assert cli.main([str(model), "--passes", passes, "--calib", str(calib), "--calib-samples", "4",
                         "--seq-len", "32", "-o", str(outs[name])]) == 0
    return outs


@pytest.mark.parametrize("name", list(CASES))
def test_vllm_ascend_loads_tiny_qwen3_moe(moe_artifacts, loader_check, name):
    out = moe_artifacts[name]
    assert expected_loader_exit(features_of_artifact(out), "0.23.0") == 0
    rc, text = loader_check(out, "0.23.0")
    assert rc == 0, text[-3000:]
    assert "vllm-ascend load: OK" in text and "tp=1,2" in text


def test_checker_on_moe_artifacts(moe_artifacts):
    assert checker_report(moe_artifacts["w8a8d"])["errors"] == 0
    # W4A16 experts: no `.weight` tensor (weight_packed): only desc.no_tensor warnings for the described `.weight`
    assert checker_report(moe_artifacts["w4a16-experts"])["errors"] == 0
    assert_checker_clean_on_moe(moe_artifacts["w4a8d-experts"])
    desc = json.loads((moe_artifacts["w4a8d-experts"] / "quant_model_description.json").read_text())
    assert desc["model.layers.0.mlp.gate.weight"] == "FLOAT"


def test_vllm_ascend_rejects_w4a16_experts_missing_a_packed_weight(moe_artifacts, loader_check, tmp_path):
    """The loader check sees the W4A16 expert tensors: drop expert 2's up_proj.weight_packed and it fails."""
    import shutil
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(moe_artifacts["w4a16-experts"], broken)
    weights = broken / "quant_model_weights.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.0.mlp.experts.2.up_proj.weight_packed"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    rc, text = loader_check(broken, "0.23.0")
    assert rc == 1 and "MISSING" in text and "w13_weight_packed" in text, text[-3000:]


QWEN2_CASES = {"w8a8d": "w8a8d", "w4a8d-experts": r"w4a8d:match=mlp\.experts,w8a8d"}


@pytest.fixture(scope="module")
def qwen2_moe_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2-moe-e2e")
    model = make_tiny_model(root / "qwen2_moe", "qwen2_moe")
    calib = write_calib_file(root / "calib.jsonl")
    outs = {}
    for name, passes in QWEN2_CASES.items():
        outs[name] = root / name
        assert cli.main([str(model), "--passes", passes, "--calib", str(calib), "--calib-samples", "4",
                         "--seq-len", "32", "-o", str(outs[name])]) == 0
    return outs


@pytest.mark.parametrize("name", list(QWEN2_CASES))
def test_vllm_ascend_moe_loading_takes_tiny_qwen2_moe_given_the_experts_mapping(qwen2_moe_artifacts, loader_check,
                                                                                name):
    out = qwen2_moe_artifacts[name]
    assert expected_loader_exit(features_of_artifact(out), "0.23.0") == 3  # the release itself: engine limit
    rc, text = loader_check(out, "0.23.0")  # sets the tool up (or skips); the tool itself builds no qwen2_moe
    assert rc == 2 and "model_type 'qwen2_moe'" in text, text[-3000:]
    rc, text = loader_with_qwen2_moe_mapping(out, "0.23.0")
    assert rc == 0, text[-3000:]
    assert "vllm-ascend load: OK" in text and "tp=1,2" in text, text[-3000:]
    assert_checker_clean_on_moe(out)


def test_qwen2_moe_loading_rejects_a_missing_expert_scale(qwen2_moe_artifacts, loader_check, tmp_path):
    loader_check(qwen2_moe_artifacts["w8a8d"], "0.23.0")  # sets the tool up, or skips
    import shutil
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(qwen2_moe_artifacts["w4a8d-experts"], broken)
    weights = broken / "quant_model_weights.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight_scale_second"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    rc, text = loader_with_qwen2_moe_mapping(broken, "0.23.0")
    assert rc == 1 and "MISSING" in text and "w13_weight_scale_second" in text, text[-3000:]
