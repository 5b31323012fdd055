"""The engine support matrix (backends/ascend/engines.py), --engine, the report's engine list, and the README
table generated from the matrix."""
import json
import re
from pathlib import Path

import pytest

from qcompiler import cli
from qcompiler.backends.ascend import engines as EN
from qcompiler.backends.ascend.engines import ArtifactFeatures as F
from qcompiler.engine_check import check_engine
from qcompiler.errors import QCError

ROOT = Path(__file__).resolve().parents[3]
SMALL = ["--calib-samples", "2", "--seq-len", "16"]
W4A8 = frozenset({"W4A8_DYNAMIC"})


def test_readme_matrix_is_the_backend_table():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- engine-matrix:begin -->\n(.*?)<!-- engine-matrix:end -->", text, re.S)
    assert m, "README.md has no engine-matrix section"
    assert m.group(1) == EN.matrix_markdown(), ("README's engine matrix differs from backends/ascend/engines.py; "
                                               "regenerate it with python3 -m qcompiler.backends.ascend.engines")


def test_every_feature_cites_the_engine_code_it_was_read_in():
    for f in EN.FEATURES:
        assert set(f.support) == set(EN.ENGINES) and f.layer in ("dense", "MoE", "dense, MoE")
        for engine, s in f.support.items():
            assert s.source or s.note == "not read", (f.key, engine)
            assert s.devices <= EN.BOTH and s.unsure <= EN.BOTH and not (s.devices & s.unsure)


@pytest.mark.parametrize("features,vllm,mindie", [
    (F(frozenset({"W8A8"})), True, True),
    (F(frozenset({"W8A8_DYNAMIC", "W8A16"})), True, True),
    (F(frozenset({"W8A16"}), grouped_types=frozenset({"W8A16"})), False, True),   # per-group W8A16: MindIE only
    (F(frozenset({"W4A16"}), grouped_types=frozenset({"W4A16"})), False, True),
    (F(frozenset({"W4A8_DYNAMIC"}), grouped_types=W4A8), True, True),   # two-stage per-group
    (F(frozenset({"W4A8_DYNAMIC"})), False, False),                     # per-channel: no engine
    (F(frozenset({"W4A8_DYNAMIC"}), grouped_types=W4A8, biased_types=W4A8), False, False),
    (F(frozenset({"W8A8"}), fa_quant=True), False, True),               # FAQuant: MindIE only
    (F(frozenset({"W8A8_DYNAMIC"}), kv_cache=True), True, True),        # C8: newest vLLM-Ascend
    (F(frozenset({"W8A8S"}), device="310p"), True, True),
    (F(frozenset({"W8A8S"}), device="910b"), False, False),
    (F(frozenset({"W8A16"}), device="310p"), False, True),              # no 310P W8A16 scheme in vLLM-Ascend
    (F(frozenset({"W8A8_DYNAMIC"}), device="310p"), True, True),        # MindIE: unconfirmed on 310P (warning)
    # config.json hidden_act: vLLM's MLPs take the string "silu" only, MindIE computes SwiGLU whatever it says
    (F(frozenset({"W8A8"}), hidden_act="relu"), False, False),
    (F(frozenset(), hidden_act="gelu_pytorch_tanh"), False, False),    # a float artifact too
    (F(frozenset({"W8A8"}), hidden_act="swish"), False, True),
    (F(frozenset({"W8A8"}), hidden_act="silu"), True, True),
])
def test_refusals(features, vllm, mindie):
    assert (not EN.refusals(EN.VLLM_ASCEND, features)) is vllm
    assert (not EN.refusals(EN.MINDIE, features)) is mindie
    assert EN.engines_loading(features) == [e for e, ok in ((EN.VLLM_ASCEND, vllm), (EN.MINDIE, mindie)) if ok]


