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
every tensor of our w8a8d qwen2_moe artifact at tp 1 and 2; a copy missing one expert's weight_scale fails
(MISSING). (w4a8d experts on qwen2_moe are refused before any work: MindIE's Qwen MoE layer takes no W4A8_DYNAMIC
experts either, engines.py "W4A8_DYNAMIC MoE".)

C8 (`kv8`) on Qwen3-MoE: vLLM-Ascend 0.23.0 does not load the scales (patch/worker/patch_gqa_c8.py re-binds the
C8 routing for Qwen3ForCausalLM, not Qwen3MoeForCausalLM, and vLLM 0.23.0's Qwen3MoeModel.load_weights skips
`{k,v}_proj.kv_cache_*` silently: `name not in params_dict: continue`, leaving kv_c8.py's initial scale 1 / offset
0), as engines.py says (C8 "since 0.26.0rc1"). The tool reports that as FAIL (IGNORED / MISSING lines), not as its
C8 engine limit (exit 3): its limit rule (va_harness.ENGINE_LIMIT_ERRORS) matches only a load_weights that
raises. With the same routing bound to Qwen3MoeForCausalLM every tensor loads.
"""
import json

import pytest

from qcompiler import cli
from qcompiler.backends.ascend.engines import VLLM_ASCEND, expected_loader_exit, features_of_artifact, refusals
from tests.e2e.helpers import NEEDS_SHARED, loader_with_qwen2_moe_mapping, loader_with_qwen3_moe_c8_routing
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


QWEN2_CASES = {"w8a8d": "w8a8d"}


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
    shutil.copytree(qwen2_moe_artifacts["w8a8d"], broken)
    weights = broken / "quant_model_weights.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight_scale"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    rc, text = loader_with_qwen2_moe_mapping(broken, "0.23.0")
    assert rc == 1 and "MISSING" in text and "w13_weight_scale" in text, text[-3000:]


@pytest.fixture(scope="module")
def qwen3_moe_kv8(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3-moe-kv8")
    model = make_tiny_model(root / "qwen3_moe", "qwen3_moe")
    out = root / "w8a8d-kv8"
    assert cli.main([str(model), "--passes", "w8a8d,kv8", "--calib", str(write_calib_file(root / "calib.jsonl")),
                     "--calib-samples", "4", "--seq-len", "32", "-o", str(out)]) == 0
    return out


def test_c8_on_qwen3_moe_loads_only_with_the_c8_routing(qwen3_moe_kv8, loader_check):
    features = features_of_artifact(qwen3_moe_kv8)
    assert features.model_type == "qwen3_moe" and features.kv_cache
    assert refusals(VLLM_ASCEND, features) == []                          # 0.26.0rc1 routes the scales
    assert any(r.startswith("C8 on qwen3_moe") for r in refusals(VLLM_ASCEND, features, "0.23.0"))
    rc, text = loader_check(qwen3_moe_kv8, "0.23.0")
    problems = [line for line in text.splitlines() if line.startswith(("IGNORED", "MISSING", "SHAPE", "EXTRA",
                                                                       "DTYPE", "REJECTED", "CONSTRUCT"))]
    assert rc == 1 and len(problems) == 8, text[-3000:]  # the tool's rule misses the silent skip (docstring)
    assert all(line.startswith("IGNORED") and ".kv_cache_" in line or line.startswith("MISSING") and
               ".attn." in line and "_cache_" in line for line in problems), text[-3000:]
    rc, text = loader_with_qwen3_moe_c8_routing(qwen3_moe_kv8, "0.23.0")
    assert rc == 0 and "vllm-ascend load: OK" in text, text[-3000:]
    assert checker_report(qwen3_moe_kv8)["errors"] == 0
