"""oneDNN's int8 linear on packed weights (backends/ascend/onednn_linear.py) equals the written-out NPU math bit for
bit, alone and inside the prepared kernels; the choice of using it is decided as documented.

Tolerance: none. Every comparison is bitwise (float32 through its int32 view, so a -0 / +0 difference fails too):
the product is exact integers rounded once to float32, the same operations as the reference."""
from __future__ import annotations

import pytest
import torch

from qcompiler.backends.ascend import kernels, onednn_linear
from qcompiler.backends.ascend.int4 import pack_int4
from qcompiler.errors import QCError
from qcompiler.ir import qnumerics as qn

needs_onednn = pytest.mark.skipif(not onednn_linear._is_exact(),
                                  reason="no exact oneDNN int8 linear on this CPU (onednn_linear._is_exact)")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def codes(*shape, seed):
    """int8 codes with the extremes in the first rows: -128 and 127 rows (sums past 2**24 at k > 1024)."""
    t = torch.randint(-128, 128, shape, generator=gen(seed), dtype=torch.int8)
    t[0] = -128
    if shape[0] > 1:
        t[1] = 127
    return t


def exact_f32(x, w):
    """f32(x @ W^T): float64 sums of int8 products are exact below 2**53, rounded once to float32."""
    return (x.double() @ w.double().t()).float()


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@needs_onednn
@pytest.mark.parametrize("m,k,n", [(1, 576, 576), (5, 64, 16), (17, 576, 1536), (40, 1100, 67), (512, 1536, 64),
                                   (3, 4096, 9), (7, 13, 5)])
def test_product_with_a_scale_is_the_rounded_exact_sum_times_the_scale(m, k, n):
    x, w = codes(m, k, seed=1), codes(n, k, seed=2)
    w[2 % n] = 0  # zero sums: +0 either way (positive scales)
    scale = torch.rand(n, generator=gen(3)) * 1e-2 + 1e-6
    got = onednn_linear.product(x, onednn_linear.pack(w), scale)
    assert same_bits(got, exact_f32(x, w) * scale)


@needs_onednn
@pytest.mark.parametrize("m,k,n", [(1, 576, 9), (33, 1024, 40), (6, 64, 16)])
def test_product_with_a_bias_equals_the_exact_biased_sum_where_bias_fits(m, k, n):
    x, w = codes(m, k, seed=4), codes(n, k, seed=5)
    limit = 2 ** 24 - k * 128 * 128
    bias = torch.randint(-limit, limit + 1, (n,), generator=gen(6), dtype=torch.int32)
    bias[0] = limit
    assert onednn_linear.bias_fits(k, bias)
    got = onednn_linear.product(x, onednn_linear.pack(w), bias=bias.float())
    want = (x.double() @ w.double().t() + bias.double()).float()
    assert same_bits(got, want)


def test_bias_fits_is_the_float32_exact_limit():
    assert onednn_linear.bias_fits(1024, torch.zeros(3, dtype=torch.int32))
    assert not onednn_linear.bias_fits(1024, torch.tensor([1], dtype=torch.int32))
    assert onednn_linear.bias_fits(576, torch.tensor([2 ** 24 - 576 * 16384], dtype=torch.int32))
    assert not onednn_linear.bias_fits(576, torch.tensor([-(2 ** 24 - 576 * 16384) - 1], dtype=torch.int32))
    # kernels.exact_bias_fits sums k in two slices past 1024: admits k 1536, oneDNN's one conversion does not
    assert kernels.exact_bias_fits(1536, torch.zeros(1, dtype=torch.int32))
    assert not onednn_linear.bias_fits(1536, torch.zeros(1, dtype=torch.int32))


def test_scales_apply_only_to_positive_scales():
    """A zero sum times a negative scale is -0 in the written-out math; oneDNN's small-row kernels give +0."""
    assert onednn_linear.scales_apply(torch.tensor([1e-3, 2.0]))
    assert not onednn_linear.scales_apply(torch.tensor([1e-3, -2.0]))
    assert not onednn_linear.scales_apply(torch.tensor([0.0, 1.0]))