def test_c8_on_llama_needs_vllm_ascend_0_26_but_qwen3_loads_on_0_23():
    llama = F(frozenset({"W8A8_DYNAMIC"}), kv_cache=True, model_type="llama")
    assert EN.expected_loader_exit(llama, "0.23.0") == 3 and EN.expected_loader_exit(llama, "0.26.0rc1") == 0
    assert EN.refusals(EN.VLLM_ASCEND, llama, "0.23.0") and not EN.refusals(EN.VLLM_ASCEND, llama, "0.26.0rc1")
    # qwen3: 0.23.0 loads the C8 scales through its worker patch patch_gqa_c8.py, which loader_check does not
    # apply: the engine loads it (no refusal) while the tool exits 3 (its C8 limit rule matches every model type)
    qwen3 = F(frozenset({"W8A8_DYNAMIC"}), kv_cache=True, model_type="qwen3")
    assert EN.refusals(EN.VLLM_ASCEND, qwen3, "0.23.0") == []
    assert EN.expected_loader_exit(qwen3, "0.23.0") == 3 and EN.expected_loader_exit(qwen3, "0.26.0rc1") == 0
    assert EN.expected_loader_exit(F(frozenset({"W8A8_DYNAMIC"}), model_type="qwen3"), "0.23.0") == 0  # no C8
    assert EN.expected_loader_exit(F(frozenset({"W4A16"})), "0.26.0rc1") == 3
    with pytest.raises(ValueError, match="unknown vLLM-Ascend version"):
        EN.expected_loader_exit(llama, "0.9")


def test_c8_warning_names_the_qwen3_worker_patch_and_the_loader_check_gap():
    """The compile's warning for a qwen3 kv8 artifact says 0.23.0 loads it (patch_gqa_c8.py ->
    AscendModelSlimConfig.get_cache_scale) and why loader_check says otherwise; llama keeps the 0.26.0rc1 note."""
    qwen3 = F(frozenset({"W8A8"}), kv_cache=True, model_type="qwen3")
    (line,) = [w for w in check_engine("vllm-ascend", qwen3) if "C8" in w]
    for needle in ("on qwen3 also 0.23.0 loads", "patch_gqa_c8.py", "Qwen3ForCausalLM.load_weights",
                   "get_cache_scale", "loader_check", "does not apply vllm_ascend/patch/*"):
        assert needle in line, line
    assert "for llama/qwen2;" not in line
    (line,) = [w for w in check_engine("vllm-ascend", F(frozenset({"W8A8"}), kv_cache=True)) if "C8" in w]
    assert "llama/qwen2 need 0.26.0rc1" in line and "loader_check" not in line, line


def test_check_engine_errors_and_warnings():
    fa3 = F(frozenset({"W8A8"}), fa_quant=True)
    with pytest.raises(QCError, match=r"vLLM-Ascend cannot load this artifact: FAQuant.*--engine any"):
        check_engine("vllm-ascend", fa3)
    assert check_engine("mindie", fa3) == check_engine("any", fa3) == []
    with pytest.raises(QCError, match=r"no engine can load this artifact: vLLM-Ascend: W4A8_DYNAMIC per-channel"):
        check_engine("any", F(frozenset({"W4A8_DYNAMIC"})))
    warnings = check_engine("any", F(frozenset({"W4A8_DYNAMIC"}), grouped_types=W4A8))
    assert any("weight-only" in w for w in warnings)   # vLLM-Ascend runs it without activation quantization
    assert any("unconfirmed" not in w and "verify on the device" in w
               for w in check_engine("mindie", F(frozenset({"W8A8_DYNAMIC"}), device="310p")))


def test_mindie_loads_no_w4a8_moe_experts():
    """MindIE's atb loader cannot build a Qwen MoE layer with W4A8_DYNAMIC experts: QwenMoe's pack type is
    PackType.ALL_W4A8 (utils/quantize/pack_type.py calc_w4a8_linear_pack_type), which FlashQwenLayer.__init__'s
    post_attention_layernorm choice does not list, so it raises AssertionError (MindIE-LLM 3.0.0alpha1 through
    master); its torch backend's W4A8PerTokenFusedMoEMethod is per-channel only and never reads weight_scale_second
    (default_model_loader.py: FusedMoE.weight_list). So `--engine mindie` is refused, `any` loads it through
    vLLM-Ascend (qwen3_moe) without a MindIE warning, and qwen2_moe (no vLLM-Ascend experts) is refused by both."""
    s = EN.FEATURE_BY_KEY["W4A8_DYNAMIC MoE"].support[EN.MINDIE]
    assert not s.loads and "FlashQwenLayer" in s.source and "ALL_W4A8" in s.note and "weight_scale_second" in s.note
    moe = F(frozenset({"W8A8_DYNAMIC"}), moe_types=W4A8, model_type="qwen3_moe")
    with pytest.raises(QCError, match="MindIE cannot load.*ALL_W4A8"):
        check_engine("mindie", moe)
    assert not any("MindIE" in w for w in check_engine("any", moe))
    with pytest.raises(QCError, match="no engine can load.*ALL_W4A8"):
        check_engine("any", F(frozenset({"W8A8_DYNAMIC"}), moe_types=W4A8, model_type="qwen2_moe"))
    assert check_engine("mindie", F(frozenset({"W8A8_DYNAMIC"}), moe_types=frozenset({"W8A8_DYNAMIC"}),
                                    model_type="qwen3_moe")) == []


