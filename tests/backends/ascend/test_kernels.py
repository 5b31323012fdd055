"""torch.ops.qc.* (Ascend fused quantized ops) against formulas written here from the spec.

The expected values are computed with numpy (IEEE float32 arithmetic, exact int64 matmul, np.rint =
half-to-even) or torch written independently of kernels.py. Tolerance is zero (torch.equal) wherever
the spec fixes every rounding (integer accumulation, float32 epilogues, one cast to the output dtype):
a kernel that rounds differently must fail. The one non-exact spot is flagged where it occurs.
"""
import ast
import inspect
import io
import math
import sys
import types

import numpy as np
import pytest
import torch

from qcompiler.backends.ascend import kernels, ops
from qcompiler.backends.ascend.int4 import pack_int4, pack_int4_int32

qc = torch.ops.qc
DTYPES = [torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------------------------------
# helpers written from the spec, independent of kernels.py


def gen(seed):
    return torch.Generator().manual_seed(seed)


def rand_int8(*shape, seed, lo=-128, hi=128):
    return torch.randint(lo, hi, shape, generator=gen(seed), dtype=torch.int8)


def encode_deq_int64(f32: torch.Tensor) -> torch.Tensor:
    """The spec's int64 deq_scale encoding (fp16 artifacts)."""
    return torch.from_numpy(np.frombuffer(f32.numpy().tobytes(), np.int32).astype(np.int64))


def np_acc(x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """Exact int64 x @ w.T."""
    return x.numpy().astype(np.int64) @ w.numpy().astype(np.int64).T


def expect_quantize(x, scale, offset):
    dt = x.dtype
    # dtype(1 / dtype(s)): the float64 quotient rounded straight to dt.
    recip = torch.tensor(1.0 / float(scale.to(dt)), dtype=torch.float64).to(dt)
    xf = x.float().numpy()
    y = np.rint(xf * np.float32(float(recip)) + np.float32(float(offset)))
    return torch.from_numpy(np.clip(y, -128, 127).astype(np.int8))


def expect_quant_matmul(x, w, deq_f32, bias, out_dtype):
    acc = np_acc(x, w) + bias.numpy().astype(np.int64)
    y = acc.astype(np.float32) * deq_f32.numpy()
    return torch.from_numpy(y).to(out_dtype)


def expect_dynamic_quant(x):
    xf = x.float().numpy()
    s = (np.abs(xf).max(axis=-1) / np.float32(127)).astype(np.float32)
    s[s == 0] = 1
    y = np.clip(np.rint(xf / s[..., None]), -128, 127).astype(np.int8)
    return torch.from_numpy(y), torch.from_numpy(s)


def expect_pertoken(x, w, ws, pts, bias, out_dtype):
    # the engines hold weight_scale and the Linear bias in the model (= output) dtype
    ws_held = ws.to(out_dtype).float().numpy().reshape(-1)
    y = np_acc(x, w).astype(np.float32) * ws_held * pts.numpy()[..., None]
    if bias is not None:
        y = y + bias.to(out_dtype).float().numpy()
    return torch.from_numpy(y.astype(np.float32)).to(out_dtype)


def expect_pergroup(x, w, s1, s2, pts, g, out_dtype):
    """W4A8_DYNAMIC per-group, written out: S = dtype(dtype(s1) * dtype(s2)) (the engines' product), exact int
    group sums, float32 sum over groups in order, times the per-token scale, then the output dtype."""
    S = (s1.to(out_dtype) * s2.to(out_dtype)).float().numpy()
    xs, ws = x.numpy().astype(np.int64), w.numpy().astype(np.int64)
    y = None
    for j in range(S.shape[1]):
        acc = (xs[..., j * g:(j + 1) * g] @ ws[:, j * g:(j + 1) * g].T).astype(np.float32)
        term = (acc * S[:, j]).astype(np.float32)
        y = term if y is None else (y + term).astype(np.float32)
    y = (y * pts.numpy()[..., None]).astype(np.float32)
    return torch.from_numpy(y).to(out_dtype)


def expect_weight_quant(x, w_int8, scale, offset, bias, group_size):
    dt, k = x.dtype, x.shape[-1]
    cols = torch.arange(k) // group_size if group_size else torch.zeros(k, dtype=torch.long)
    big_s, big_o = scale[:, cols], offset[:, cols]  # [n, k]: group j covers columns j*g .. j*g+g-1
    W = (w_int8.to(dt) + big_o.to(dt)) * big_s.to(dt)  # NPU semantics: + offset
    y = x @ W.T
    return y if bias is None else y + bias.to(dt)


# --------------------------------------------------------------------------------------------------
# qc::quantize


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale,offset", [(0.0173, 0.0), (0.05, -3.0), (0.3, 12.0)])
def test_quantize_random_matches_formula(dtype, scale, offset):
    x = (torch.randn(4, 7, 64, generator=gen(1)) * 3).to(dtype)
    s, o = torch.tensor([scale]), torch.tensor([offset])
    y = qc.quantize(x, s, o)
    assert y.dtype == torch.int8 and y.shape == x.shape
    assert torch.equal(y, expect_quantize(x, s, o))  # exact: every rounding is fixed by the spec


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_ties_round_half_to_even(dtype):
    # s = 0.5 -> recip = 2 exactly, so x * recip is exactly k + 0.5 for these x.
    x = torch.tensor([1.25, 1.75, -1.25, -1.75, 0.25, 0.75, -0.25], dtype=dtype)
    s = torch.tensor([0.5])
    assert qc.quantize(x, s, torch.tensor([0.0])).tolist() == [2, 4, -2, -4, 0, 2, 0]
    # The offset is added before rounding: 2.5+1=3.5->4, 3.5+1=4.5->4, -2.5+1=-1.5->-2, ...
    assert qc.quantize(x, s, torch.tensor([1.0])).tolist() == [4, 4, -2, -2, 2, 2, 0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_clamps(dtype):
    s = torch.tensor([0.5])
    x = torch.tensor([1000.0, -1000.0, 63.75, -64.5, 63.25, -64.0], dtype=dtype)
    # 127.5 -> 128 -> 127; -129 -> -128; 126.5 -> 126 (tie, even); -128 stays.
    assert qc.quantize(x, s, torch.tensor([0.0])).tolist() == [127, -128, 127, -128, 126, -128]
    # The offset can push an in-range value over the edge: 120 + 10 -> 127.
    assert qc.quantize(torch.tensor([60.0], dtype=dtype), s, torch.tensor([10.0])).tolist() == [127]


@pytest.mark.parametrize(
    "dtype,recip", [(torch.bfloat16, 3.328125), (torch.float16, 3.33203125)]
)
def test_quantize_uses_reciprocal_rounded_to_dtype(dtype, recip):
    # s = 0.3: dtype(1 / dtype(0.3)) is 3.328125 (bf16) / 3.33203125 (fp16), not 1/0.3 = 3.333...
    s = torch.tensor([0.3])
    assert float((1 / s.to(dtype)).to(dtype)) == recip != 1 / 0.3
    x = torch.tensor([2.25, -2.25], dtype=dtype)
    # 2.25 * recip = 7.488 (bf16) / 7.497 (fp16) -> 7, while 2.25 / 0.3 = 7.5 exactly -> 8.
    assert [round(2.25 / 0.3), round(-2.25 / 0.3)] == [8, -8]
    assert qc.quantize(x, s, torch.tensor([0.0])).tolist() == [7, -7]


# --------------------------------------------------------------------------------------------------
# qc::quant_matmul


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("shape", [(3, 5, 96, 40), (1, 1, 96, 40), (2, 17, 64, 24)])
def test_quant_matmul_matches_formula(dtype, shape):
    b, m, k, n = shape
    x, w = rand_int8(b, m, k, seed=2), rand_int8(n, k, seed=3)
    bias = torch.randint(-50000, 50000, (n,), generator=gen(4), dtype=torch.int32)
    deq = torch.rand(n, generator=gen(5)) * 1e-4 + 1e-6
    y = qc.quant_matmul(x, w, deq, bias, dtype)
    assert y.dtype == dtype and y.shape == (b, m, n)
    assert torch.equal(y, expect_quant_matmul(x, w, deq, bias, dtype))  # exact


@pytest.mark.parametrize("dtype", DTYPES)
def test_deq_scale_int64_encoding_equals_float32(dtype):
    x, w = rand_int8(9, 32, seed=6), rand_int8(16, 32, seed=7)
    bias = torch.randint(-1000, 1000, (16,), generator=gen(8), dtype=torch.int32)
    deq = torch.rand(16, generator=gen(9)) * 1e-3
    y_f32 = qc.quant_matmul(x, w, deq, bias, dtype)
    y_i64 = qc.quant_matmul(x, w, encode_deq_int64(deq), bias, dtype)
    assert torch.equal(y_f32, y_i64)
    # Reading the int64 by value (the spec's "silently converted" failure) would be garbage.
    assert not torch.equal(y_f32, qc.quant_matmul(x, w, encode_deq_int64(deq).float(), bias, dtype))


def test_decode_deq_scale_bits_including_sign_bit():
    vals = torch.tensor([1e-4, 3.0e-7, -2.5, 0.0, float("inf")], dtype=torch.float32)
    decoded = kernels.decode_deq_scale(encode_deq_int64(vals))
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded.view(torch.int32), vals.view(torch.int32))  # bit for bit
    # Bits above 32 are ignored (only the low 32 carry the float).
    assert torch.equal(kernels.decode_deq_scale(encode_deq_int64(vals) + (5 << 32)), decoded)


def test_quant_matmul_accumulates_exactly_beyond_float32():
    # acc = 127*127*2049 = 33048321: odd and > 2^24, so no float32 holds it, whatever the summation
    # order; bias brings the exact sum to 1, so y == deq_scale only if the accumulation is exact.
    k = 2049
    x, w = torch.full((17, k), 127, dtype=torch.int8), torch.full((8, k), 127, dtype=torch.int8)
    bias = torch.full((8,), 1 - 127 * 127 * k, dtype=torch.int32)
    deq = torch.linspace(0.5, 1.5, 8)
    expected = deq.to(torch.bfloat16).expand(17, 8)
    assert torch.equal(qc.quant_matmul(x, w, deq, bias, torch.bfloat16), expected)  # fast path
    assert torch.equal(kernels.quant_matmul_ref(x, w, deq, bias, torch.bfloat16), expected)


# --------------------------------------------------------------------------------------------------
# qc::dynamic_quant


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_quant_matches_formula(dtype):
    x = (torch.randn(3, 11, 80, generator=gen(10)) * 5).to(dtype)
    y, s = qc.dynamic_quant(x)
    ey, es = expect_dynamic_quant(x)
    assert y.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (3, 11)
    assert torch.equal(s, es) and torch.equal(y, ey)  # exact


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_quant_ties_zero_rows_and_edges(dtype):
    x = torch.tensor(
        [
            [127.0, 2.5, 3.5, -0.5, -1.5, -127.0],  # s = 127/127 = 1: ties go to even
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # zero row: scale 1, zeros out
            [-0.0, 0.0, -0.0, 0.0, 0.0, -0.0],
            [-4.0, 1.0, 2.0, 0.0, 0.0, 0.0],  # the max is negative: -4 -> -127
        ],
        dtype=dtype,
    )
    y, s = qc.dynamic_quant(x)
    assert s[:3].tolist() == [1.0, 1.0, 1.0]
    assert y[0].tolist() == [127, 2, 4, 0, -2, -127]
    assert y[1].tolist() == [0] * 6 and y[2].tolist() == [0] * 6
    assert y[3, 0].item() == -127 and s[3].item() == np.float32(4) / np.float32(127)


# --------------------------------------------------------------------------------------------------
# qc::quant_matmul_pertoken


# float32 output exposes the float32 epilogue unrounded: it pins the order of the two scale products.
@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("packing,n", [(0, 24), (2, 24), (2, 23)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_quant_matmul_pertoken_matches_formula(dtype, packing, n, with_bias):
    k = 64
    x = rand_int8(2, 19, k, seed=11)
    w = rand_int8(n, k, seed=12) if packing == 0 else rand_int8(n, k, seed=12, lo=-8, hi=8)
    stored = w if packing == 0 else pack_int4(w, dim=0)
    ws = torch.rand(n, 1, generator=gen(13)) * 1e-2
    pts = torch.rand(2, 19, generator=gen(14)) * 0.1
    bias = torch.randn(n, generator=gen(15)) if with_bias else None
    y = qc.quant_matmul_pertoken(x, stored, ws, pts, bias, packing, dtype)
    assert y.dtype == dtype and y.shape == (2, 19, n)
    assert torch.equal(y, expect_pertoken(x, w, ws, pts, bias, dtype))  # exact, float32 order fixed


def test_quant_matmul_pertoken_rounds_scale_and_bias_to_the_model_dtype():
    # 0.0123 and 0.31 are not bf16/fp16 values: the kernel computes with dtype(ws) and dtype(bias), as the engines
    x, w = rand_int8(3, 32, seed=16), rand_int8(4, 32, seed=17)
    ws, pts, bias = torch.full((4, 1), 0.0123), torch.ones(3), torch.full((4,), 0.31)
    for dtype in DTYPES:
        y = kernels.quant_matmul_pertoken(x, w, ws, pts, bias, 0, dtype)
        held = torch.from_numpy(np_acc(x, w).astype(np.float32)) * ws.to(dtype).float().T + bias.to(dtype).float()
        assert torch.equal(y, held.to(dtype))
        unrounded = (torch.from_numpy(np_acc(x, w).astype(np.float32)) * ws.T + bias).to(dtype)
        assert not torch.equal(y, unrounded)


# --------------------------------------------------------------------------------------------------
# qc::quant_matmul_pergroup (W4A8_DYNAMIC)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("n,k,g", [(24, 64, 16), (16, 128, 32), (8, 512, 256)])
@pytest.mark.parametrize("lead", [(2, 19), (1,), (70,)])
def test_quant_matmul_pergroup_matches_formula(dtype, n, k, g, lead):
    x = rand_int8(*lead, k, seed=18)
    w = rand_int8(n, k, seed=19, lo=-7, hi=8)
    s1 = torch.exp2(torch.randint(-9, -5, (n, 1), generator=gen(20)).float())
    s2 = torch.rand(n, k // g, generator=gen(21)) * 20 + 0.1       # not dtype values: the kernel rounds them
    pts = torch.rand(*lead, generator=gen(22)) * 0.05
    y = qc.quant_matmul_pergroup(x, pack_int4(w, 0), s1, s2, pts, g, dtype)
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert torch.equal(y, expect_pergroup(x, w, s1, s2, pts, g, dtype))   # bit for bit


def test_quant_matmul_pergroup_exact_at_extremes_and_lowered_matmul_precision():
    # -128 x -8 over a 256-group: every group sum is 262144, exact in float32; float64 sums when the float32
    # matmul precision is lowered (the result must not change)
    n, k, g = 8, 512, 256
    x = torch.full((3, k), -128, dtype=torch.int8)
    w = torch.full((n, k), -8, dtype=torch.int8)
    s1, s2, pts = torch.ones(n, 1), torch.full((n, 2), 2.0 ** -10), torch.ones(3)
    y = kernels.quant_matmul_pergroup(x, pack_int4(w, 0), s1, s2, pts, g, torch.float32)
    assert (y == 2 * 262144 * 2.0 ** -10).all()
    x, w = rand_int8(33, k, seed=23), rand_int8(n, k, seed=24, lo=-8, hi=8)
    s2 = torch.rand(n, 2, generator=gen(25))
    before = torch.get_float32_matmul_precision()
    ref = kernels.quant_matmul_pergroup(x, pack_int4(w, 0), s1, s2, pts.new_ones(33), g, torch.bfloat16)
    try:
        torch.set_float32_matmul_precision("medium")
        low = kernels.quant_matmul_pergroup(x, pack_int4(w, 0), s1, s2, pts.new_ones(33), g, torch.bfloat16)
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(low, ref)


def test_quant_matmul_pergroup_rejects_bad_groups():
    x, w = rand_int8(2, 64, seed=26), pack_int4(rand_int8(8, 64, seed=27, lo=-7, hi=8), 0)
    with pytest.raises(ValueError, match="groups"):
        kernels.quant_matmul_pergroup(x, w, torch.ones(8, 1), torch.ones(8, 3), torch.ones(2), 16, torch.bfloat16)


def test_two_stage_scale_is_the_engines_product():
    s1, s2 = torch.tensor([[0.0123]]), torch.tensor([[3.77, 0.5]])
    for dtype in DTYPES:
        got = kernels.two_stage_scale(s1, s2, dtype)
        assert torch.equal(got, (s1.to(dtype) * s2.to(dtype)).float())
        assert torch.equal(got, (s1.to(dtype).float() * s2.to(dtype).float()).to(dtype).float())  # vLLM-Ascend's


def test_quant_matmul_pertoken_rejects_packing_along_k():
    with pytest.raises(ValueError, match="packing"):
        kernels.quant_matmul_pertoken(
            rand_int8(2, 8, seed=0), rand_int8(4, 4, seed=1), torch.ones(4, 1), torch.ones(2), None, 1,
            torch.bfloat16,
        )


# --------------------------------------------------------------------------------------------------
# qc::weight_quant_matmul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "packing,group_size,n,k",
    [(0, 0, 24, 64), (0, 16, 24, 64), (1, 0, 24, 64), (1, 0, 24, 63), (2, 16, 24, 64), (2, 32, 23, 64),
     (3, 16, 24, 64), (3, 32, 23, 64)],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_quant_matmul_matches_formula(dtype, packing, group_size, n, k, with_bias):
    int4 = packing != 0
    w = rand_int8(n, k, seed=20, lo=-8 if int4 else -128, hi=8 if int4 else 128)
    stored = {0: w, 1: lambda: pack_int4(w, dim=1), 2: lambda: pack_int4(w, dim=0),
              3: lambda: pack_int4_int32(w)}[packing]
    stored = stored() if callable(stored) else stored
    cols = k // group_size if group_size else 1
    scale = torch.rand(n, cols, generator=gen(21)) * 1e-2 + 1e-3
    offset = torch.randint(-3, 4, (n, cols), generator=gen(22)).float() + 0.25
    bias = torch.randn(n, generator=gen(23)) if with_bias else None
    x = torch.randn(2, 5, k, generator=gen(24)).to(dtype)
    y = qc.weight_quant_matmul(x, stored, scale, offset, bias, group_size, packing)
    assert y.dtype == dtype and y.shape == (2, 5, n)
    # Exact: the same dt operations in the same order (dequantize in dt, one dt matmul, dt bias add);
    # a wrong sign of the offset, group broadcast or unpacking changes many elements.
    assert torch.equal(y, expect_weight_quant(x, w, scale, offset, bias, group_size))


def test_weight_quant_matmul_offset_is_added():
    # w = 2, offset 1, scale 0.5: NPU semantics (w + o) * s = 1.5; (w - o) * s would be 0.5.
    x = torch.ones(1, 1, dtype=torch.bfloat16)
    y = qc.weight_quant_matmul(
        x, torch.tensor([[2]], dtype=torch.int8), torch.tensor([[0.5]]), torch.tensor([[1.0]]), None, 0, 0
    )
    assert y.item() == 1.5


def test_weight_quant_matmul_rejects_bad_group_shape():
    with pytest.raises(ValueError, match="antiquant_scale"):
        kernels.weight_quant_matmul(
            torch.ones(1, 64, dtype=torch.bfloat16), rand_int8(8, 64, seed=0), torch.ones(8, 3),
            torch.zeros(8, 3), None, 16, 0,
        )


# --------------------------------------------------------------------------------------------------
# fast paths == reference, bit for bit


@pytest.mark.parametrize(
    "m,k,n",
    [(1, 576, 576), (17, 576, 576), (64, 576, 1536), (16, 64, 32), (3, 7, 5), (0, 8, 8), (4, 0, 8)],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_quant_matmul_equals_reference(m, k, n, dtype, int8_gemm):
    x, w = rand_int8(m, k, seed=30), rand_int8(n, k, seed=31)
    bias = torch.randint(-(2**20), 2**20, (n,), generator=gen(32), dtype=torch.int32)
    deq = torch.rand(n, generator=gen(33)) * 1e-5
    assert kernels.int_matmul(x, w).dtype == torch.int32  # these shapes take torch._int_mm
    fast = kernels.quant_matmul(x, w, deq, bias, dtype)
    assert torch.equal(fast, kernels.quant_matmul_ref(x, w, deq, bias, dtype))
    assert torch.equal(fast, kernels.quant_matmul(x, w, encode_deq_int64(deq), bias, dtype))


def test_fast_int_matmul_extremes_no_saturation(int8_gemm):
    # All -128: every pairwise product is +16384; int8 GEMMs built on u8*s8 pair sums saturate here.
    for m, k, n in [(1, 576, 64), (33, 576, 64), (5, 7, 3)]:
        for wv in (-128, 127):
            x, w = torch.full((m, k), -128, dtype=torch.int8), torch.full((n, k), wv, dtype=torch.int8)
            assert torch.equal(kernels.int_matmul(x, w).long(), torch.full((m, n), -128 * wv * k))


def test_fast_path_falls_back_when_int32_could_overflow():
    k = kernels.INT_MM_MAX_K + 1  # k * 128 * 128 exceeds int32: _int_mm is not exact there
    x, w = torch.full((2, k), -128, dtype=torch.int8), torch.full((3, k), -128, dtype=torch.int8)
    acc = kernels.int_matmul(x, w)
    assert acc.dtype == torch.int64 and acc.unique().tolist() == [16384 * k]
    assert 16384 * k > 2**31 - 1


def test_fast_quant_matmul_bias_overflow_guard(int8_gemm):
    # acc = 127*127*64 = 1032256 plus a bias near int32 max overflows int32: the fast path must add in
    # int64 like the reference.
    x, w = torch.full((20, 64), 127, dtype=torch.int8), torch.full((8, 64), 127, dtype=torch.int8)
    bias = torch.full((8,), 2**31 - 100, dtype=torch.int32)
    deq = torch.full((8,), 2.0**-20)
    fast = kernels.quant_matmul(x, w, deq, bias, torch.float32)
    assert torch.equal(fast, kernels.quant_matmul_ref(x, w, deq, bias, torch.float32))
    assert fast[0, 0].item() == np.float32(127 * 127 * 64 + 2**31 - 100) * 2.0**-20


@pytest.mark.parametrize("packing,n", [(0, 576), (2, 577)])
@pytest.mark.parametrize("m", [1, 40])
def test_fast_quant_matmul_pertoken_equals_reference(packing, n, m, int8_gemm):
    k = 576
    x = rand_int8(m, k, seed=40)
    w = rand_int8(n, k, seed=41) if packing == 0 else pack_int4(rand_int8(n, k, seed=41, lo=-8, hi=8), 0)
    ws, pts = torch.rand(n, 1, generator=gen(42)) * 1e-2, torch.rand(m, generator=gen(43))
    bias = torch.randn(n, generator=gen(44))
    args = (x, w, ws, pts, bias, packing, torch.bfloat16)
    assert torch.equal(kernels.quant_matmul_pertoken(*args), kernels.quant_matmul_pertoken_ref(*args))


@pytest.mark.parametrize("with_bias", [False, True])
def test_fast_paths_in_row_chunks_are_bit_identical(monkeypatch, with_bias, int8_gemm):
    """The fast paths run token rows in chunks of ROW_CHUNK_ELEMENTS // width (memory at real widths): with a
    tiny chunk (several chunks, a ragged last one, leading dims [2, 13]) every output equals the reference."""
    monkeypatch.setattr(kernels, "ROW_CHUNK_ELEMENTS", 100)
    m, k, n = 13, 40, 24  # 100 // 24 = 4 rows a chunk; quantize / dynamic_quant: 100 // 40 = 2
    xf = (torch.randn(2, m, k, generator=gen(60)) * 3).bfloat16()
    xf[0, 3] = 0  # an all-zero row (scale 1)
    xq, w = rand_int8(2, m, k, seed=61), rand_int8(n, k, seed=62)
    bias = torch.randint(-(2**20), 2**20, (n,), generator=gen(63), dtype=torch.int32)
    deq = torch.rand(n, generator=gen(64)) * 1e-5
    assert torch.equal(kernels.quant_matmul(xq, w, deq, bias, torch.bfloat16),
                       kernels.quant_matmul_ref(xq, w, deq, bias, torch.bfloat16))
    got, s = kernels.dynamic_quant(xf)
    want, s_ref = kernels.dynamic_quant_ref(xf)
    assert torch.equal(got, want) and torch.equal(s, s_ref)
    scale, offset = torch.tensor([0.05]), torch.tensor([2.0])
    monkeypatch.setattr(kernels, "ROW_CHUNK_ELEMENTS", 1 << 24)
    whole = kernels.quantize(xf, scale, offset)
    monkeypatch.setattr(kernels, "ROW_CHUNK_ELEMENTS", 100)
    assert torch.equal(kernels.quantize(xf, scale, offset), whole)
    ws, pts = torch.rand(n, 1, generator=gen(65)) * 1e-2, torch.rand(2, m, generator=gen(66))
    args = (xq, w, ws, pts, torch.randn(n, generator=gen(67)) if with_bias else None, 0, torch.bfloat16)
    assert torch.equal(kernels.quant_matmul_pertoken(*args), kernels.quant_matmul_pertoken_ref(*args))


# --------------------------------------------------------------------------------------------------
# registration, fake kernels, torch.export


class AllOps(torch.nn.Module):
    """One small quantized block that calls every qc op."""

    def __init__(self, k=64, n=48):
        super().__init__()
        b = self.register_buffer
        b("w", rand_int8(n, k, seed=50))
        b("in_scale", torch.tensor([0.02]))
        b("in_offset", torch.tensor([3.0]))
        b("deq", torch.rand(n, generator=gen(51)) * 1e-3)
        b("qbias", torch.randint(-1000, 1000, (n,), generator=gen(52), dtype=torch.int32))
        b("w4n", pack_int4(rand_int8(n, k, seed=53, lo=-8, hi=8), 0))
        b("ws", torch.rand(n, 1, generator=gen(54)) * 1e-2)
        b("bias", torch.randn(n, generator=gen(55)))
        b("w4k", pack_int4(rand_int8(n, k, seed=56, lo=-8, hi=8), 1))
        b("gscale", torch.rand(n, k // 16, generator=gen(57)) * 1e-2)
        b("goffset", torch.zeros(n, k // 16))
        b("s2", torch.rand(n, k // 32, generator=gen(58)) * 10)

    def forward(self, x):
        xq_static = qc.quantize(x, self.in_scale, self.in_offset)
        y1 = qc.quant_matmul(xq_static, self.w, self.deq, self.qbias, x.dtype)
        xq, ts = qc.dynamic_quant(x)
        y2 = qc.quant_matmul_pertoken(xq, self.w4n, self.ws, ts, self.bias, 2, x.dtype)
        y3 = qc.weight_quant_matmul(x, self.w4k, self.gscale, self.goffset, None, 16, 1)
        y4 = qc.quant_matmul_pergroup(xq, self.w4n, self.ws, self.s2, ts, 32, x.dtype)
        return y1 + y2 + y3 + y4


def test_export_dynamic_tokens_and_save_load_round_trip():
    model = AllOps()
    x = torch.randn(2, 5, 64, generator=gen(60)).to(torch.bfloat16)
    seq = torch.export.Dim("seq", min=1, max=4096)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {1: seq}})
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert set(ops.QC_OPS) <= targets
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    for t in (5, 1, 33):  # other sequence lengths than the traced one: the token dim is symbolic
        xt = torch.randn(2, t, 64, generator=gen(61 + t)).to(torch.bfloat16)
        eager = model(xt)
        assert eager.shape == (2, t, 48)
        assert torch.equal(loaded.module()(xt), eager)  # same kernels, same inputs: identical
        assert torch.equal(ep.module()(xt), eager)


def test_opcheck_fake_kernels_and_schemas():
    # torch.library.opcheck: schema, fake (meta) kernel vs real outputs, dynamic-shape dispatch.
    x = torch.randn(3, 5, 32, generator=gen(70)).to(torch.bfloat16)
    q = rand_int8(3, 5, 32, seed=71)
    w8, w4n = rand_int8(16, 32, seed=72), pack_int4(rand_int8(15, 32, seed=73, lo=-8, hi=8), 0)
    qbias = torch.zeros(16, dtype=torch.int32)
    cases = [
        (qc.quantize.default, (x, torch.tensor([0.02]), torch.tensor([1.0]))),
        (qc.quant_matmul.default, (q, w8, torch.rand(16), qbias, torch.float16)),
        (qc.dynamic_quant.default, (x,)),
        (qc.quant_matmul_pertoken.default, (q, w4n, torch.rand(15, 1), torch.rand(3, 5), None, 2, torch.bfloat16)),
        (qc.quant_matmul_pergroup.default, (q, w4n, torch.rand(15, 1), torch.rand(15, 2), torch.rand(3, 5), 16,
                                            torch.bfloat16)),
        (qc.weight_quant_matmul.default, (x, w8, torch.rand(16, 4), torch.rand(16, 4), torch.randn(16), 8, 0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_schemas_and_npu_kernels_registered():
    schemas = {str(op._schema) for op in ops.QC_OPS}
    assert schemas == {
        "qc::quantize(Tensor x, Tensor input_scale, Tensor input_offset) -> Tensor",
        "qc::quant_matmul(Tensor x, Tensor weight, Tensor deq_scale, Tensor quant_bias, ScalarType output_dtype) -> Tensor",
        "qc::dynamic_quant(Tensor x) -> (Tensor, Tensor)",
        "qc::quant_matmul_pertoken(Tensor x, Tensor weight, Tensor weight_scale, Tensor pertoken_scale, Tensor? bias, int packing, ScalarType output_dtype) -> Tensor",
        "qc::quant_matmul_pergroup(Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_scale_second, Tensor pertoken_scale, int group_size, ScalarType output_dtype) -> Tensor",
        "qc::weight_quant_matmul(Tensor x, Tensor weight, Tensor antiquant_scale, Tensor antiquant_offset, Tensor? bias, int group_size, int packing) -> Tensor",
    }
    for op in ops.QC_OPS:
        # quant_matmul_pergroup: one plain-tensor-math kernel for every device (CompositeExplicitAutograd)
        keys = ("CompositeExplicitAutograd",) if op is qc.quant_matmul_pergroup.default else ("PrivateUse1",)
        assert all(torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), k) for k in keys), op


def test_torch_npu_never_imported_at_module_level():
    # torch_npu needs CANN and a device to import; only the NPU kernels' bodies may import it.
    for mod in (ops, kernels):
        tree = ast.parse(inspect.getsource(mod))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top for a in n.names} | {getattr(n, "module", None) for n in top}
        assert "torch_npu" not in names, mod.__name__
    assert "import torch_npu" in inspect.getsource(ops._quant_matmul_npu)


# --------------------------------------------------------------------------------------------------
# NPU kernels: argument encoding against a stand-in torch_npu written from the CANN docs


def _stub_torch_npu():
    """Models the documented torch_npu ops on CPU, asserting the argument layouts they accept."""
    m = types.ModuleType("torch_npu")

    def npu_quantize(x, scales, zero_points, dtype, axis=1, div_mode=True):
        k = x.shape[-1]
        assert dtype == torch.qint8 and axis == -1 and div_mode is False
        assert scales.shape == (k,) and zero_points.shape == (k,)
        assert scales.dtype == x.dtype and zero_points.dtype == x.dtype
        m.last_scales = scales
        y = torch.round(x.float() * scales.float() + zero_points.float())
        return y.clamp(-128, 127).to(torch.int8)

    def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None):
        assert offset is None and x1.dim() == 2 and x1.dtype == x2.dtype == torch.int8
        assert x2.shape[0] == x1.shape[1]  # x2 is [k, n]
        n = x2.shape[1]
        assert scale.shape == (n,)
        acc = x1.long() @ x2.long()
        if scale.dtype == torch.int64:  # only without pertoken, fp16 output
            assert pertoken_scale is None and output_dtype == torch.float16
            scale = torch.from_numpy(scale.numpy().astype(np.int32).view(np.float32))
        if pertoken_scale is None:
            assert bias is None or (bias.dtype == torch.int32 and bias.shape == (n,))
            return ((acc + (0 if bias is None else bias.long())).float() * scale).to(output_dtype)
        assert pertoken_scale.shape == (x1.shape[0],) and pertoken_scale.dtype == torch.float32
        y = acc.float() * scale.float() * pertoken_scale[:, None]
        if bias is not None:
            assert bias.dtype == torch.float32 and bias.shape == (n,)
            y = y + bias
        return y.to(output_dtype)

    def npu_dynamic_quant(x):
        s = x.float().abs().amax(-1) / 127
        s = torch.where(s == 0, torch.ones_like(s), s)
        return torch.round(x.float() / s[..., None]).clamp(-128, 127).to(torch.int8), s

    def npu_weight_quant_batchmatmul(
        x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None,
        bias=None, antiquant_group_size=0,
    ):
        dt, (k, n) = x.dtype, weight.shape
        assert x.dim() == 2 and x.shape[1] == k and weight.dtype == torch.int8
        assert antiquant_scale.dtype == dt and antiquant_offset.dtype == dt
        g = antiquant_group_size
        if g == 0:
            assert antiquant_scale.shape == (n,) and antiquant_offset.shape == (n,)
            s, o = antiquant_scale, antiquant_offset
        else:
            assert antiquant_scale.shape == (math.ceil(k / g), n)
            s = antiquant_scale.repeat_interleave(g, 0)[:k]
            o = antiquant_offset.repeat_interleave(g, 0)[:k]
        W = (weight.to(dt) + o) * s  # [k, n]
        y = x @ W.T.contiguous().T  # same operand layout as the CPU kernel's x @ W_nk.T
        if bias is not None:
            assert bias.dtype == (torch.float32 if dt == torch.bfloat16 else dt)
            y = y + bias.to(dt)
        return y

    for f in (npu_quantize, npu_quant_matmul, npu_dynamic_quant, npu_weight_quant_batchmatmul):
        setattr(m, f.__name__, f)
    return m


@pytest.mark.parametrize("dtype", DTYPES)
def test_npu_kernels_encode_arguments_like_the_cpu_math(monkeypatch, dtype):
    monkeypatch.setitem(sys.modules, "torch_npu", _stub_torch_npu())
    x = (torch.randn(2, 9, 64, generator=gen(80)) * 2).to(dtype)
    # s = 0.017: dtype(1 / dtype(s)) differs from dtype(1 / s) in both dtypes (59.0 vs 58.75 bf16).
    s, o = torch.tensor([0.017]), torch.tensor([-2.0])
    assert torch.equal(ops._quantize_npu(x, s, o), qc.quantize(x, s, o))
    recip = sys.modules["torch_npu"].last_scales
    assert recip.unique().tolist() == [59.0 if dtype == torch.bfloat16 else 58.84375]

    q = qc.quantize(x, s, o)
    w = rand_int8(24, 64, seed=81)
    bias = torch.randint(-999, 999, (24,), generator=gen(82), dtype=torch.int32)
    deq = torch.rand(24, generator=gen(83)) * 1e-3
    deq_stored = encode_deq_int64(deq) if dtype == torch.float16 else deq
    assert torch.equal(
        ops._quant_matmul_npu(q, w, deq_stored, bias, dtype), qc.quant_matmul(q, w, deq_stored, bias, dtype)
    )

    yq, ts = ops._dynamic_quant_npu(x)
    assert all(torch.equal(a, b) for a, b in zip((yq, ts), qc.dynamic_quant(x)))

    w4 = rand_int8(23, 64, seed=84, lo=-8, hi=8)
    ws, fb = torch.rand(23, 1, generator=gen(85)) * 1e-2, torch.randn(23, generator=gen(86))
    for stored, packing in ((w4, 0), (pack_int4(w4, 0), 2)):
        args = (yq, stored, ws, ts, fb, packing, dtype)
        assert torch.equal(ops._quant_matmul_pertoken_npu(*args), qc.quant_matmul_pertoken(*args))

    for packing, group_size, cols in ((0, 0, 1), (1, 0, 1), (2, 16, 4)):
        stored = {0: w4, 1: pack_int4(w4, 1), 2: pack_int4(w4, 0)}[packing]
        scale = torch.rand(23, cols, generator=gen(87)) * 1e-2
        offset = torch.full((23, cols), 0.5)
        args = (x, stored, scale, offset, fb, group_size, packing)
        assert torch.equal(ops._weight_quant_matmul_npu(*args), qc.weight_quant_matmul(*args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group,packing", [(6, 64, 16, kernels.PACK_NONE), (6, 64, 16, kernels.PACK_INT4_K),
                                               (8, 60, 16, kernels.PACK_INT4_K), (6, 64, 0, kernels.PACK_INT4_N),
                                               (6, 64, 64, kernels.PACK_INT4_N)])
def test_dequantize_weight_is_the_written_out_formula(dtype, n, k, group, packing):
    """`dequantize_weight` (groups broadcast as [n, G, 1] where k divides, else repeated) equals
    `(dtype(w) + dtype(offset)) * dtype(scale)` with the per-group tensors repeated to [n, k], bit for bit: scales
    from subnormal to large in the dtype, offsets that round in it, a ragged last group (k 60). Tolerance: none."""
    g = torch.Generator().manual_seed(n * k + group + packing)
    w = torch.randint(-8 if packing else -128, 8 if packing else 128, (n, k), generator=g, dtype=torch.int8)
    stored = w if packing == kernels.PACK_NONE else pack_int4(w, dim=1 if packing == kernels.PACK_INT4_K else 0)
    groups = -(-k // group) if group else 1
    scale = torch.rand(n, groups, generator=g) * torch.exp2(torch.randint(-30, 12, (n, groups), generator=g).float())
    offset = torch.randn(n, groups, generator=g) * 37.3
    cols = torch.arange(k) // (group or k)
    want = (w.to(dtype) + offset[:, cols].to(dtype)) * scale[:, cols].to(dtype)
    got = kernels.dequantize_weight(stored, scale, offset, group, packing, k, dtype)
    assert got.shape == (n, k) and got.is_contiguous()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