@needs_onednn
def test_unpack_inverts_pack():
    w = codes(37, 70, seed=7)
    packed = onednn_linear.pack(w)
    assert onednn_linear.is_packed(packed) and not onednn_linear.is_packed(w)
    assert onednn_linear.packed_k_n(packed) == (70, 37)
    assert torch.equal(onednn_linear.unpack(packed), w)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 19, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_prepared_kernels_on_packed_weights_equal_the_reference(rows, dtype, monkeypatch):
    """quant_matmul_prepared (W8A8) and quant_matmul_pertoken_prepared (W8A8_DYNAMIC) reading a packed weight give
    the reference kernels' bits, whole and in row chunks (a ragged last one), with and without a bias."""
    k, n = 576, 96
    x, w = codes(rows, k, seed=8), codes(n, k, seed=9)
    qb = torch.randint(-(2 ** 22), 2 ** 22, (n,), generator=gen(10), dtype=torch.int32)
    deq = torch.rand(n, generator=gen(11)) * 1e-5
    ws = torch.rand(n, 1, generator=gen(12)) * 1e-2 + 1e-5
    pts = torch.rand(rows, generator=gen(13))
    bias = torch.randn(n, generator=gen(14))
    packed = onednn_linear.pack(w)
    assert onednn_linear.bias_fits(k, qb)
    for chunk in (None, 7 * n):  # whole, then 7-row chunks
        if chunk:
            monkeypatch.setattr(kernels, "ROW_CHUNK_ELEMENTS", chunk)
        got = kernels.quant_matmul_prepared(x, packed, deq, kernels.quant_bias_accumulator(k, qb), dtype, qb.float())
        assert torch.equal(got, kernels.quant_matmul_ref(x, w, deq, qb, dtype)), chunk
        for b in (None, bias):
            wsf, bf = kernels.pertoken_operands(ws, b, dtype)
            got = kernels.quant_matmul_pertoken_prepared(x, packed, wsf, pts, bf, dtype)
            want = kernels.quant_matmul_pertoken_ref(x, w, ws, pts, b, kernels.PACK_NONE, dtype)
            assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               want.view(torch.int16 if dtype != torch.float32 else torch.int32)), (chunk, b is None)


@needs_onednn
def test_a_packed_w8a8_weight_needs_the_float32_bias():
    w = codes(8, 16, seed=15)
    with pytest.raises(ValueError, match="needs quant_bias_f32"):
        kernels.quant_matmul_prepared(codes(3, 16, seed=16), onednn_linear.pack(w), torch.ones(8),
                                      torch.zeros(8, dtype=torch.int32), torch.float32)


def test_forced_onednn_is_refused_where_it_is_not_exact(monkeypatch):
    monkeypatch.setattr(onednn_linear, "_DECIDED", [])
    monkeypatch.setattr(onednn_linear, "_is_exact", lambda: False)
    monkeypatch.setenv("QC_INT8_GEMM", "onednn")
    with pytest.raises(QCError, match="QC_INT8_GEMM=onednn: .* not exact"):
        onednn_linear.applies()


@pytest.mark.parametrize("choice", ["auto", "native", "float32"])
@pytest.mark.parametrize("native,exact", [(True, True), (True, False), (False, True)])
def test_auto_uses_onednn_only_where_int8_is_native_and_onednn_exact(monkeypatch, choice, native, exact):
    monkeypatch.setattr(onednn_linear, "_DECIDED", [])
    monkeypatch.setattr(onednn_linear, "_is_exact", lambda: exact)
    monkeypatch.setattr(qn, "_INT8_NATIVE", [native])
    monkeypatch.setenv("QC_INT8_GEMM", choice)
    assert onednn_linear.applies() is (choice == "auto" and native and exact)
    monkeypatch.setattr(onednn_linear, "_is_exact", lambda: not exact)
    assert onednn_linear.applies() is (choice == "auto" and native and exact)  # decided once per process


@needs_onednn
def test_the_exactness_check_fails_a_kernel_that_rounds_differently(monkeypatch):
    """`_is_exact` is what keeps an inexact oneDNN build off: a product off by one unit in the last place, or one
    that returns -0 for a zero sum, fails it."""
    real = onednn_linear.product

    def off_by_one_ulp(x, packed, scale=None, bias=None):
        y = real(x, packed, scale, bias)
        return torch.nextafter(y, torch.full_like(y, float("inf"))) if scale is not None else y

    monkeypatch.setattr(onednn_linear, "product", off_by_one_ulp)
    assert onednn_linear._is_exact() is False

    def negative_zero(x, packed, scale=None, bias=None):
        y = real(x, packed, scale, bias)
        return torch.where(y == 0, torch.tensor(-0.0), y)

    monkeypatch.setattr(onednn_linear, "product", negative_zero)
    assert onednn_linear._is_exact() is False


@needs_onednn
def test_a_bias_past_the_limit_would_round_twice():
    """Why `bias_fits` bounds k * 128 * 128 + |bias| by 2**24: oneDNN rounds the sum to float32 before adding the
    bias. Sum 2**24 + 1 (1024 products of -128 * -128, one of 1 * 1) with bias 1: f32(2**24 + 1) + 1 rounds to
    2**24, while f32(2**24 + 2) is exact."""
    k = 1025
    x, w = torch.full((1, k), -128, dtype=torch.int8), torch.full((1, k), -128, dtype=torch.int8)
    x[0, -1], w[0, -1] = 1, 1
    bias = torch.tensor([1], dtype=torch.int32)
    assert not onednn_linear.bias_fits(k, bias)
    got = onednn_linear.product(x, onednn_linear.pack(w), bias=bias.float())
    assert got.item() == 2.0 ** 24 and (x.double() @ w.double().t() + 1).float().item() == 2.0 ** 24 + 2


