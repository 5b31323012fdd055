"""The scheme passes besides w8a8 (w8a8d, w8a8mix, w8a16, w4a16, w4a8d) and what they share: structure after
lowering, numerics vs float, the executable layer vs an independent formula from the artifact's tensors,
mixed recipes, the one artifact group size, fused-group splits, and gptq/awq weight codes (WEIGHT_QPARAMS).

Layer-level tests reuse one captured tiny Qwen2 layer (it has q/k/v biases, so the bias paths run), and a tiny
Llama layer for w4a8d (no engine adds a W4A8_DYNAMIC Linear's bias, so it refuses one); full compiles cover
the executable graph and the artifact checker."""
import json

import pytest
import torch
from safetensors.torch import load_file

from qcompiler.config import CompileOptions, load_recipe
from qcompiler.driver import check_scheme_groups, compile_model
from qcompiler.errors import QCError
from qcompiler.ir import meta
from qcompiler.ir.qspec import PerGroup
from qcompiler.passes import PassManager, make_pass
from qcompiler.passes.group_size import resolve_group_sizes
from qcompiler.runtime import load_model
from tests.helpers import (assert_checker_clean, dynamic_linear, fresh_layer, linear_params, reference_layer,
                           run_passes, unpack_int4, w4a8_linear, w8a8_linear)

QC = torch.ops.qc
SCHEMES = ("w8a8d", "w8a8mix", "w8a16", "w4a16", "w4a8d")


@pytest.fixture
def layer_for(qwen2_layer, llama_layer):
    """The tiny layer a scheme's layer tests run on: llama for w4a8d (no Linear bias), else qwen2 (q/k/v bias)."""
    return lambda scheme: llama_layer if scheme == "w4a8d" else qwen2_layer


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


# ---- structure after lowering -------------------------------------------------------------------------------
# tiny model: hidden 64, intermediate 128, 4 heads of 16, 2 kv heads -> q [64,64], k/v [32,64], o [64,64],
# gate/up [128,64], down [64,128]
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
          "mlp.down_proj": (64, 128)}
