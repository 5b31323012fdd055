"""Sibling Linears in one call (layouts.merge_siblings, kernels.quant_matmul_*_merged; issue 16): the merged
call must return, bit for bit, what the separate prepared calls return, output by output, for every weight layout
(int8 [n, k], row-wise in one part, in two parts), on the decode path (<= ROWWISE_MAX_ROWS token rows) and the
GEMM path, with and without biases. Tolerance: none (bits compared as integers, so -0.0 != +0.0): merging may
change which kernel call computes a channel, never its value."""
import pytest
import torch

from qcompiler.backends.ascend import kernels as K

WIDTHS = (24, 8, 8)  # q, k, v of a GQA attention (n of k and v a third of q's)
BF16 = torch.bfloat16


def _bits(t):
    return t.view(torch.int16 if t.dtype == BF16 else torch.int32)


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous() and torch.equal(_bits(a), _bits(b))


def _layout(w, kind):
    if kind == "int8":
        return w
    return K.rowwise_codes(w, 2 if kind == "parts=2" else 1)


def _weights(k, seed):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8) for n in WIDTHS]
    ws[0][:3] = torch.tensor([-128, 127, 0], dtype=torch.int8)[:, None]  # extremes and an exact zero sum
    return ws, g


@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("k", [64, 1536])
@pytest.mark.parametrize("kind", ["int8", "parts=1", "parts=2"])
@pytest.mark.parametrize("bias", [False, True])
def test_merged_pertoken_matmul_equals_the_separate_calls(rows, k, kind, bias):
    ws, g = _weights(k, rows * k + bias)
    x = (torch.randn(1, rows, k, generator=g) * 3).to(BF16)
    x[0, 0, : k // 2] = 0
    codes, s = K.dynamic_quant_codes(x)
    scales = [torch.rand(n, generator=g) / 100 for n in WIDTHS]
    scales[0][1] = -scales[0][1]  # a negative scale: -0 where a sum is 0
    biases = [torch.randn(n, generator=g) if bias else None for n in WIDTHS]
    ops = [K.pertoken_operands(sc, b, BF16) for sc, b in zip(scales, biases)]
    want = [K.quant_matmul_pertoken_prepared(codes, _layout(w, kind), o[0], s, o[1], BF16) for w, o in zip(ws, ops)]
    merged_w = _layout(torch.cat(ws), kind)
    wsf = torch.cat([o[0] for o in ops])
    bf = torch.cat([o[1] for o in ops]) if bias else None
    got = K.quant_matmul_pertoken_merged(codes, merged_w, wsf, s, bf, BF16, WIDTHS)
    assert len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("rows", [1, 9])
@pytest.mark.parametrize("k", [64, 1536])
@pytest.mark.parametrize("kind", ["int8", "parts=1", "parts=2"])
@pytest.mark.parametrize("exact_bias", [False, True])
def test_merged_static_matmul_equals_the_separate_calls(rows, k, kind, exact_bias):
    ws, g = _weights(k, rows + k)
    x = (torch.randn(1, rows, k, generator=g) * 2).to(BF16)
    recip = K.quantize_reciprocal(torch.tensor([0.05]), BF16)
    codes = K.quantize_codes(x, recip, torch.tensor([3.0]))
    room = 2 ** 24 - K.exact_slice_width(k) * 128 * 128
    qbs = [torch.randint(-room, room + 1, (n,), generator=g, dtype=torch.int32) for n in WIDTHS]
    qbs[1][0] = room
    deqs = [torch.rand(n, generator=g) / 1000 for n in WIDTHS]
    want = [K.quant_matmul_prepared(codes, _layout(w, kind), d, K.quant_bias_accumulator(k, qb), BF16,
                                    qb.float() if exact_bias else None) for w, d, qb in zip(ws, deqs, qbs)]
    qb = torch.cat(qbs)
    got = K.quant_matmul_merged(codes, _layout(torch.cat(ws), kind), torch.cat(deqs), K.quant_bias_accumulator(k, qb),
                                BF16, qb.float() if exact_bias else None, WIDTHS)
    assert all(_same(a, b) for a, b in zip(got, want))


def test_merged_outputs_are_contiguous_and_views_for_one_row():
    y = torch.arange(2 * 10, dtype=torch.float32).view(1, 2, 10)
    a, b = K.merged_outputs(y, (6, 4))
    assert a.is_contiguous() and b.is_contiguous() and torch.equal(b, y[..., 6:])
    one = y[:, :1].contiguous()
    a, b = K.merged_outputs(one, (6, 4))
    assert b.data_ptr() == one.data_ptr() + 6 * 4  # one row: a slice of the last dim is already contiguous