@needs_onednn
@pytest.mark.parametrize("m,k,n", [(1, 64, 16), (40, 1100, 67), (300, 576, 96)])
def test_accumulate_rounds_the_product_and_the_sum_separately(m, k, n):
    """oneDNN's sum post-op adds f32(f32(acc) * scale) into out: two roundings, as `out.add_(product(...))`, on
    running sums of wide magnitudes (where a fused multiply-add would round once), cancellations and zeros."""
    x, w = codes(m, k, seed=17), codes(n, k, seed=18)
    scale = torch.rand(n, generator=gen(19)) * 1e-2 + 1e-6
    packed = onednn_linear.pack(w)
    t = exact_f32(x, w) * scale
    out = torch.randn(m, n, generator=gen(20)) * torch.exp2(torch.randint(-20, 20, (m, n), generator=gen(21)).float())
    out[:, 0] = -t[:, 0]
    want = out + t
    got = onednn_linear.accumulate(x, packed, scale, out)
    assert got.data_ptr() == out.data_ptr() and same_bits(got, want)


@needs_onednn
@pytest.mark.parametrize("rows,k,n,group", [(1, 128, 16, 64), (19, 256, 96, 32), (300, 576, 64, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pergroup_on_packed_groups_equals_the_reference(rows, k, n, group, dtype):
    """kernels.quant_matmul_pergroup_packed (W4A8_DYNAMIC, one packed weight per group) gives the reference's bits:
    each group's scaled sum, folded in order, times the per-token scale (300 rows: two row blocks)."""
    x = codes(rows, k, seed=22)
    w = torch.randint(-8, 8, (n, k), generator=gen(23), dtype=torch.int8)
    w[0] = -8
    ws = torch.rand(n, 1, generator=gen(24)) * 1e-2 + 1e-4
    ws2 = torch.rand(n, k // group, generator=gen(25)) + 0.1
    pts = torch.rand(rows, generator=gen(26))
    want = kernels.quant_matmul_pergroup(x, pack_int4(w, 0), ws, ws2, pts, group, dtype)
    s = kernels.two_stage_scale(ws, ws2, dtype)
    packed = [onednn_linear.pack(w[:, g * group:(g + 1) * group]) for g in range(k // group)]
    got = kernels.quant_matmul_pergroup_packed(x, packed, s.t().contiguous().unsqueeze(1), pts, dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(bits), want.view(bits))


@needs_onednn
def test_accumulate_refuses_an_out_that_is_not_contiguous_float32():
    """oneDNN's sum post-op reads and writes `out` as a dense [m, n] block whatever its strides: a column slice
    (row stride n + 4) came back with wrong sums and the columns beside it overwritten (review31). The smallest
    case: 2 rows of ones, k 1, n 1, out = a [2, 2] tensor's first column."""
    x, w = torch.ones(2, 1, dtype=torch.int8), torch.ones(1, 1, dtype=torch.int8)
    big = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="contiguous float32"):
        onednn_linear.accumulate(x, onednn_linear.pack(w), torch.ones(1), big[:, :1])
    assert torch.equal(big, torch.zeros(2, 2))  # nothing written beside it
    with pytest.raises(ValueError, match="contiguous float32"):
        onednn_linear.accumulate(x, onednn_linear.pack(w), torch.ones(1), torch.zeros(2, 1, dtype=torch.bfloat16))


@needs_onednn
def test_pergroup_reference_sums_a_one_product_group_to_plus_zero():
    """Spec sec. 4: the group sums acc_g are exact integers, so a zero sum is +0 and, with a positive scale, so is
    its output. The written-out kernel (`quant_matmul_pergroup`, the op graph's) forms them with a float32 bmm,
    which at k = group_size = 1 from 25 rows x 16 channels returns -128 * 0 = -0.0 (found by review31); the packed
    kernel (oneDNN's int32 sums) returns +0, so the prepared graph and the op graph differed in the sign of zero.
    Pre-existing in the reference kernel; its group sums now start from +0 (`torch.baddbmm` on zeros)."""
    rows, n = 25, 16
    x = torch.full((rows, 1), -128, dtype=torch.int8)
    w = torch.zeros(n, 1, dtype=torch.int8)
    ws, ws2, pts = torch.ones(n, 1), torch.ones(n, 1), torch.ones(rows)
    want = torch.zeros(rows, n)  # +0 everywhere
    packed = kernels.quant_matmul_pergroup_packed(x, [onednn_linear.pack(w)], torch.ones(1, 1, n), pts, torch.float32)
    assert same_bits(packed, want)
    reference = kernels.quant_matmul_pergroup(x, pack_int4(w, 0), ws, ws2, pts, 1, torch.float32)
    assert same_bits(reference, want)


def test_a_build_without_the_ops_is_seen_as_such(monkeypatch):
    """Without oneDNN's int8 linear ops (`_ONEDNN` None) auto never uses them and a forced choice is one QCError."""
    monkeypatch.setattr(onednn_linear, "_ONEDNN", None)
    monkeypatch.setattr(onednn_linear, "_DECIDED", [])
    monkeypatch.setattr(qn, "_INT8_NATIVE", [True])
    monkeypatch.setenv("QC_INT8_GEMM", "auto")
    assert onednn_linear.applies() is False
    monkeypatch.setattr(onednn_linear, "_DECIDED", [])
    monkeypatch.setenv("QC_INT8_GEMM", "onednn")
    with pytest.raises(QCError, match="missing or not exact"):
        onednn_linear.applies()
