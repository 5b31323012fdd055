"""Tiny Qwen3-MoE artifacts as vLLM-Ascend's own loader loads them (../shared/tools/loader_check: its ModelSlim
config, AscendW8A8DynamicFusedMoEMethod / AscendW4A8DynamicFusedMoEMethod get_weight / get_dynamic_quant_param,
vLLM's FusedMoE weight_loader and Qwen3MoeModel.load_weights with the expert-params mapping; tp 1 and 2): w8a8d
everywhere, w4a8d experts with w8a8d attention, and w4a16 experts (AscendW4A16FusedMoEMethod's weight_packed
layout) with w8a8d attention; a w4a16 copy missing one expert's weight_packed must fail (MISSING). Both must load (exit 0), as the engine matrix says
(`expected_loader_exit`). Skipped only when the tool cannot set itself up (exit 2). The conformance checker must
accept the w8a8d artifact; for w4a8d experts it infers n from the packed weight of a model type it has no
structure for (qwen3_moe), so only its shape rules on packed expert tensors are expected to complain.
"""
import json

import pytest

from qcompiler import cli
from qcompiler.backends.ascend.engines import expected_loader_exit, features_of_artifact
from tests.e2e.helpers import NEEDS_SHARED
from tests.helpers import checker_report, make_tiny_model, write_calib_file

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
    report = checker_report(moe_artifacts["w4a8d-experts"])
    others = [v for v in report["violations"] if v.get("severity") == "ERROR"
              and not (".mlp.experts." in (v.get("tensor") or "") and v.get("rule", "").endswith(".shape"))]
    assert others == [], others
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
