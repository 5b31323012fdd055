"""config.json's MindIE keys of a mixture-of-experts artifact (backends/ascend/mindie_keys.py): MindIE's atb loader
reads each Linear with the quant type a config.json key names, not the description's, so the keys must name each
Linear's own type.

`atb_read_type` restates the loader's rule from MindIE-LLM's code (examples/atb_models/atb_llm, tags 3.0.0alpha1,
3.0.0.beta.1, 3.0.0 de94ddb5, master 0695772e): models/base/router.py BaseRouter.config (config.json `quantize`, else
the description's model_quant_type lowercased, "w8a8_mix" -> "w8a8_pdmix"); models/qwen2/modeling_qwen2.py
FlashQwenAttention.__init__ (attention: `attn_quantize`, else "w8a8" when "moe" in model_type and quantize is
"w8a8_dynamic", else quantize); load_column_multi / load_moe (every other Linear: quantize); a FLOAT weight is read
as float under any key (utils/weights.py get_multi_weights_col). Before the fix qcompile wrote only `quantize` (the
model_quant_type), so a w8a8d MoE artifact's W8A8_DYNAMIC attention was read as static W8A8.
"""
import json

import pytest
import torch

from qcompiler import cli
from qcompiler.backends.ascend import encode as E
from qcompiler.backends.ascend.artifact import ArtifactWriter
from qcompiler.backends.ascend.engines import MOE_MINDIE_KEYS, features_of_artifact, refusals
from qcompiler.backends.ascend.mindie_keys import moe_config_keys

CALIB = ["--calib-samples", "4", "--seq-len", "32"]


def atb_read_type(config: dict, desc: dict, linear: str) -> str:
    """The quant type (description spelling) MindIE's atb loader reads Linear `linear` with."""
    if desc[f"{linear}.weight"] == "FLOAT":
        return "FLOAT"
    quantize = config.get("quantize") or desc["model_quant_type"].lower()
    quantize = "w8a8_pdmix" if quantize == "w8a8_mix" else quantize
    name = quantize
    if ".self_attn." in linear:
        if "attn_quantize" in config:
            name = config["attn_quantize"]
        elif "moe" in config["model_type"] and quantize == "w8a8_dynamic":
            name = "w8a8"
    return "W8A8_MIX" if name == "w8a8_pdmix" else name.upper()


def _misread(out) -> dict:
    config = json.loads((out / "config.json").read_text())
    desc = json.loads((out / "quant_model_description.json").read_text())
    linears = [k[:-len(".weight")] for k, v in desc.items() if isinstance(v, str) and k.endswith("_proj.weight")]
    assert linears
    return {n: (desc[f"{n}.weight"], atb_read_type(config, desc, n)) for n in linears
            if atb_read_type(config, desc, n) != desc[f"{n}.weight"]}


