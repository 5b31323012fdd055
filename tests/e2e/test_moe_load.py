"""Tiny Qwen3-MoE artifacts as vLLM-Ascend's own loader loads them (../shared/tools/loader_check: its ModelSlim
config, AscendW8A8DynamicFusedMoEMethod / AscendW4A8DynamicFusedMoEMethod get_weight / get_dynamic_quant_param,
vLLM's FusedMoE weight_loader and Qwen3MoeModel.load_weights with the expert-params mapping; tp 1 and 2): w8a8d
everywhere, w4a8d experts with w8a8d attention, and w4a16 experts (AscendW4A16FusedMoEMethod's weight_packed
layout) with w8a8d attention; a w4a16 copy missing one expert's weight_packed must fail (MISSING). Both must load (exit 0), as the engine matrix says
(`expected_loader_exit`). What the tool cannot see: at tp 2 vLLM's loader writes no entry of the w4a8d experts'
w2_weight_scale (an engine limit, measured by NaN-filling the parameters: `loader_unfilled_expert_params`); and
with one group of down_proj per rank (moe_intermediate_size 64) its SHAPE lines on down_proj's second-stage scales
are its own misreading. One-click w4a16 on moe_intermediate_size 64 (group 64) builds at tp 1 only, as the
compile's warning says. Skipped only when the tool cannot set itself up (exit 2). The conformance checker must
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
import re

import pytest

from qcompiler import cli
from qcompiler.backends.ascend.engines import (VLLM_ASCEND, expected_loader_exit, features_of_artifact, notes,
                                               refusals, w4a16_moe_tp_sizes)
from tests.e2e.helpers import (NEEDS_SHARED, compile_tiny_cases, loader_unfilled_expert_params,
                               loader_with_qwen2_moe_mapping, loader_with_qwen3_moe_c8_routing)
from tests.helpers import (assert_checker_clean_on_moe, checker_report, edited_artifact, make_tiny_model,
                           write_calib_file)

pytestmark = NEEDS_SHARED

CASES = {"w8a8d": "w8a8d", "w4a8d-experts": r"w4a8d:match=mlp\.experts,w8a8d",
         # group 32: at tp=2 each rank holds 128/2/32 = 2 groups of down_proj. With one group per rank (group 64)
         # the real loader narrows weight_scale [64, 2] to rank r's column correctly, but the tool's padding check
         # (va_harness._moe_shape_problem) takes a [E, H, 1] parameter for a per-channel one and reports SHAPE
         "w4a16-experts": r"w4a16:match=mlp\.experts:group=32,w8a8d"}


@pytest.fixture(scope="module")
def moe_artifacts(tmp_path_factory):
    return compile_tiny_cases(tmp_path_factory.mktemp("moe-e2e"), "qwen3_moe", CASES)


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
    broken = edited_artifact(moe_artifacts["w4a16-experts"], tmp_path / "broken",
                             lambda t: t.pop("model.layers.0.mlp.experts.2.up_proj.weight_packed"))
    rc, text = loader_check(broken, "0.23.0")
    assert rc == 1 and "MISSING" in text and "w13_weight_packed" in text, text[-3000:]


def test_w4a8_experts_down_proj_first_stage_scale_loads_only_with_the_experts_unsplit(moe_artifacts, loader_check):
    """An engine limit the loader check cannot see (it checks where each tensor goes and its shape, not which entries
    get written; its "OK" above holds at tp 2): with every expert parameter NaN-filled before loading, vLLM's real
    FusedMoE.weight_loader fills all of them at tp 1, and at tp 2 leaves every entry of w2_weight_scale and
    w2_weight_offset ([E, H, 1]) unwritten and fills all others. vLLM-Ascend's AscendFusedMoEMethod.create_weights
    (quantization/method_adapters.py) marks weight_scale / weight_offset as GROUP scales when group_size > 0, so
    FusedMoE._load_w2 splits their one column over the ranks (1 // 2 = 0 each); process_scale then multiplies that
    torch.empty memory into every down_proj group scale. The artifact cannot help (the parameter is never written);
    the compile warns to serve with tp 1 or --enable-expert-parallel (engines.py "W4A8_DYNAMIC MoE")."""
    out = moe_artifacts["w4a8d-experts"]
    assert loader_check(out, "0.23.0")[0] == 0
    unfilled = loader_unfilled_expert_params(out, "1,2")
    assert {p for p, (n, _) in unfilled["1r0"].items() if n} == set(), unfilled["1r0"]
    for rank in ("2r0", "2r1"):
        assert {p: n for p, (n, total) in unfilled[rank].items() if n} == {
            p: unfilled[rank][p][1] for p in ("w2_weight_scale", "w2_weight_offset")}, unfilled[rank]
    assert any("W4A8_DYNAMIC MoE" in n and "--enable-expert-parallel" in n
               for n in notes(VLLM_ASCEND, features_of_artifact(out)))


@pytest.fixture(scope="module")
def moe64(tmp_path_factory):
    """user31's model shape, smallest: tiny Qwen3-MoE with moe_intermediate_size 64 (4 experts, hidden 64), compiled
    with w4a8d experts (group 32: 2 groups of down_proj's k = 64, one per rank at tp 2) and with one-click w4a16
    (`qcompile quant --quant_type w4a16`, whose default group is 64 here: 128 divides no expert k). Returns
    {name: (OUT, stderr of the compile)}."""
    import contextlib
    import io
    root = tmp_path_factory.mktemp("moe64")
    model = make_tiny_model(root / "qwen3_moe", "qwen3_moe", moe_intermediate_size=64)
    calib = str(write_calib_file(root / "calib.jsonl"))
    runs = {"w4a8d-experts": ["--passes", r"w4a8d:match=mlp\.experts,w8a8d", "--calib", calib],
            "w4a16": ["quant", "--quant_type", "w4a16", "--calib_file", calib]}
    outs = {}
    for name, argv in runs.items():
        out, err = root / name, io.StringIO()
        if argv[0] == "quant":
            argv = ["quant", "--model_path", str(model), "--save_path", str(out), *argv[1:], "--calib_samples", "4",
                    "--seq_len", "32"]
        else:
            argv = [str(model), *argv, "--calib-samples", "4", "--seq-len", "32", "-o", str(out)]
        with contextlib.redirect_stderr(err):
            assert cli.main(argv) == 0
        outs[name] = (out, err.getvalue())
    return outs


def test_w4a8_experts_one_group_per_rank_the_tools_shape_lines_are_its_misreading(moe64, loader_check):
    """user31: at tp 2 the loader check reports SHAPE "[64, 2] for a [4, 64, 1] FusedMoE parameter" for every
    down_proj weight_scale_second / weight_offset_second. Its padding rule (va_harness._moe_shape_problem) takes a w2
    parameter with one column for a per-channel one (not split); these are group scales, and the engine's loader
    (FusedMoE._load_w2, quant_method GROUP) gives rank r column r of the [64, 2] tensor: every entry of
    w2_weight_scale_second / w2_weight_offset_second is written at tp 2 (NaN probe). Those SHAPE lines, and only
    they, are the tool's misreading; w2_weight_scale is the engine limit of the test above."""
    out, _ = moe64["w4a8d-experts"]
    rc, text = loader_check(out, "0.23.0", tp="1,2")
    problems = [l for l in text.splitlines() if l.split(" ", 1)[0] in
                ("EXTRA", "IGNORED", "MISSING", "SHAPE", "DTYPE", "REJECTED", "CONSTRUCT", "LOAD")]
    assert rc == 1 and problems, text[-3000:]
    for line in problems:
        assert re.match(r"SHAPE model\.layers\.\*\.mlp\.experts\.\d\.down_proj\.weight_(scale|offset)_second \(x2\) "
                        r"\[tp=2r0,2r1\]: expert tensor \[64, 2\] for a \[4, 64, 1\] FusedMoE parameter", line), line
    assert len(problems) == 2 * 4  # 2 tensors x 4 experts (layers merged)
    unfilled = loader_unfilled_expert_params(out, "2")
    for rank in ("2r0", "2r1"):
        assert unfilled[rank]["w2_weight_scale_second"][0] == unfilled[rank]["w2_weight_offset_second"][0] == 0


def test_one_click_w4a16_experts_build_at_the_tensor_parallel_sizes_the_warning_names(moe64, loader_check):
    """user31: one-click w4a16 picks group 64 on moe_intermediate_size 64; vLLM-Ascend's W4A16 fused-MoE method
    asserts (moe_intermediate_size / tp) % group_size == 0, so it builds at tp 1 and fails construction at tp 2. The
    compile now says exactly that (and that group=32 would build at tp 1, 2); the loader check agrees at each tp."""
    out, err = moe64["w4a16"]
    assert json.loads((out / "quant_model_description.json").read_text())["group_size"] == 64
    assert w4a16_moe_tp_sizes(64, 64) == [1]
    assert "tensor parallel 1 only" in err and "group=32 builds at tensor parallel 1, 2" in err, err
    assert features_of_artifact(out).moe_group_size == 64 and features_of_artifact(out).moe_intermediate_size == 64
    rc, text = loader_check(out, "0.23.0", tp="1")
    assert rc == 0, text[-3000:]
    rc, text = loader_check(out, "0.23.0", tp="2")
    assert rc == 1 and "CONSTRUCT model.layers.*.mlp.experts" in text and "divided by `group_size` 64" in text, \
        text[-3000:]


QWEN2_CASES = {"w8a8d": "w8a8d"}


@pytest.fixture(scope="module")
def qwen2_moe_artifacts(tmp_path_factory):
    return compile_tiny_cases(tmp_path_factory.mktemp("qwen2-moe-e2e"), "qwen2_moe", QWEN2_CASES)


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
    broken = edited_artifact(qwen2_moe_artifacts["w8a8d"], tmp_path / "broken",
                             lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight_scale"))
    rc, text = loader_with_qwen2_moe_mapping(broken, "0.23.0")
    assert rc == 1 and "MISSING" in text and "w13_weight_scale" in text, text[-3000:]


@pytest.fixture(scope="module")
def qwen3_moe_kv8(tmp_path_factory):
    return compile_tiny_cases(tmp_path_factory.mktemp("qwen3-moe-kv8"), "qwen3_moe", {"w8a8d-kv8": "w8a8d,kv8"})[
        "w8a8d-kv8"]


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
