"""fa3 (FAQuant per-head int8 Q/K/V) on tiny models: structure, calibration vs a written-out reference,
numerics, the non-matching error, combination with kv8, and the artifact of a whole compile."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qcompiler.config import CompileOptions
from qcompiler.driver import compile_model
from qcompiler.errors import QCError
from qcompiler.ir.patterns import attention_nodes
from qcompiler.passes import TAIL, PassManager, make_pass
from tests.helpers import assert_checker_clean, capture_tiny_layer, sdpa_inputs

FAQ, FADQ = torch.ops.qc.fa_quant.default, torch.ops.qc.fa_dequant.default


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_qdq_on_q_k_v_of_attention(tiny_models, arch):
    gm, ctx = capture_tiny_layer(tiny_models[arch])
    PassManager([make_pass(n) for n in ("w8a8", "fa3", *TAIL)]).run(gm, ctx)
    (attn,) = attention_nodes(gm)
    for edge, short in zip(attn.args[:3], "qkv"):
        assert edge.target == FADQ and edge.args[0].target == FAQ
        assert edge.args[1].target == f"self_attn.fa_{short}.scale" and list(edge.users) == [attn]
    assert [n.target for n in gm.graph.nodes].count(FAQ) == 3
    for short, heads in (("q", 4), ("k", 2), ("v", 2)):
        scale, t1 = ctx.extra_tensors[f"self_attn.fa_{short}.scale"]
        offset, t2 = ctx.extra_tensors[f"self_attn.fa_{short}.offset"]
        assert t1 == t2 == "FAQuant"
        assert scale.shape == offset.shape == (heads, 1)
        assert scale.dtype == torch.float32 and offset.dtype == torch.int8 and torch.count_nonzero(offset) == 0
    assert ctx.description == {"fa_quant_type": "FAQuant"}


def test_per_head_scales_and_numerics(tiny_models):
    gm, ctx = capture_tiny_layer(tiny_models["llama"])
    with torch.no_grad():
        want = gm(ctx.inputs.hidden, position_embeddings=ctx.inputs.position_embeddings).float()
    qkv = sdpa_inputs(gm, ctx)
    make_pass("w8a16").run(gm, ctx)
    make_pass("fa3").run(gm, ctx)
    make_pass("calibrate").run(gm, ctx)  # the calibration forward applies the scales fa3 queued
    for x, short in zip(qkv, "qkv"):
        a = x.float().numpy()                                          # [B, N, L, D]
        ref = (np.abs(a).max(axis=(0, 2, 3)) / np.float32(127)).astype(np.float32).reshape(-1, 1)
        ref = torch.from_numpy(ref).to(ctx.dtype).float().numpy()    # held in the model dtype by the engines
        scale = ctx.extra_tensors[f"self_attn.fa_{short}.scale"][0]
        np.testing.assert_array_equal(scale.numpy(), ref)
        ref_q = np.clip(np.rint(a / ref.reshape(1, -1, 1, 1)), -128, 127).astype(np.int8)
        assert np.array_equal(torch.ops.qc.fa_quant(x, scale).numpy(), ref_q)
    with torch.no_grad():
        got = gm(ctx.inputs.hidden, position_embeddings=ctx.inputs.position_embeddings).float()
    # one scale per head is coarser than kv8's per channel: rounding error up to absmax_head/254 per element;
    # on the random tiny layer the attention block's contribution moves by a few percent, 5% is the bound.
    resid = ctx.inputs.hidden.float()
    rel = ((got - want).norm() / (want - resid).norm()).item()
    assert 0 < rel < 0.05, rel


def test_non_matching_attention_is_an_error(tiny_models):
    gm, ctx = capture_tiny_layer(tiny_models["llama"], index=1)
    make_pass("w8a8").run(gm, ctx)
    (attn,) = attention_nodes(gm)
    attn.args = (attn.args[2], *attn.args[1:])  # query now computed from v_proj
    gm.recompile()
    with pytest.raises(QCError, match=r"fa3: layer 1: the q input .*expected exactly one \*\.q_proj"):
        make_pass("fa3").run(gm, ctx)


def test_fa3_with_kv8_chains_both(tiny_models):
    gm, ctx = capture_tiny_layer(tiny_models["llama"])
    PassManager([make_pass(n) for n in ("w8a8d", "kv8", "fa3", *TAIL)]).run(gm, ctx)
    (attn,) = attention_nodes(gm)
    k = attn.args[1]
    assert k.target == FADQ and k.args[0].args[0].target == torch.ops.qc.kv_dequant.default
    assert set(ctx.description) == {"kv_cache_type", "kv_quant_type", "fa_quant_type"}


@pytest.fixture(scope="module")
def fa3_out(tiny_models, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("fa3") / "out"
    compile_model(CompileOptions(model=str(tiny_models["qwen2"]), out=out, passes=(("w8a8", {}), ("fa3", {})),
                                 calib=calib_file, calib_samples=4, seq_len=32), log=lambda m: None)
    return out


def test_artifact(fa3_out):
    desc = json.loads((fa3_out / "quant_model_description.json").read_text())
    assert desc["fa_quant_type"] == "FAQuant" and "kv_cache_type" not in desc
    tensors = load_file(str(fa3_out / "quant_model_weights.safetensors"))
    for short, heads in (("q", 4), ("k", 2), ("v", 2)):
        base = f"model.layers.1.self_attn.fa_{short}"
        assert tensors[f"{base}.scale"].shape == (heads, 1) and tensors[f"{base}.scale"].dtype == torch.float32
        assert tensors[f"{base}.offset"].dtype == torch.int8 and torch.count_nonzero(tensors[f"{base}.offset"]) == 0
        assert desc[f"{base}.scale"] == desc[f"{base}.offset"] == "FAQuant"


def test_checker_accepts_the_artifact(fa3_out):
    assert_checker_clean(fa3_out)


def test_targets():
    from qcompiler.targets import check_target, get_target
    assert check_target(get_target("ascend910b"), torch.bfloat16, {"W8A8", "FAQuant", "C8"}) == []
    warnings = check_target(get_target("ascend310p"), torch.float16, {"W8A8", "FAQuant"})  # spec: unsure there
    assert len(warnings) == 1 and "FAQuant" in warnings[0]