@pytest.mark.parametrize("arch,passes,keys", [
    ("qwen3_moe", "w8a8d", {"quantize": "w8a8_dynamic", "attn_quantize": "w8a8_dynamic"}),
    # msModelSlim's Qwen3-MoE mix (static attention, dynamic MLP): model_quant_type W8A8, experts W8A8_DYNAMIC
    ("qwen3_moe", r"w8a8:match=self_attn,w8a8d", {"quantize": "w8a8_dynamic", "attn_quantize": "w8a8"}),
    ("qwen3_moe", r"w8a8mix:match=self_attn,w8a8d", {"quantize": "w8a8_dynamic", "attn_quantize": "w8a8_pdmix"}),
    ("qwen3_moe", r"w8a8d:match=self_attn", {"quantize": "w8a8_dynamic", "attn_quantize": "w8a8_dynamic"}),
    ("qwen2_moe", "w8a8d", {"quantize": "w8a8_dynamic", "attn_quantize": "w8a8_dynamic"}),
])
def test_mindie_reads_every_moe_linear_with_its_own_type(moe_models, calib_file, tmp_path, arch, passes, keys):
    out = tmp_path / "out"
    assert cli.main([str(moe_models[arch]), "--passes", passes, "--calib", str(calib_file), *CALIB,
                     "-o", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert {k: config.get(k) for k in keys} == keys
    assert _misread(out) == {}
    assert MOE_MINDIE_KEYS not in features_of_artifact(out).keys()


def test_moe_config_keys_and_what_they_cannot_say():
    attn = {f"model.layers.{i}.self_attn.{p}_proj": t for i, t in ((0, "W8A8"), (1, "W8A8_DYNAMIC")) for p in "qkvo"}
    experts = {f"model.layers.{i}.mlp.experts.0.{p}_proj": "W8A8_DYNAMIC" for i in (0, 1) for p in ("gate", "up")}
    keys, problems = moe_config_keys({**attn, **experts})
    assert keys == {"quantize": "w8a8_dynamic", "attn_quantize": "w8a8"} and len(problems) == 1
    assert "W8A8, W8A8_DYNAMIC" in problems[0] and "attn_quantize" in problems[0]
    keys, problems = moe_config_keys({**experts, "model.layers.0.mlp.shared_expert.down_proj": "W8A16",
                                      "model.layers.0.self_attn.q_proj": "W4A8_DYNAMIC"})
    assert keys == {"quantize": "w8a16", "attn_quantize": "w4a8_dynamic"}
    assert len(problems) == 2 and "ALL_W4A8" in problems[1]
    floats = {n: "FLOAT" for n in {**attn, **experts}}
    assert moe_config_keys(floats) == ({}, [])
    assert moe_config_keys({**floats, "model.layers.0.self_attn.q_proj": "W8A8_MIX"}) == (
        {"quantize": "w8a8_mix", "attn_quantize": "w8a8_pdmix"}, [])


def test_mixed_attention_types_on_moe_refuse_mindie_only(moe_models, tmp_path, capsys):
    """q/k/v static W8A8 and o_proj W8A8_DYNAMIC: one attn_quantize cannot type both; vLLM-Ascend reads the
    description's per-Linear types and loads it (qwen3_moe), so `--engine mindie` is refused, `any` is not."""
    argv = [str(moe_models["qwen3_moe"]), "--passes", r"w8a8:match=[qkv]_proj,w8a8d", *CALIB, "-o",
            str(tmp_path / "out"), "--engine", "mindie"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert MOE_MINDIE_KEYS in err and "attn_quantize" in err
    assert not (tmp_path / "out").exists()


def test_writer_drops_source_type_keys_and_dense_configs_get_no_attn_quantize(tmp_path):
    """A source config's attn_quantize / moe_quantize would type our Linears for the engines (MindIE qwen2
    FlashQwenAttention reads attn_quantize on dense models too; vLLM-Ascend reads moe_quantize as the experts'
    type): dropped. A dense artifact's keys are as before (quantize = model_quant_type)."""
    cfg_in = {"model_type": "qwen2", "attn_quantize": "w8a8", "moe_quantize": "w4a8_dynamic", "quantize": "x"}
    w = ArtifactWriter(tmp_path / "out", torch.bfloat16)
    w.add("model.layers.0.self_attn.q_proj.weight", torch.ones(2, 2, dtype=torch.int8), E.W8A8_DYNAMIC)
    w.finish(None, cfg_in)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantize"] == "w8a8_dynamic" and "attn_quantize" not in cfg and "moe_quantize" not in cfg


def test_features_of_artifact_sees_what_the_keys_cannot_say(moe_models, calib_file, tmp_path):
    out = tmp_path / "out"
    assert cli.main([str(moe_models["qwen3_moe"]), "--passes", r"w8a8:match=[qkv]_proj,w8a8d", "--calib",
                     str(calib_file), *CALIB, "-o", str(out)]) == 0  # --engine any: vLLM-Ascend loads it
    features = features_of_artifact(out)
    assert MOE_MINDIE_KEYS in features.keys()
    assert refusals("mindie", features) and not refusals("vllm-ascend", features)
    report = json.loads((out / "qcompile_report.json").read_text())
    assert not report["engines"]["mindie"]["loads"]
