"""Tiny Qwen3-MoE artifacts as vLLM-Ascend's own loader loads them (../shared/tools/loader_check: its ModelSlim
config, AscendW8A8DynamicFusedMoEMethod / AscendW4A8DynamicFusedMoEMethod get_weight / get_dynamic_quant_param,
vLLM's FusedMoE weight_loader and Qwen3MoeModel.load_weights with the expert-params mapping; tp 1 and 2): w8a8d
everywhere, and w4a8d experts with w8a8d attention. Both must load (exit 0), as the engine matrix says
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

CASES = {"w8a8d": "w8a8d", "w4a8d-experts": r"w4a8d:match=mlp\.experts,w8a8d"}


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
    report = checker_report(moe_artifacts["w4a8d-experts"])
    others = [v for v in report["violations"] if v.get("severity") == "ERROR"
              and not (".mlp.experts." in (v.get("tensor") or "") and v.get("rule", "").endswith(".shape"))]
    assert others == [], others
    desc = json.loads((moe_artifacts["w4a8d-experts"] / "quant_model_description.json").read_text())
    assert desc["model.layers.0.mlp.gate.weight"] == "FLOAT"
