"""w8a8 end to end on tiny models: structure after each pass, numerics vs float, and the executable
layer against an independent formula computed straight from the artifact's tensors."""
import json

import pytest
import torch
from safetensors.torch import load_file

from qcompiler.config import CompileOptions
from qcompiler.driver import compile_model
from qcompiler.ir import meta
from qcompiler.passes import TAIL, PassManager, make_pass
from qcompiler.runtime import load_model
from tests.helpers import capture_tiny_layer, linear_params, reference_layer, w8a8_linear


def _layer(folder, index=0):
    return capture_tiny_layer(folder, index)


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
    assert set(ctx.artifact) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}  # every Linear, by its layer-local name


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
def _reference_layer(t, i, cfg, h, cos, sin, dtype):
    return reference_layer(lambda name, x: w8a8_linear(x, linear_params(t, name), dtype), t, i, cfg, h, cos, sin)


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
