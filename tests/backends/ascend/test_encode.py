"""encode.py against the spec's formulas (ascend-artifact.md section 3): shapes, dtypes, values, edge cases."""
import numpy as np
import pytest
import torch

from qcompiler.backends.ascend import encode as E
from qcompiler.errors import QCError

DTYPES = [torch.float16, torch.bfloat16]


def nibbles(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Spec decoding, written independently of int4.py: element 2i = low nibble, 2i+1 = high, two's complement."""
    b = p.to(torch.int16) & 0xFF
    lo, hi = ((b & 0xF) ^ 8) - 8, ((b >> 4) ^ 8) - 8
    return torch.stack([lo, hi], dim=dim + 1).flatten(dim, dim + 1)


def weight(n=16, k=64, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).to(dtype)


# ---- quantize_weight ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,qmax", [(8, 127), (4, 7)])
def test_quantize_weight_per_channel_formula(bits, qmax):
    w = weight()
    q, s = E.quantize_weight(w, bits)
    wf = w.float()
    s_ref = wf.abs().amax(1, keepdim=True) / qmax
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (16, 1)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert torch.equal(q, torch.round(wf / s_ref).clamp(-qmax, qmax).to(torch.int8))
    assert int(q.min()) >= -qmax and int(q.max()) <= qmax


def test_quantize_weight_per_group_formula():
    w = weight(8, 64)
    q, s = E.quantize_weight(w, 4, group_size=16)
    assert s.shape == (8, 4)
    wg = w.float().reshape(8, 4, 16)
    s_ref = wg.abs().amax(-1) / 7
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert torch.equal(q, torch.round(wg / s_ref[..., None]).clamp(-7, 7).to(torch.int8).reshape(8, 64))


def test_quantize_weight_never_most_negative_code():
    # row max |w| reached by a negative value: -absmax/s = -127 exactly, and a larger given scale clamps
    w = torch.tensor([[-1.0, 0.5, 0.25], [0.3, -0.9, 0.9]])
    q, _ = E.quantize_weight(w, 8)
    assert int(q.min()) == -127
    q, _ = E.quantize_weight(w, 8, scale=torch.full((2, 1), 1e-4))
    assert int(q.min()) == -127 and int(q.max()) == 127
    q4, _ = E.quantize_weight(w, 4, scale=torch.full((2,), 1e-3))
    assert int(q4.min()) == -7 and int(q4.max()) == 7


def test_quantize_weight_zero_rows_and_groups():
    w = weight(4, 32)
    w[1] = 0
    w[2, 16:] = 0
    q, s = E.quantize_weight(w, 8)
    assert s[1, 0] == 1.0 and (q[1] == 0).all()
    q, s = E.quantize_weight(w, 4, group_size=16)
    assert s[1].tolist() == [1.0, 1.0] and s[2, 1] == 1.0 and (q[2, 16:] == 0).all()
    assert torch.isfinite(s).all() and (s > 0).all()


def test_quantize_weight_given_scale_and_errors():
    w = weight(4, 32)
    s_in = torch.full((4, 1), 0.002)
    q, s = E.quantize_weight(w, 8, scale=s_in)
    assert torch.equal(s, s_in)
    assert torch.equal(q, torch.round(w.float() / 0.002).clamp(-127, 127).to(torch.int8))
    with pytest.raises(ValueError, match="multiple of group_size"):
        E.quantize_weight(w, 8, group_size=12)
    with pytest.raises(ValueError, match="scale shape"):
        E.quantize_weight(w, 8, group_size=16, scale=s_in)
    with pytest.raises(ValueError, match="finite and > 0"):
        E.quantize_weight(w, 8, scale=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="bits"):
        E.quantize_weight(w, 3)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        E.quantize_weight(w, 8)


# ---- static activation parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xmin,xmax", [(-3.1, 2.7), (0.5, 4.0), (-6.0, -1.0), (-1e-3, 1e-3), (-100.0, 7.3)])
def test_static_activation_params(dtype, xmin, xmax):
    s, o = E.static_activation_params(xmin, xmax, dtype)
    assert s.dtype == o.dtype == torch.float32 and s.shape == o.shape == (1,)
    sv, ov = s.item(), o.item()
    assert sv > 0 and s.to(dtype).float().item() == sv          # exactly representable in the model dtype
    lo, hi = min(xmin, 0.0), max(xmax, 0.0)
    rounded = torch.tensor((hi - lo) / 255, dtype=torch.float64).to(dtype).float().item()
    assert sv == max(rounded, E.min_activation_scale(dtype))
    assert torch.isfinite(torch.tensor(1 / sv).to(dtype).float())   # the engine's dtype(1/s)
    assert ov == round(ov) and -128 <= ov <= 127
    assert ov == min(max(round(-128 - lo / sv), -128), 127)
    # the range (and 0) is covered: quantize-dequantize error stays within about one step
    x = torch.tensor([lo, 0.0, hi], dtype=torch.float64)
    xq = torch.round(x / sv + ov).clamp(-128, 127)
    assert ((xq - ov) * sv - x).abs().max() <= 1.01 * sv
    assert (xq[1] - ov) * sv == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_static_activation_params_degenerate(dtype):
    assert E.min_activation_scale(torch.float16) == 2.0 ** -15
    assert E.min_activation_scale(torch.bfloat16) == 2.0 ** -127
    for lo, hi in [(0.0, 0.0), (0.0, 1e-30), (-1e-7, 0.0)]:
        s, o = E.static_activation_params(lo, hi, dtype)
        sv = s.item()
        assert sv > 0 and s.to(dtype).float().item() == sv
        recip = torch.tensor(1 / sv).to(dtype)
        assert torch.isfinite(recip.float())                  # the engine's dtype(1/s) must stay finite
        assert -128 <= o.item() <= 127
    with pytest.raises(ValueError):
        E.static_activation_params(1.0, -1.0, dtype)
    with pytest.raises(ValueError):
        E.static_activation_params(float("nan"), 1.0, dtype)


def test_static_activation_params_fp16_overflow_and_bad_dtype():
    with pytest.raises(QCError, match="too wide"):
        E.static_activation_params(-1e9, 1e9, torch.float16)
    with pytest.raises(QCError, match="float16 or bfloat16"):
        E.static_activation_params(-1, 1, torch.float32)


# ---- deq_scale ----------------------------------------------------------------------------------------------------
def test_encode_deq_scale_fp16_is_int64_bit_copy():
    deq = torch.tensor([1e-4, 3.5e-5, 0.25, 7.0], dtype=torch.float32)
    t = E.encode_deq_scale(deq, torch.float16)
    ref = np.frombuffer(deq.numpy().tobytes(), np.int32).astype(np.int64)
    assert t.dtype == torch.int64 and t.shape == (4,)
    assert np.array_equal(t.numpy(), ref)
    assert ((t >> 32) == 0).all()
    assert torch.equal(E.decode_deq_scale(t), deq)


def test_encode_deq_scale_bf16_is_float32():
    deq = torch.tensor([1e-4, 0.25])
    t = E.encode_deq_scale(deq, "bfloat16")
    assert t.dtype == torch.float32 and torch.equal(t, deq)
    assert torch.equal(E.decode_deq_scale(t), deq)


def test_deq_scale_errors():
    with pytest.raises(ValueError):
        E.encode_deq_scale(torch.tensor([0.0]), torch.float16)
    with pytest.raises(ValueError, match="high 32 bits"):
        E.decode_deq_scale(torch.tensor([(1 << 46) | 123], dtype=torch.int64))


# ---- W8A8 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_encode_w8a8(dtype, with_bias):
    n, k = 16, 64
    w = weight(n, k, dtype=dtype)
    b = (torch.randn(n) * 0.1).to(dtype) if with_bias else None
    s_x, o_x = E.static_activation_params(-2.0, 3.0, dtype)
    out = E.encode_w8a8(w, b, s_x, o_x, dtype)
    keys = {"weight", "input_scale", "input_offset", "deq_scale", "quant_bias", "weight_scale", "weight_offset"}
    assert set(out) == keys | ({"bias"} if with_bias else set())
    q, s_w = E.quantize_weight(w, 8, model_dtype=dtype)   # codes against the scale rounded to the model dtype
    assert torch.equal(out["weight_scale"], s_w) and torch.equal(s_w.to(dtype).float(), s_w)
    assert out["weight"].dtype == torch.int8 and torch.equal(out["weight"], q)
    assert out["input_scale"].shape == out["input_offset"].shape == (1,)
    assert out["input_scale"].dtype == out["input_offset"].dtype == torch.float32
    assert out["weight_scale"].shape == out["weight_offset"].shape == (n, 1)
    assert (out["weight_offset"] == 0).all()
    assert out["deq_scale"].shape == (n,)
    assert out["deq_scale"].dtype == (torch.int64 if dtype == torch.float16 else torch.float32)
    deq = E.decode_deq_scale(out["deq_scale"])
    assert torch.equal(deq, s_x * s_w[:, 0])
    bb = b.float().double() if with_bias else torch.zeros(n, dtype=torch.float64)
    qb_ref = torch.round(bb / deq.double() - o_x.double() * q.double().sum(1)).to(torch.int32)
    assert out["quant_bias"].dtype == torch.int32 and out["quant_bias"].shape == (n,)
    assert torch.equal(out["quant_bias"], qb_ref)
    if with_bias:
        assert out["bias"].dtype == torch.float32 and out["bias"].shape == (n,)
        assert E.tensor_quant_type("bias", E.W8A8) == "FLOAT"


def test_w8a8_engine_math_matches_float_linear():
    """Engine math of spec 3 (x_q with offset, int32 GEMM + quant_bias, * deq) reproduces x @ W^T + b."""
    n, k = 32, 64
    w, b = weight(n, k, seed=1, dtype=torch.float32), torch.randn(n) * 0.1
    x = torch.rand(8, k) * 5 - 1.5                         # asymmetric range [-1.5, 3.5]
    s_x, o_x = E.static_activation_params(x.min().item(), x.max().item(), torch.bfloat16)
    out = E.encode_w8a8(w, b, s_x, o_x, torch.bfloat16)
    xq = torch.clamp(torch.round(x / s_x + o_x), -128, 127).double()
    acc = xq @ out["weight"].double().T + out["quant_bias"].double()
    y = acc * E.decode_deq_scale(out["deq_scale"]).double()
    ref = (x.double() @ w.double().T) + b.double()
    assert (y - ref).abs().max() < 0.05 * ref.abs().max()


def test_encode_w8a8_precomputed_codes_and_mix():
    w = weight(8, 32)
    q, s = E.quantize_weight(w, 8, model_dtype=torch.float16)
    s_x, o_x = torch.tensor([0.02]), torch.tensor([-5.0])
    a = E.encode_w8a8(w, None, s_x, o_x, torch.float16)
    b = E.encode_w8a8(None, None, s_x, o_x, torch.float16, q=q, scale=s)
    c = E.encode_w8a8_mix(None, None, 0.02, -5, torch.float16, q=q, scale=s[:, 0])
    for other in (b, c):
        assert set(other) == set(a) and all(torch.equal(a[key], other[key]) for key in a)
    # input_scale 0.02 is held as fp16(0.02) by the engines: stored so, and deq_scale is formed from it
    assert a["input_scale"].item() == torch.tensor(0.02).half().item() != 0.02
    assert torch.equal(E.decode_deq_scale(a["deq_scale"]), a["input_scale"] * s[:, 0])
    with pytest.raises(ValueError, match="not representable"):  # codes computed against an unrounded scale
        E.encode_w8a8(None, None, s_x, o_x, torch.float16, q=q, scale=s + 1e-7)
    with pytest.raises(ValueError, match="symmetric range"):
        E.encode_w8a8(None, None, s_x, o_x, torch.float16, q=torch.full((8, 32), -128, dtype=torch.int8), scale=s)
    with pytest.raises(ValueError, match="scale"):
        E.encode_w8a8(None, None, s_x, o_x, torch.float16, q=q)
    with pytest.raises(ValueError, match="input_offset"):
        E.encode_w8a8(w, None, s_x, torch.tensor([0.5]), torch.float16)
    with pytest.raises(ValueError, match="input_scale"):
        E.encode_w8a8(w, None, torch.tensor([0.0]), o_x, torch.float16)
    with pytest.raises(ValueError, match="per-tensor"):
        E.encode_w8a8(w, None, torch.ones(2), o_x, torch.float16)


# ---- weight-only and dynamic --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_w8a8_dynamic(dtype):
    w, b = weight(8, 32), torch.randn(8)
    out = E.encode_w8a8_dynamic(w, b, dtype)
    assert set(out) == {"weight", "weight_scale", "weight_offset", "bias"}
    q, s = E.quantize_weight(w, 8, model_dtype=dtype)
    assert torch.equal(out["weight"], q) and torch.equal(out["weight_scale"], s)
    assert out["weight_offset"].shape == (8, 1) and (out["weight_offset"] == 0).all()
    assert torch.equal(out["bias"], b.to(dtype).float())   # the engines hold the Linear bias in the model dtype


@pytest.mark.parametrize("group_size", [0, 16])
def test_encode_w8a16(group_size):
    w = weight(8, 64)
    out = E.encode_w8a16(w, None, group_size, torch.bfloat16)
    cols = 1 if group_size == 0 else 64 // group_size
    assert set(out) == {"weight", "weight_scale", "weight_offset"}
    assert out["weight"].shape == (8, 64) and out["weight"].dtype == torch.int8
    assert out["weight_scale"].shape == out["weight_offset"].shape == (8, cols)
    assert out["weight_scale"].dtype == torch.float32 and (out["weight_offset"] == 0).all()


@pytest.mark.parametrize("group_size", [0, 16])
def test_encode_w4a16_packing(group_size):
    n, k = 8, 64
    w = weight(n, k)
    q, s = E.quantize_weight(w, 4, group_size, model_dtype=torch.float16)
    out = E.encode_w4a16(w, torch.ones(n), group_size, torch.float16)
    p = out["weight"]
    assert p.dtype == torch.int8
    if group_size == 0:                     # per-channel: packed along k
        assert p.shape == (n, k // 2) and torch.equal(nibbles(p, 1), q.to(torch.int16))
    else:                                   # per-group: packed along n
        assert p.shape == (n // 2, k) and torch.equal(nibbles(p, 0), q.to(torch.int16))
    assert out["weight_scale"].shape == out["weight_offset"].shape == s.shape
    assert out["bias"].shape == (n,)
    assert int(q.min()) >= -7


def test_encode_w4a16_odd_packing_dim_rejected():
    with pytest.raises(ValueError, match="even"):
        E.encode_w4a16(weight(8, 33), None, 0, torch.bfloat16)
    with pytest.raises(ValueError, match="even"):
        E.encode_w4a16(weight(7, 32), None, 16, torch.bfloat16)


def msmodelslim_scale_bias(q, s1, s2, group, row_parallel):
    """msModelSlim's saver, written out (llm_ptq save/complex_quantifier.py, W4A8_DYNAMIC branch of
    generate_weight_of_linear_module + process_scale(name, bias, 16)): bf16 scales, float32 sums."""
    n, k = q.shape
    weight = q.reshape(-1, group).to(torch.float32)
    first = (weight * s2.to(torch.bfloat16).reshape(-1, 1)).reshape(n, k)
    deq = first * s1.to(torch.bfloat16)
    if not row_parallel:
        return 8 * deq.sum(dim=1, keepdim=True)
    return (8 * deq.reshape(-1, k // 16).sum(dim=1, keepdim=True)).reshape(n, -1)


@pytest.mark.parametrize("row_parallel", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_w4a8_dynamic_two_stage(row_parallel, dtype):
    n, k, g = 16, 128, 32
    w = weight(n, k)
    w[3, 32:64] = 0                                      # a zero group: scale 1, codes 0
    out = E.encode_w4a8_dynamic(w, None, row_parallel, g, dtype)
    assert set(out) == {"weight", "weight_scale", "weight_offset", "weight_scale_second", "weight_offset_second",
                        "scale_bias"}
    s1, s2 = out["weight_scale"], out["weight_scale_second"]
    assert s1.shape == out["weight_offset"].shape == (n, 1) and s2.shape == out["weight_offset_second"].shape == (n, 4)
    assert all(out[t].dtype == torch.float32 for t in ("weight_scale", "weight_scale_second", "scale_bias"))
    assert (out["weight_offset"] == 0).all() and (out["weight_offset_second"] == 0).all()
    # the per-group scale both engines form, dtype(dtype(s1) * dtype(s2)), is absmax_group / 7 rounded to dtype
    S = (s1.to(dtype) * s2.to(dtype)).float()
    absmax = w.float().reshape(n, 4, g).abs().amax(-1)
    assert torch.equal(S, torch.where(absmax > 0, absmax / 7, torch.ones_like(absmax)).to(dtype).float())
    assert torch.equal(S, (s1 * s2).to(dtype).float())   # vLLM-Ascend: f32(s1) * s2, cast to x's dtype
    assert torch.equal(s1.to(dtype).float(), s1) and torch.equal(s2.to(dtype).float(), s2)
    assert torch.equal(torch.log2(s1), torch.round(torch.log2(s1)))   # stage one: a power of two near absmax/127
    ratio = s1 / (w.float().abs().amax(1, keepdim=True) / 127)
    rows = [r for r in range(n) if r != 3]             # row 3's zero group (scale 1) sets its stage-one scale
    assert ((ratio[rows] > 0.7) & (ratio[rows] < 1.42)).all()
    # codes against S, packed along n (rows 2i / 2i+1 in one byte)
    q = nibbles(out["weight"], 0)
    assert out["weight"].shape == (n // 2, k)
    ref = torch.round(w.float().reshape(n, 4, g) / S[..., None]).clamp(-7, 7).reshape(n, k)
    assert torch.equal(q.float(), ref) and (q[3, 32:64] == 0).all()
    sb = out["scale_bias"]
    assert sb.shape == ((n, 16) if row_parallel else (n, 1))
    torch.testing.assert_close(sb, msmodelslim_scale_bias(q.float(), s1, s2, g, row_parallel), rtol=0, atol=0) \
        if dtype == torch.bfloat16 else torch.testing.assert_close(
            sb, 8 * (q.float() * S.repeat_interleave(g, 1)).reshape(n, 16 if row_parallel else 1, -1).sum(-1))


def test_encode_w4a8_dynamic_refusals():
    with pytest.raises(ValueError, match="per-group only"):
        E.encode_w4a8_dynamic(weight(8, 64), None, False, 0, torch.bfloat16)
    with pytest.raises(ValueError, match="bias"):
        E.encode_w4a8_dynamic(weight(8, 64), torch.ones(8), False, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="n % 8"):
        E.encode_w4a8_dynamic(weight(6, 64), None, False, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="k % 16"):
        E.encode_w4a8_dynamic(weight(8, 40), None, True, 8, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_two_stage_scale_is_exact_over_the_whole_range(dtype):
    # per-group scales over many binades (and the dtype's extremes) come back bit for bit from both products
    g = torch.Generator().manual_seed(5)
    lo, hi = (-24, 15) if dtype == torch.float16 else (-120, 120)
    S = torch.exp2(torch.randint(lo, hi, (64, 8), generator=g).float()) * (1 + torch.rand(64, 8, generator=g))
    S = E.engine_scale(S, dtype)
    s1, s2 = E.split_two_stage_scale(S, dtype)
    assert torch.equal((s1.to(dtype) * s2.to(dtype)).float(), S)
    assert torch.equal((s1 * s2).to(dtype).float(), S)
    assert torch.isfinite(s2).all() and (s2 > 0).all()


# ---- numerics as loaded -------------------------------------------------------------------------------------------
ENCODERS = {
    E.W8A8: lambda w, b, dt: E.encode_w8a8(w, b, *E.static_activation_params(-1.3, 2.9, dt), dt),
    E.W8A8_MIX: lambda w, b, dt: E.encode_w8a8_mix(w, b, *E.static_activation_params(-1.3, 2.9, dt), dt),
    E.W8A8S: lambda w, b, dt: E.encode_w8a8s(w, b, *E.static_activation_params(-1.3, 2.9, dt), dt),
    E.W8A8_DYNAMIC: lambda w, b, dt: E.encode_w8a8_dynamic(w, b, dt),
    E.W8A16: lambda w, b, dt: E.encode_w8a16(w, b, 32, dt),
    E.W4A16: lambda w, b, dt: E.encode_w4a16(w, b, 32, dt),
    E.W4A8_DYNAMIC: lambda w, b, dt: E.encode_w4a8_dynamic(w, None, True, 32, dt),
}


@pytest.mark.parametrize("quant", sorted(ENCODERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_tensors_the_engines_hold_in_the_model_dtype_are_stored_exact(quant, dtype):
    """Every tensor ENGINE_MODEL_DTYPE lists is float32 holding a value of the model dtype (the engines' cast on
    load is the identity), every other float tensor is one the engines keep in float32, and the weight codes are
    the rounding of W against the stored (rounded) scale."""
    w = weight(16, 64, seed=3, dtype=torch.float32) * 1.37     # scales not representable before rounding
    b = torch.randn(16, generator=torch.Generator().manual_seed(4)) * 0.3
    out = ENCODERS[quant](w, b, dtype)
    held = E.ENGINE_MODEL_DTYPE[quant]
    for suffix, t in out.items():
        if suffix in held:
            assert t.dtype == torch.float32 and torch.equal(t.to(dtype).float(), t), (quant, suffix)
        elif t.is_floating_point():
            assert suffix in ("deq_scale", "scale_bias"), (quant, suffix)  # kept float32 by both engines
    unrounded = E.quantize_weight(w, 8)[1]
    assert not torch.equal(unrounded.to(dtype).float(), unrounded)            # the rounding is not a no-op here
    if quant in (E.W8A8, E.W8A8_MIX, E.W8A8_DYNAMIC):
        assert torch.equal(out["weight"], torch.round(w / out["weight_scale"]).clamp(-127, 127).to(torch.int8))


def test_engine_scale_keeps_scales_positive():
    tiny = torch.tensor([[1e-30], [3e-8], [0.5]])
    r = E.engine_scale(tiny, torch.float16)
    assert (r > 0).all() and r[0, 0] == 2.0 ** -24 and r[2, 0] == 0.5
    assert E.engine_scale(torch.tensor([1e-45]), torch.bfloat16).item() == 2.0 ** -133
    with pytest.raises(ValueError, match="out of range"):
        E.engine_float(torch.tensor([1e6]), torch.float16)


def test_engine_scale_through_float16_is_exact_in_both():
    # a bf16 scale below float16's normal range (2**-14) rounded to bf16, then float16: exact in both dtypes;
    # 0 after float16 (below 2**-25) becomes 2**-24, the smallest value both hold; above float16's range: an error
    s = torch.tensor([[1.4e-6, 3.3e-7, 2e-9, 5e-5, 0.25]])
    r = E.engine_scale(s, torch.bfloat16, also=(torch.float16,))
    assert torch.equal(r.to(torch.bfloat16).float(), r) and torch.equal(r.half().float(), r)
    assert r[0, 2] == 2.0 ** -24 and torch.equal(r[:, 3:], E.engine_scale(s[:, 3:], torch.bfloat16))
    assert not torch.equal(r[:, :2], E.engine_scale(s[:, :2], torch.bfloat16))   # here the float16 cast matters
    assert E.is_engine_exact(r, torch.bfloat16, also=(torch.float16,))
    assert not E.is_engine_exact(E.engine_scale(s, torch.bfloat16), torch.bfloat16, also=(torch.float16,))
    with pytest.raises(ValueError, match="out of range for torch.float16"):
        E.engine_scale(torch.tensor([7e4]), torch.bfloat16, also=(torch.float16,))


def test_encode_w4a8_dynamic_expert_scale_is_the_fused_moe_scale():
    """A routed expert's per-group scale as vLLM-Ascend's AscendW4A8DynamicFusedMoEMethod.process_scale (and
    MindIE atb's W4A8LinearDynamic.process_scale on a 3-D expert stack) form it, through float16, equals the
    graph's kernels.two_stage_scale; a dense Linear's scale is not rounded through float16 (those engines'
    dense paths do not: EXPERT_SCALE_ALSO)."""
    from qcompiler.backends.ascend.kernels import two_stage_scale
    w = weight(16, 64)
    w[2, :32] *= 1e-4                                   # group scale ~1e-6: float16 holds it on a 2**-24 grid
    w[3, 32:] *= 1e-7                                   # ~1e-9: float16 flushes it to 0
    def moe_scale(t):
        return (t["weight_scale"] * t["weight_scale_second"]).to(torch.float16).to(torch.float32)
    expert = E.encode_w4a8_dynamic(w, None, False, 32, torch.bfloat16, expert=True)
    graph = two_stage_scale(expert["weight_scale"], expert["weight_scale_second"], torch.bfloat16)
    assert torch.equal(moe_scale(expert), graph) and (graph > 0).all()
    dense = E.encode_w4a8_dynamic(w, None, False, 32, torch.bfloat16)
    assert not torch.equal(moe_scale(dense), two_stage_scale(dense["weight_scale"], dense["weight_scale_second"],
                                                             torch.bfloat16))
    rows = [r for r in range(16) if r not in (2, 3)]   # only the tiny groups' rows change
    assert all(torch.equal(expert[k][rows], dense[k][rows]) for k in ("weight_scale", "weight_scale_second",
                                                                       "scale_bias"))
    assert torch.equal(expert["weight"][[r // 2 for r in rows if r // 2 != 1]],
                       dense["weight"][[r // 2 for r in rows if r // 2 != 1]])
    # precomputed codes (gptq) against a scale float16 does not hold: refused for an expert, not for a dense Linear
    q, s = E.quantize_weight(w, 4, 32, model_dtype=torch.bfloat16)
    E.encode_w4a8_dynamic(None, None, False, 32, torch.bfloat16, q=q, scale=s)
    with pytest.raises(ValueError, match="float16"):
        E.encode_w4a8_dynamic(None, None, False, 32, torch.bfloat16, q=q, scale=s, expert=True)
    # float16 models: float16 already holds every scale; the expert encodes bit for bit as the dense Linear does
    e16, d16 = (E.encode_w4a8_dynamic(w.half(), None, True, 32, torch.float16, expert=x) for x in (True, False))
    assert all(torch.equal(e16[k], d16[k]) for k in e16)


def test_bias_shape_checked():
    with pytest.raises(ValueError, match="bias shape"):
        E.encode_w8a8_dynamic(weight(8, 32), torch.ones(7), torch.bfloat16)


# ---- model-level names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("types,expected", [
    ([], "FLOAT"),
    (["FLOAT", "C8", "FAQuant"], "FLOAT"),
    (["FLOAT", "W8A16", "W8A8_DYNAMIC"], "W8A8_DYNAMIC"),
    (["W8A8_DYNAMIC", "W8A8", "W8A8_MIX"], "W8A8"),
    (["W8A8_DYNAMIC", "W8A8_MIX", "FLOAT"], "W8A8_MIX"),
    (["W16A16S", "FLOAT"], "W16A16S"),
    (["W4A16", "FLOAT"], "W4A16"),
    (["W4A16", "W8A16"], "W4A16"),
    (["W4A8_DYNAMIC", "W8A8_DYNAMIC", "W4A16"], "W4A8_DYNAMIC"),
    (["W8A8S", "W8A8", "FLOAT"], "W8A8S"),
])
def test_model_quant_type(types, expected):
    assert E.model_quant_type(types) == expected


def test_model_quant_type_unknown_and_mindie_names():
    with pytest.raises(ValueError):
        E.model_quant_type(["W3A8"])
    for t in ("W8A8", "W8A8_DYNAMIC", "W8A8_MIX", "W8A16", "W4A16", "W4A8_DYNAMIC", "W8A8S"):
        assert E.mindie_quantize_name(t) == t.lower()
    assert E.mindie_quantize_name("FLOAT") is None
    with pytest.raises(ValueError):
        E.mindie_quantize_name("C8")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_encode_w4a16_moe_layout_and_math(dtype):
    """W4A16 on a routed expert: vLLM-Ascend's W4A16 fused-MoE tensors (methods/w4a16.py AscendW4A16FusedMoEMethod):
    weight_packed int32 [n, k/8], weight_scale / weight_offset (zeros) [n, k/g] in the model dtype, weight_shape
    int32 [n, k]; the packed codes are exactly the per-group codes of quantize_weight, so dequantizing them as the
    engine does ((w + 0) * scale) is within half a scale of the float weight."""
    from qcompiler.backends.ascend.int4 import unpack_int4_int32
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    t = E.encode_w4a16_moe(w, None, 32, dtype)
    assert set(t) == {"weight_packed", "weight_scale", "weight_offset", "weight_shape"}
    assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (24, 8)
    assert t["weight_scale"].dtype == dtype and t["weight_scale"].shape == (24, 2)
    assert t["weight_offset"].dtype == dtype and not t["weight_offset"].any()
    assert t["weight_shape"].dtype == torch.int32 and t["weight_shape"].tolist() == [24, 64]
    q, s = E.quantize_weight(w, 4, 32, model_dtype=dtype)
    assert torch.equal(unpack_int4_int32(t["weight_packed"]), q) and torch.equal(t["weight_scale"].float(), s)
    deq = (q.float().reshape(24, 2, 32) * s.unsqueeze(-1)).reshape(24, 64)
    assert ((deq - w).abs() <= s.repeat_interleave(32, 1) / 2 + 1e-6).all()


def test_encode_w4a16_moe_refusals():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="per-group only"):
        E.encode_w4a16_moe(w, None, 0, torch.bfloat16)
    with pytest.raises(ValueError, match="bias"):
        E.encode_w4a16_moe(w, torch.zeros(8), 32, torch.bfloat16)
    with pytest.raises(ValueError, match="k % 8"):
        E.encode_w4a16_moe(torch.randn(8, 36), None, 12, torch.bfloat16)
