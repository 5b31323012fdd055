"""w8a8 end to end on tiny models: structure after each pass, numerics vs float, and the executable
layer against an independent formula computed straight from the artifact's tensors."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from qcompiler.config import CompileOptions
from qcompiler.driver import compile_model
from qcompiler.ir import meta
from qcompiler.ir.capture import HFSkeleton
from qcompiler.loading import open_checkpoint
from qcompiler.passes import TAIL, LayerContext, PassManager, make_pass
from qcompiler.runtime import load_model


def _layer(folder, index=0):
    ckpt = open_checkpoint(folder)
    skel = HFSkeleton(ckpt)
    inputs = skel.layer0_inputs(torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(1)))
    return skel.capture_layer(index, inputs), LayerContext(index=index, inputs=inputs, dtype=ckpt.dtype)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_structure_after_each_pass(tiny_models):
    gm, ctx = _layer(tiny_models["llama"])
    make_pass("w8a8").run(gm, ctx)
    specs = [n.meta.get(meta.QUANT_SPEC) for n in gm.graph.nodes if meta.LINEAR_NAME in n.meta]
    assert len(specs) == 7 and all(s.quant_type == "W8A8" for s in specs)
    make_pass("observe").run(gm, ctx)
    observers = [n for n in gm.graph.nodes if meta.OBSERVER in n.meta]
    assert len(observers) == 4  # q/k/v share one, o, gate/up share one, down
    make_pass("calibrate").run(gm, ctx)
    make_pass("lower").run(gm, ctx)
    targets = _targets(gm)
    assert torch.ops.aten.linear.default not in targets
    assert targets.count(torch.ops.qc.quant_matmul.default) == 7
    assert targets.count(torch.ops.qc.quantize.default) == 4
    assert not [n for n in gm.graph.nodes if meta.OBSERVER in n.meta]
    assert {k for k, _ in gm.named_parameters()} == {"input_layernorm.weight", "post_attention_layernorm.weight"}
    assert gm.get_buffer("self_attn.q_proj.weight").dtype == torch.int8
    assert set(ctx.artifact) == {s.split(".", 0)[0] for s in ctx.artifact}  # names recorded
    assert len(ctx.artifact) == 7


def test_exclude_keeps_linears_float(tiny_models):
    gm, ctx = _layer(tiny_models["llama"])
    ctx.exclude = (r"mlp\.down_proj",)
    PassManager([make_pass(n) for n in ("w8a8", *TAIL)]).run(gm, ctx)
    assert "mlp.down_proj" not in ctx.artifact
    assert _targets(gm).count(torch.ops.aten.linear.default) == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_quantized_layer_close_to_float(tiny_models, arch):
    gm, ctx = _layer(tiny_models[arch])
    with torch.no_grad():
        want = gm(ctx.inputs.hidden, position_embeddings=ctx.inputs.position_embeddings).float()
    PassManager([make_pass(n) for n in ("w8a8", *TAIL)]).run(gm, ctx)
    with torch.no_grad():
        got = gm(ctx.inputs.hidden, position_embeddings=ctx.inputs.position_embeddings).float()
    # int8 weights and activations on a random layer: the layer's own contribution (output - residual)
    # keeps a relative error of a few percent; 10% leaves room for min-max on random data.
    resid = ctx.inputs.hidden.float()
    rel = (got - want).norm() / (want - resid).norm()
    assert rel < 0.10, rel


# ---- the executable layer vs an independent formula from the artifact's tensors ------------------------
def _decode_deq(t):
    if t.dtype == torch.int64:
        return torch.from_numpy((t.numpy() & 0xFFFFFFFF).astype(np.uint32).view(np.float32).copy())
    return t.float()


def _w8a8_linear(x, p, dtype):
    """Spec section 3, W8A8 engine math, written out."""
    recip = (1.0 / p["input_scale"].to(dtype)).to(dtype).float()
    xq = torch.clamp(torch.round(x.float() * recip + p["input_offset"].float()), -128, 127)
    acc = xq.double() @ p["weight"].double().T + p["quant_bias"].double()   # exact integers in float64
    return (acc.float() * _decode_deq(p["deq_scale"])).to(dtype)


def _rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


def _linear_params(t, prefix):
    """The artifact tensors of one Linear, keyed by suffix."""
    return {k[len(prefix) + 1:]: v for k, v in t.items() if k.startswith(prefix + ".")}


def reference_layer(lin, t, i, cfg, h, cos, sin):
    """A decoder layer written out from artifact tensors; `lin(full_linear_name, x)` applies one Linear."""
    pre = f"model.layers.{i}."
    eps, nh, kvh = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    b, s, _ = h.shape
    x = _rms(h, t[pre + "input_layernorm.weight"], eps)
    q = lin(pre + "self_attn.q_proj", x).view(b, s, nh, hd).transpose(1, 2)
    k = lin(pre + "self_attn.k_proj", x).view(b, s, kvh, hd).transpose(1, 2)
    v = lin(pre + "self_attn.v_proj", x).view(b, s, kvh, hd).transpose(1, 2)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    att = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd ** -0.5, enable_gqa=True)
    h = h + lin(pre + "self_attn.o_proj", att.transpose(1, 2).reshape(b, s, -1))
    x = _rms(h, t[pre + "post_attention_layernorm.weight"], eps)
    return h + lin(pre + "mlp.down_proj", F.silu(lin(pre + "mlp.gate_proj", x)) * lin(pre + "mlp.up_proj", x))


def _reference_layer(t, i, cfg, h, cos, sin, dtype):
    return reference_layer(lambda name, x: _w8a8_linear(x, _linear_params(t, name), dtype), t, i, cfg, h, cos, sin)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_executable_layer_matches_formula_from_artifact(tiny_models, calib_file, tmp_path, dtype):
    out = tmp_path / "out"
    compile_model(CompileOptions(model=str(tiny_models["llama"]), out=out, calib=calib_file, calib_samples=4,
                                 seq_len=32, dtype=dtype), log=lambda m: None)
    tensors = load_file(str(out / "quant_model_weights.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    model = load_model(out)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(3))
    h = model.head.embed(ids)
    cos, sin = model.head.rope(24)
    dt = getattr(torch, dtype)
    with torch.inference_mode():
        got = model.layers.get(0)(h, position_embeddings=(cos, sin))
        want = _reference_layer(tensors, 0, cfg, h, cos, sin, dt)
    # Same math in the same order: bit-identical is expected; allow nothing else.
    assert torch.equal(got, want), (got - want).abs().max()