STRUCTURE = {  # scheme: ({qc op: count}, artifact type, weight shape (n, k) -> stored shape)
    "w8a8d": ({QC.dynamic_quant.default: 4, QC.quant_matmul_pertoken.default: 7}, "W8A8_DYNAMIC", lambda n, k: (n, k)),
    "w8a8mix": ({QC.quantize.default: 4, QC.quant_matmul.default: 7}, "W8A8_MIX", lambda n, k: (n, k)),
    "w8a16": ({QC.weight_quant_matmul.default: 7}, "W8A16", lambda n, k: (n, k)),
    # default group 64 (128 does not divide k=64): k=64 Linears get one group = per-channel, packed along k
    "w4a16": ({QC.weight_quant_matmul.default: 7}, "W4A16", lambda n, k: (n, k // 2) if k == 64 else (n // 2, k)),
    # default group 32 (two-stage per-group), packed along n
    "w4a8d": ({QC.dynamic_quant.default: 4, QC.quant_matmul_pergroup.default: 7}, "W4A8_DYNAMIC",
              lambda n, k: (n // 2, k)),
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_structure_after_lowering(layer_for, scheme):
    gm, ctx = fresh_layer(layer_for(scheme))
    run_passes(gm, ctx, scheme)
    ops, qtype, stored = STRUCTURE[scheme]
    assert _count(gm, torch.ops.aten.linear.default) == 0
    for op in (QC.quantize.default, QC.quant_matmul.default, QC.dynamic_quant.default,
               QC.quant_matmul_pertoken.default, QC.quant_matmul_pergroup.default, QC.weight_quant_matmul.default):
        assert _count(gm, op) == ops.get(op, 0), op
    assert not [n for n in gm.graph.nodes if meta.OBSERVER in n.meta]
    # only the norms stay float parameters; every Linear's weight is an int8 buffer under its HF name
    assert {k for k, _ in gm.named_parameters()} == {"input_layernorm.weight", "post_attention_layernorm.weight"}
    assert {a.quant_type for a in ctx.artifact.values()} == {qtype} and set(ctx.artifact) == set(SHAPES)
    for name, (n, k) in SHAPES.items():
        w = gm.get_buffer(f"{name}.weight")
        assert w.dtype == torch.int8 and tuple(w.shape) == stored(n, k), name
        assert torch.equal(w, ctx.artifact[name].tensors["weight"])
    if scheme == "w4a8d":  # scale_bias and the offsets go to the artifact, not to the graph
        t = ctx.artifact["mlp.down_proj"].tensors
        assert t["scale_bias"].shape == (64, 16) and t["weight_scale_second"].shape == (64, 4)
        assert ctx.artifact["mlp.up_proj"].tensors["scale_bias"].shape == (128, 1)
        assert {k for k, _ in gm.named_buffers() if k.startswith("mlp.down_proj.")} == {
            "mlp.down_proj.weight", "mlp.down_proj.weight_scale", "mlp.down_proj.weight_scale_second"}


# ---- numerics vs float -------------------------------------------------------------------------------------
# Relative error of the layer's own contribution (output - residual) vs the float layer, on a random layer:
# int8 weights round to absmax/127 (~0.3% of a weight's rms per element) plus bf16 output rounding: w8a16
# stays near 1%; per-token int8 activations add about as much (w8a8d); static per-tensor min-max
# activations (w8a8mix runs the static path) waste range on random data (same 10% bound as w8a8). int4
# weights round to absmax/7, a uniform error of ~12% of a Gaussian weight's rms per element, which
# the layer passes on nearly unchanged: 25% leaves room for that, not for a wrong scale or packing
# (a mispacked nibble or a 2x scale gives > 50%).
TOLERANCE = {"w8a8d": 0.05, "w8a8mix": 0.10, "w8a16": 0.03, "w4a16": 0.25, "w4a8d": 0.25}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_layer_close_to_float(layer_for, scheme):
    gm, ctx = fresh_layer(layer_for(scheme))
    want = layer_for(scheme)[3]
    run_passes(gm, ctx, scheme)
    with torch.no_grad():
        got = gm(ctx.inputs.hidden, position_embeddings=ctx.inputs.position_embeddings).float()
    rel = (got - want).norm() / (want - ctx.inputs.hidden.float()).norm()
    assert rel < TOLERANCE[scheme], rel


def test_w4a16_explicit_group_packs_along_n(qwen2_layer):
    gm, ctx = fresh_layer(qwen2_layer)
    run_passes(gm, ctx, ("w4a16", {"group": "32"}))
    t = ctx.artifact["self_attn.q_proj"].tensors
    assert t["weight"].shape == (32, 64) and t["weight_scale"].shape == (64, 2)
    node = next(n for n in gm.graph.nodes if n.target == QC.weight_quant_matmul.default)
    assert node.args[5:] == (32, 2)  # group_size, packing along n


# ---- gptq/awq codes are what the artifact holds ---------------------------------------------------------
@pytest.mark.parametrize("scheme", ("w8a8",) + SCHEMES)
def test_weight_qparams_are_encoded_exactly(layer_for, scheme):
    gm, ctx = fresh_layer(layer_for(scheme))
    PassManager([make_pass(scheme), make_pass("observe"), make_pass("calibrate")]).run(gm, ctx)
    gen = torch.Generator().manual_seed(7)
    given = {}
    for node in [n for n in gm.graph.nodes if meta.QUANT_SPEC in n.meta]:
        spec = node.meta[meta.QUANT_SPEC]
        n, k = SHAPES[node.meta[meta.LINEAR_NAME]]
        qmax = 127 if spec.weight.bits == 8 else 7
        groups = k // spec.weight.granularity.size if isinstance(spec.weight.granularity, PerGroup) else 1
        q = torch.randint(-qmax, qmax + 1, (n, k), generator=gen, dtype=torch.int8)
        # codes are computed against the scale the engines hold: a model-dtype value (encode.quantize_weight)
        scale = (torch.rand(n, groups, generator=gen) * 0.01 + 1e-3).to(ctx.dtype).float()
        node.meta[meta.WEIGHT_QPARAMS] = given[node.meta[meta.LINEAR_NAME]] = (q, scale)
    assert len(given) == 7
    make_pass("lower").run(gm, ctx)
    for name, (q, scale) in given.items():
        t = ctx.artifact[name].tensors
        w = t["weight"]
        if scheme == "w4a16":  # per-channel (one scale column) packs along k, per-group along n
            w = unpack_int4(w, 1 if scale.shape[1] == 1 else 0)
        elif scheme == "w4a8d":
            w = unpack_int4(w, 0)
        assert torch.equal(w, q), name
        if scheme == "w4a8d":  # the two stages multiply back to the per-group scale, as the engines form it
            product = (t["weight_scale"].to(ctx.dtype) * t["weight_scale_second"].to(ctx.dtype)).float()
            assert torch.equal(product, scale), name
        else:
            assert torch.equal(t["weight_scale"], scale), name
        assert torch.equal(gm.get_buffer(f"{name}.weight"), t["weight"]), name


# ---- executable layer vs an independent formula from the artifact ----------------------------------------
def _weight_only_linear(x, p, dtype, int4):
    """W8A16 / W4A16: W = (W_q + offset) * scale in the model dtype (npu_weight_quant_batchmatmul), x @ W^T.
    int4 (spec, version 1.0.0): a per-channel scale [n, 1] means packed along k, per-group along n."""
    w = p["weight"]
    if int4:
        w = unpack_int4(w, 1 if p["weight_scale"].shape[1] == 1 else 0)
    reps = x.shape[-1] // p["weight_scale"].shape[1]
    scale = p["weight_scale"].repeat_interleave(reps, 1).to(dtype)
    offset = p["weight_offset"].repeat_interleave(reps, 1).to(dtype)
    y = x @ ((w.to(dtype) + offset) * scale).T
    return y + p["bias"].to(dtype) if "bias" in p else y


def _reference_layer(tensors, desc, i, cfg, h, cos, sin, dtype):
    def lin(name, x):
        p = linear_params(tensors, name)
        t = desc[name + ".weight"]
        if t in ("W8A8", "W8A8_MIX"):  # W8A8_MIX: the static (decode) path is what the graph runs
            return w8a8_linear(x, p, dtype)
        if t == "W8A8_DYNAMIC":
            return dynamic_linear(x, p, dtype)
        if t == "W4A8_DYNAMIC":
            return w4a8_linear(x, p, dtype, desc["group_size"])
        if t in ("W8A16", "W4A16"):
            return _weight_only_linear(x, p, dtype, int4=t == "W4A16")
        raise AssertionError(t)

    return reference_layer(lin, tensors, i, cfg, h, cos, sin)


@pytest.mark.parametrize("scheme", ("w8a8",) + SCHEMES)
def test_lowered_layer_matches_formula_from_its_tensors(layer_for, tiny_models, scheme):
    """Every scheme, before saving: the lowered graph vs the formula on the tensors it records for the artifact."""
    gm, ctx = fresh_layer(layer_for(scheme))
    run_passes(gm, ctx, scheme)
    pre = "model.layers.0."
    tensors = {f"{pre}{lin}.{sfx}": t for lin, art in ctx.artifact.items() for sfx, t in art.tensors.items()}
    tensors.update({pre + k: v for k, v in gm.named_parameters()})  # the two norms
    desc = {f"{pre}{lin}.weight": art.quant_type for lin, art in ctx.artifact.items()}
    desc["group_size"] = 32 if scheme == "w4a8d" else 0
    cfg = json.loads((tiny_models["llama" if scheme == "w4a8d" else "qwen2"] / "config.json").read_text())
    h = ctx.inputs.hidden
    cos, sin = ctx.inputs.position_embeddings
    with torch.no_grad():
        got = gm(h, position_embeddings=(cos, sin))
        want = _reference_layer(tensors, desc, 0, cfg, h, cos, sin, ctx.dtype)
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def _compile_and_compare(model_dir, calib_file, out, passes, dtype):
    compile_model(CompileOptions(model=str(model_dir), out=out, passes=passes, calib=calib_file, calib_samples=4,
                                 seq_len=32, dtype=dtype), log=lambda m: None)
    tensors = load_file(str(out / "quant_model_weights.safetensors"))
    desc = json.loads((out / "quant_model_description.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    model = load_model(out)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(3))
    h = model.head.embed(ids)
    cos, sin = model.head.rope(24)
    with torch.inference_mode():
        for i in range(cfg["num_hidden_layers"]):
            got = model.layers.get(i)(h, position_embeddings=(cos, sin))
            want = _reference_layer(tensors, desc, i, cfg, h, cos, sin, getattr(torch, dtype))
            # Same math in the same order: bit-identical is expected; allow nothing else.
            assert torch.equal(got, want), (i, (got.float() - want.float()).abs().max())
            h = got
    return desc


def test_mixed_w8a8d_attention_w4a16_mlp_executable_matches_formula(tiny_models, calib_file, tmp_path):
    """Qwen2 (q/k/v bias), bf16: W8A8_DYNAMIC on attention, W4A16 on the MLP (group 64: gate/up k=64 one
    group, packed along k; down k=128 two groups, packed along n), in one artifact."""
    out = tmp_path / "out"
    desc = _compile_and_compare(tiny_models["qwen2"], calib_file, out,
                                (("w8a8d", {"match": r"self_attn\."}), ("w4a16", {})), "bfloat16")
    assert desc["group_size"] == 64 and desc["model_quant_type"] == "W4A16"
    assert desc["model.layers.1.self_attn.v_proj.weight"] == "W8A8_DYNAMIC"
    assert desc["model.layers.1.self_attn.v_proj.bias"] == "FLOAT"
    assert desc["model.layers.1.mlp.down_proj.weight"] == "W4A16"
    assert_checker_clean(out)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_w4a8d_two_stage_executable_matches_formula_and_passes_checker(tiny_models, calib_file, tmp_path, dtype):
    """W4A8_DYNAMIC per-group (default group 32), both dtypes: executable == the written-out two-stage math bit for
    bit; the artifact carries msModelSlim's tensor set and the checker is clean."""
    out = tmp_path / "out"
    desc = _compile_and_compare(tiny_models["llama"], calib_file, out, (("w4a8d", {}),), dtype)
    assert desc["model_quant_type"] == "W4A8_DYNAMIC" and desc["group_size"] == 32
    tensors = load_file(str(out / "quant_model_weights.safetensors"))
    down = "model.layers.1.mlp.down_proj."
    assert {k[len(down):] for k in tensors if k.startswith(down)} == {
        "weight", "weight_scale", "weight_offset", "weight_scale_second", "weight_offset_second", "scale_bias"}
    assert tensors[down + "weight_scale_second"].shape == (64, 4) and tensors[down + "scale_bias"].shape == (64, 16)
    assert_checker_clean(out)


def test_w4a8d_refuses_linear_bias_and_per_channel_before_any_work(tiny_models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(QCError, match=r"no engine can load this artifact: vLLM-Ascend: W4A8_DYNAMIC Linear bias"):
        compile_model(CompileOptions(model=str(tiny_models["qwen2"]), out=out, passes=(("w4a8d", {}),)),
                      log=lambda m: None)
    with pytest.raises(QCError, match=r"group must be one of 32, 64, 128, 256, got 0 \(per-channel W4A8_DYNAMIC "
                                      r"loads in no engine"):
        make_pass("w4a8d", {"group": "0"})
    assert not out.exists() and not list(tmp_path.iterdir())
    # the qwen2 q/k/v (biased) kept out of w4a8d: the rest compiles
    compile_model(CompileOptions(model=str(tiny_models["qwen2"]), out=out, calib_samples=2, seq_len=16,
                                 passes=(("w8a8d", {"match": r"self_attn\.[qkv]_proj"}), ("w4a8d", {}))),
                  log=lambda m: None)
    assert json.loads((out / "quant_model_description.json").read_text())["group_size"] == 32


def test_recipe_w8a16_down_proj_w8a8_elsewhere_passes_checker(tiny_models, calib_file, tmp_path):
    """The issue's mixed recipe, from YAML, fp16 (int64 deq_scale): checker clean, executable == formula."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("passes:\n  - w8a16: {match: 'mlp\\.down_proj'}\n  - w8a8\n")
    passes = tuple(load_recipe(recipe)["passes"])
    assert passes == (("w8a16", {"match": r"mlp\.down_proj"}), ("w8a8", {}))
    out = tmp_path / "out"
    desc = _compile_and_compare(tiny_models["llama"], calib_file, out, passes, "float16")
    types = {k.rsplit(".", 1)[0].split(".", 3)[-1]: v for k, v in desc.items() if k.endswith(".weight")
             and k.startswith("model.layers.0.") and "layernorm" not in k}
    assert types == {**{n: "W8A8" for n in SHAPES}, "mlp.down_proj": "W8A16"}
    assert desc["model_quant_type"] == "W8A8" and desc["group_size"] == 0
    assert_checker_clean(out)


# ---- group size: one per artifact, decided from config.json before any work -----------------------------
def _cfg(hidden, inter, heads, kv_heads, head_dim=None, layers=2):
    return {"hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_hidden_layers": layers}


SMOLLM2 = _cfg(576, 1536, 9, 3, 64)      # k: 576 (not a multiple of 128), 1536
LLAMA_LIKE = _cfg(1024, 2816, 16, 4)      # k: 1024, 2816 = 22 * 128
ODD = _cfg(160, 320, 5, 5, 32)           # k: 160 = 5 * 32


def _resolve(cfg, *passes, exclude=()):
    return resolve_group_sizes([make_pass(*p) if isinstance(p, tuple) else make_pass(p) for p in passes],
                               cfg, exclude)


def test_default_group_is_128_when_it_divides_every_k():
    passes, g = _resolve(LLAMA_LIKE, "w4a16")
    assert g == 128 and passes[0].options.group == 128


def test_default_group_falls_back_to_64_for_smollm2():
    passes, g = _resolve(SMOLLM2, "w4a16")
    assert g == 64 and passes[0].options.group == 64


def test_default_group_only_counts_linears_the_pass_quantizes():
    passes, g = _resolve(SMOLLM2, ("w4a16", {"match": r"mlp\.down_proj"}), "w8a8")
    assert g == 128  # only down_proj (k=1536) is per-group


def test_no_default_group_fits_is_an_error_naming_the_linear():
    with pytest.raises(QCError, match=r"model\.layers\.0\.self_attn\.q_proj: its k=160 .*group=32 or group=0"):
        _resolve(ODD, "w4a16")


def test_explicit_group_that_does_not_divide_is_an_error_naming_linear_and_k():
    with pytest.raises(QCError, match=r"pass w4a16: group=128 does not divide k=576 of "
                                      r"model\.layers\.0\.self_attn\.q_proj.*: 32, 64$"):
        _resolve(SMOLLM2, ("w4a16", {"group": "128"}))
    with pytest.raises(QCError, match=r"pass w8a16: group=256 does not divide k=576 of model\.layers\.0\.self_attn"
                                      r"\.o_proj"):
        _resolve(SMOLLM2, ("w8a16", {"group": "256", "match": "o_proj"}), "w8a8")


def test_w8a16_is_per_channel_unless_group_given():
    passes, g = _resolve(SMOLLM2, "w8a16")
    assert g == 0 and passes[0].options.group == 0
    passes, g = _resolve(SMOLLM2, ("w8a16", {"group": "64"}))
    assert g == 64


def test_one_group_size_per_artifact():
    passes, g = _resolve(LLAMA_LIKE, ("w8a16", {"group": "64", "match": "down_proj"}), "w4a16")
    assert g == 64 and passes[1].options.group == 64      # the unset group takes the explicit one
    with pytest.raises(QCError, match=r"one weight group_size.*w8a16 group=64, w4a16 group=128"):
        _resolve(LLAMA_LIKE, ("w8a16", {"group": "64", "match": "down_proj"}), ("w4a16", {"group": "128"}))


def test_group_option_values_are_validated():
    with pytest.raises(QCError, match=r"pass w4a16: group must be one of 0, 32, 64, 128, 256"):
        make_pass("w4a16", {"group": "48"})
    with pytest.raises(QCError, match=r"pass w8a8d: match '\(' is not a valid regular expression"):
        make_pass("w8a8d", {"match": "("})
    with pytest.raises(QCError, match=r"pass w8a8d: unknown option 'group'"):
        make_pass("w8a8d", {"group": "64"})


def test_compile_rejects_bad_group_before_any_work(tiny_models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(QCError, match=r"group=128 does not divide k=64 of model\.layers\.0\.self_attn\.q_proj"):
        compile_model(CompileOptions(model=str(tiny_models["llama"]), out=out, passes=(("w4a16", {"group": "128"}),)),
                      log=lambda m: None)
    assert not out.exists() and not list(tmp_path.iterdir())


# ---- fused groups must share one scheme -------------------------------------------------------------------
def test_match_that_splits_qkv_is_rejected():
    passes = [make_pass("w8a16", {"match": r"q_proj"}), make_pass("w8a8")]
    with pytest.raises(QCError, match=r"split model\.layers\.0\.self_attn\.q_proj/k_proj/v_proj \(q_proj: w8a16, "
                                      r"k_proj: w8a8, v_proj: w8a8\): engines fuse them"):
        check_scheme_groups(passes, SMOLLM2)


def test_match_that_splits_gate_up_is_rejected_and_exclude_counts():
    passes = [make_pass("w8a8d", {"match": r"layers\.1\.mlp"})]
    with pytest.raises(QCError, match=r"split model\.layers\.1\.mlp\.gate_proj/up_proj \(gate_proj: float, "
                                      r"up_proj: w8a8d\)"):
        check_scheme_groups(passes, SMOLLM2, exclude=(r"layers\.1\.mlp\.gate",))
    check_scheme_groups([make_pass("w8a16", {"match": r"mlp\.(gate|up)_proj"}), make_pass("w8a8")], SMOLLM2)


def test_scheme_pass_that_quantizes_nothing_is_rejected():
    with pytest.raises(QCError, match=r"pass w4a16 \(match '.\*'\) would quantize no Linear"):
        check_scheme_groups([make_pass("w8a8"), make_pass("w4a16")], SMOLLM2)


def test_compile_rejects_split_before_any_work(tiny_models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(QCError, match=r"would split model\.layers\.0\.mlp\.gate_proj/up_proj"):
        compile_model(CompileOptions(model=str(tiny_models["llama"]), out=out,
                                     passes=(("w4a8d", {"match": "up_proj"}), ("w8a8d", {}))), log=lambda m: None)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_passes_command_lists_schemes_and_options(capsys):
    from qcompiler.cli import main
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    for name in SCHEMES:
        assert f"\n{name} " in "\n" + text
    assert "match=.*" in text and "group=None" in text and "group=0" in text