def test_engine_option_refuses_before_any_work(capsys, tiny_models, tmp_path):
    out = tmp_path / "out"
    rc = cli.main([str(tiny_models["llama"]), "-o", str(out), *SMALL, "--passes", "w8a8,fa3", "--engine",
                   "vllm-ascend"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("qcompile: error: ")
    assert "vLLM-Ascend cannot load this artifact: FAQuant" in err
    assert not out.exists() and not list(tmp_path.iterdir())
    rc = cli.main([str(tiny_models["llama"]), "-o", str(out), *SMALL, "--passes", "w4a16", "--engine", "vllm-ascend"])
    assert rc == 2 and "W4A16" in capsys.readouterr().err and not out.exists()


def test_features_of_artifact_sees_per_group_scales(tiny_models, calib_file, tmp_path):
    out = tmp_path / "out"
    assert cli.main([str(tiny_models["llama"]), "-o", str(out), "--calib", str(calib_file), *SMALL,
                     "--passes", "w8a16:match=mlp\\.,w4a8d"]) == 0
    f = EN.features_of_artifact(out)
    assert f.linear_types == {"W8A16", "W4A8_DYNAMIC"} and f.grouped_types == W4A8   # W8A16 is per-channel here
    assert f.keys() == ["W4A8_DYNAMIC per-group", "W8A16"]


def test_report_lists_the_engines_and_features_of_artifact_agree(capsys, tiny_models, calib_file, tmp_path):
    out = tmp_path / "out"
    assert cli.main([str(tiny_models["llama"]), "-o", str(out), "--calib", str(calib_file), *SMALL,
                     "--passes", "w8a8d,fa3", "--engine", "mindie"]) == 0
    report = json.loads((out / "qcompile_report.json").read_text())
    assert report["engine"] == "mindie"
    assert report["engines"]["mindie"]["loads"] and not report["engines"]["vllm-ascend"]["loads"]
    assert any("FAQuant" in w for w in report["engines"]["vllm-ascend"]["why_not"])
    md = (out / "qcompile_report.md").read_text()
    assert "- loads in: MindIE (--engine mindie)" in md
    features = EN.features_of_artifact(out)
    assert features == F(frozenset({"W8A8_DYNAMIC"}), fa_quant=True, model_type="llama")
    assert EN.expected_loader_exit(features, "0.23.0") == 3


def test_features_of_artifact_reads_bias_group_and_device(tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    desc = {"model_quant_type": "W8A8S", "version": "1.0.0", "group_size": 0,
            "model.layers.0.self_attn.q_proj.weight": "W8A8S", "model.layers.0.self_attn.q_proj.bias": "FLOAT",
            "model.layers.0.mlp.down_proj.weight": "FLOAT", "lm_head.weight": "FLOAT"}
    (out / "quant_model_description.json").write_text(json.dumps(desc))
    (out / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    f = EN.features_of_artifact(out)
    assert f == F(frozenset({"W8A8S"}), biased_types=frozenset({"W8A8S"}), device="310p", model_type="qwen2")


def test_engine_from_recipe_and_bad_value(capsys, tiny_models, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [w4a16]\nengine: vllm-ascend\n")
    rc = cli.main([str(tiny_models["llama"]), "-o", str(tmp_path / "out"), *SMALL, "--recipe", str(recipe)])
    assert rc == 2 and "vLLM-Ascend cannot load this artifact: W4A16" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # argparse: --engine takes any | vllm-ascend | mindie
        cli.main([str(tiny_models["llama"]), "-o", str(tmp_path / "out"), "--engine", "tgi"])
    recipe.write_text("passes: [w8a8d]\nengine: tgi\n")
    rc = cli.main([str(tiny_models["llama"]), "-o", str(tmp_path / "out"), *SMALL, "--recipe", str(recipe)])
    assert rc == 2 and "--engine 'tgi' is not one of any, vllm-ascend, mindie" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _with_hidden_act(src, dst, act):
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "hidden_act": act}))
    return dst


def test_hidden_act_no_engine_computes_is_refused_before_any_work(capsys, tiny_models, tmp_path):
    """hidden_act relu in a Llama config.json compiled silently (the executable graph computes relu; vLLM's
    LlamaMLP raises, MindIE computes SwiGLU): one line naming config.json's key, nothing written."""
    model = _with_hidden_act(tiny_models["llama"], tmp_path / "m", "relu")
    out = tmp_path / "out"
    rc = cli.main([str(model), "-o", str(out), *SMALL, "--passes", "w8a8d"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("qcompile: error: no engine can load this artifact"), lines[0]
    assert "vLLM-Ascend: hidden_act other than silu (config.json)" in lines[0], lines[0]
    assert "MindIE: hidden_act other than silu (config.json)" in lines[0] and "SetMlpParam" in lines[0]
    assert not out.exists()


def test_hidden_act_swish_loads_in_mindie_only(capsys, tiny_models, calib_file, tmp_path):
    """swish is silu (transformers ACT2FN), but vLLM compares the string: --engine vllm-ascend refuses it, the
    default --engine any compiles for MindIE; the artifact's features say so."""
    model = _with_hidden_act(tiny_models["llama"], tmp_path / "m", "swish")
    rc = cli.main([str(model), "-o", str(tmp_path / "o1"), *SMALL, "--passes", "w8a8d", "--engine", "vllm-ascend"])
    assert rc == 2 and "hidden_act swish (config.json)" in capsys.readouterr().err
    assert cli.main([str(model), "-o", str(tmp_path / "o2"), "--calib", str(calib_file), *SMALL,
                     "--passes", "w8a8d"]) == 0
    assert EN.features_of_artifact(tmp_path / "o2").hidden_act == "swish"
    assert EN.engines_loading(EN.features_of_artifact(tmp_path / "o2")) == [EN.MINDIE]


def test_w4a16_moe_tp_sizes_follow_the_engines_assert():
    """vLLM-Ascend's W4A16 fused-MoE method asserts (moe_intermediate_size / tp) % group_size == 0 (methods/w4a16.py
    AscendW4A16FusedMoEMethod.get_dynamic_quant_param) and % 8 (get_weight, pack factor): the user's tiny
    Qwen3-MoE (moe_intermediate_size 64) with one-click w4a16's group 64 builds at tp 1 only (its loader check at
    tp 2: CONSTRUCT "intermediate_size_per_partition 32 can be divided by group_size 64"); Qwen3-30B-A3B (768)."""
    assert EN.w4a16_moe_tp_sizes(64, 64) == [1]
    assert EN.w4a16_moe_tp_sizes(64, 32) == [1, 2]
    assert EN.w4a16_moe_tp_sizes(128, 64) == [1, 2]
    assert EN.w4a16_moe_tp_sizes(768, 128) == [1, 2]
    assert EN.w4a16_moe_tp_sizes(768, 64) == [1, 2, 4]


def test_moe_warnings_name_the_tensor_parallel_sizes_that_load():
    """The compile's warnings say at which tensor-parallel sizes vLLM-Ascend loads the experts: W4A16 from this
    artifact's group size and moe_intermediate_size (and the group that would load at more), W4A8_DYNAMIC at tp 1
    or with expert parallelism (at tp >= 2 FusedMoE._load_w2 copies no column of down_proj's [H, 1] weight_scale)."""
    w4a16 = F(frozenset({"W8A8_DYNAMIC"}), moe_types=frozenset({"W4A16"}), model_type="qwen3_moe",
              moe_intermediate_size=64, moe_group_size=64)
    warnings = check_engine("vllm-ascend", w4a16)
    assert any("group_size 64 with moe_intermediate_size 64" in w and "tensor parallel 1 only" in w
               and "group=32 builds at tensor parallel 1, 2" in w for w in warnings), warnings
    roomy = check_engine("vllm-ascend", F(moe_types=frozenset({"W4A16"}), model_type="qwen3_moe",
                                          moe_intermediate_size=768, moe_group_size=64))
    assert any("tensor parallel 1, 2, 4 only" in w and "group=32 builds at tensor parallel 1, 2, 4, 8" in w
               for w in roomy), roomy
    w4a8 = F(frozenset({"W8A8_DYNAMIC"}), moe_types=W4A8, model_type="qwen3_moe", moe_intermediate_size=64,
             moe_group_size=32)
    for engine in ("vllm-ascend", "any"):
        assert any(w.startswith("vLLM-Ascend: W4A8_DYNAMIC MoE") and "tensor parallel 1, or --enable-expert-parallel"
                   in w and "w2_weight_scale" in w for w in check_engine(engine, w4a8)), engine
    with pytest.raises(QCError, match="MindIE"):  # MindIE loads no W4A8_DYNAMIC experts (its atb Qwen MoE layer)
        check_engine("mindie", w4a8)
