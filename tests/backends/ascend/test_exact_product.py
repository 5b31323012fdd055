"""The decode fast path of the quantized matmuls (backends/ascend/kernels.py, issue 16) against the reference math,
bit for bit: `exact_product_f32` (float32 GEMM or fbgemm's row-wise kernel on the `rowwise_codes` layout) must
equal the exact integer product (+ bias) converted to float32, and the prepared kernels that use it must equal
the `*_ref` kernels. Tolerance: none; bits are compared (`.view` as integers, so -0.0 != +0.0), on codes at the
int8 extremes with k at the float32 slice limits, where a kernel that rounded or lost a sign would show."""
import math

import pytest
import torch

from qcompiler.backends.ascend import kernels as K
from qcompiler.ir import qnumerics as qn

LIMIT = qn.F32_EXACT_K  # 1024: one exact slice; up to 2 * LIMIT: two


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _operands(rows: int, k: int, n: int, kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randint(-128, 128, (rows, k), generator=g, dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    else:  # every product at +-2**14: the largest partial sums float32 must hold
        xv, wv = {"min*min": (-128, -128), "max*max": (127, 127), "min*max": (-128, 127)}[kind]
        x = torch.full((rows, k), xv, dtype=torch.int8)
        w = torch.full((n, k), wv, dtype=torch.int8)
        w[1::2] = torch.randint(-128, 128, (n // 2, k), generator=g, dtype=torch.int8)  # mixed rows too
    w[0] = 0  # exact zeros: -x * 0 products, the sum must be +0
    return x, w


def _layouts(w):
    """The weight as the kernels may get it: int8 [n, k], row-wise in one part, and in 2 parts along n (what
    layouts.py prepares, `kernels.rowwise_parts`)."""
    return (w, K.rowwise_codes(w), K.rowwise_codes(w, 2))


def _want(x, w, bias=None):
    acc = K.int_matmul_ref(x, w)
    return (acc if bias is None else acc + bias.to(torch.int64)).to(torch.float32)


@pytest.mark.parametrize("k", [1, 7, 576, LIMIT, LIMIT + 1, 1536, 2 * LIMIT])
@pytest.mark.parametrize("kind", ["random", "min*min", "max*max", "min*max"])
@pytest.mark.parametrize("rows", [1, K.ROWWISE_MAX_ROWS, K.ROWWISE_MAX_ROWS + 3])
def test_exact_product_is_the_integer_product(rows, k, kind):
    x, w = _operands(rows, k, 10, kind, seed=k * 7 + rows)
    want = _want(x, w)
    codes_f32 = x.float()
    codes_f32[codes_f32 == 0] = -0.0  # what round() of a small negative quotient gives
    assert K.exact_product_applies(x, k)
    for weight in _layouts(w):
        for codes in (x, codes_f32):
            got = K.exact_product_f32(codes, weight)
            assert _same_bits(got, want), (weight.dtype, codes.dtype)
            assert not torch.signbit(got[:, 0]).any()  # +0, as f32(int 0)


@pytest.mark.parametrize("k", [576, LIMIT, 1536, 2 * LIMIT])
@pytest.mark.parametrize("rows", [1, 9])
def test_exact_product_with_a_bias_at_the_limit(rows, k):
    x, w = _operands(rows, k, 6, "min*min", seed=k)
    room = 2 ** 24 - K.exact_slice_width(k) * 128 * 128
    bias = torch.tensor([room, -room, 0, room // 2, -(room // 3), room], dtype=torch.int32)
    assert K.exact_bias_fits(k, bias) and not K.exact_bias_fits(k, bias + 1)
    for weight in _layouts(w):
        assert _same_bits(K.exact_product_f32(x.float(), weight, bias.float()), _want(x, w, bias))


def test_rowwise_layout_round_trips_and_its_kernel_is_checked():
    w = torch.randint(-128, 128, (13, 40), dtype=torch.int8)
    packed = K.rowwise_codes(w)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (40, 13 + 8)
    assert torch.equal(K.rowwise_weight(packed), w)
    every = torch.arange(-128, 128, dtype=torch.int8).reshape(2, 128)  # all 256 codes: the byte is w + 128
    want = (every.t().to(torch.int16) + 128).to(torch.uint8)
    assert torch.equal(K.rowwise_codes(every)[:, :2], want)
    assert torch.equal(K.rowwise_codes(every)[:, 2:], K._ROWWISE_TAIL.expand(128, 8))
    assert torch.equal(K.rowwise_weight(K.rowwise_codes(every)), every)
    if "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines:
        assert K._rowwise_kernel_is_exact()  # this host's decode speed depends on it (BENCHMARKS.md, issue 16)


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("k", [576, 1536])
@pytest.mark.parametrize("bias", [False, True])
def test_prepared_pertoken_matmul_equals_the_reference(rows, k, bias):
    g = torch.Generator().manual_seed(rows + k)
    xb = (torch.randn(rows, k, generator=g) * 3).to(torch.bfloat16)
    xb[0, : k // 2] = 0
    n = 24
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w[:3] = torch.tensor([-128, 127, 0], dtype=torch.int8)[:, None]
    ws = torch.rand(n, 1, generator=g) / 100
    b = torch.randn(n, generator=g) if bias else None
    q, s = K.dynamic_quant(xb)
    codes, s2 = K.dynamic_quant_codes(xb)
    assert codes.dtype == torch.float32 and torch.equal(codes.to(torch.int8), q) and torch.equal(s, s2)
    assert torch.equal(codes, codes.round())
    want = K.quant_matmul_pertoken_ref(q, w, ws, s, b, K.PACK_NONE, torch.bfloat16)
    wsf, bf = K.pertoken_operands(ws, b, torch.bfloat16)
    for weight in _layouts(w):
        for x in (q, codes):
            assert _same_bits(K.quant_matmul_pertoken_prepared(x, weight, wsf, s, bf, torch.bfloat16), want)


@pytest.mark.parametrize("rows", [1, 40])
@pytest.mark.parametrize("k", [576, 1536])
def test_prepared_static_matmul_equals_the_reference(rows, k):
    g = torch.Generator().manual_seed(rows * k)
    xb = (torch.randn(rows, k, generator=g) * 2).to(torch.bfloat16)
    n = 16
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w[0] = 0
    deq = torch.rand(n, generator=g) / 1000
    room = 2 ** 24 - K.exact_slice_width(k) * 128 * 128
    qb = torch.randint(-room, room + 1, (n,), generator=g, dtype=torch.int32)
    qb[1], qb[2] = room, -room
    scale, offset = torch.tensor([0.05]), torch.tensor([3.0])
    recip = K.quantize_reciprocal(scale, torch.bfloat16)
    q = K.quantize_prepared(xb, recip, offset)
    codes = K.quantize_codes(xb, recip, offset)
    assert codes.dtype == torch.float32 and torch.equal(codes.to(torch.int8), q)
    want = K.quant_matmul_ref(q, w, deq, qb, torch.bfloat16)
    acc = K.quant_bias_accumulator(k, qb)
    assert K.exact_bias_fits(k, qb)
    for weight in _layouts(w):
        for x in (q, codes):
            for bias_f32 in (None, qb.float()):
                got = K.quant_matmul_prepared(x, weight, deq, acc, torch.bfloat16, bias_f32)
                assert _same_bits(got, want)


def test_lowered_matmul_precision_takes_the_integer_path():
    """With float32 matmuls allowed to run in lower precision the exact float32 GEMM path is off; the int path
    (torch._int_mm) still gives the reference bits from every layout (the row-wise layout's one-token decode path
    runs no matmul and gives them too)."""
    x = torch.full((1, 576), -128, dtype=torch.int8)
    w = torch.full((8, 576), -128, dtype=torch.int8)
    ws = torch.ones(8)
    want = K.quant_matmul_pertoken_ref(x, w, ws.reshape(8, 1), torch.ones(1), None, K.PACK_NONE, torch.float32)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert not K.exact_product_applies(x, 576)
        for weight in _layouts(w):
            got = K.quant_matmul_pertoken_prepared(x.float(), weight, ws, torch.ones(1), None, torch.float32)
            assert _same_bits(got, want)
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("rows", [1, K.ROWWISE_MAX_ROWS, 40])
@pytest.mark.parametrize("n,k,group", [(24, 576, 32), (7, 1536, 256), (10, 64, 64)])
def test_prepared_pergroup_matmul_from_the_rowwise_layout_equals_the_op(rows, n, k, group):
    """W4A8_DYNAMIC per-group: the row-wise layout (group sums from the row-wise kernel up to ROWWISE_MAX_ROWS
    rows, else widened per call) gives the op's bits (kernels.quant_matmul_pergroup, the spec's order)."""
    from qcompiler.backends.ascend.int4 import pack_int4
    g = torch.Generator().manual_seed(rows * n + k)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    w[0], w[1] = -8, 7
    packed = pack_int4(w, dim=0)
    ws, ws2 = torch.rand(n, 1, generator=g), torch.rand(n, k // group, generator=g)
    xb = (torch.randn(rows, k, generator=g) * 5).to(torch.bfloat16)
    q, s = K.dynamic_quant(xb)
    codes, _ = K.dynamic_quant_codes(xb)
    want = K.quant_matmul_pergroup(q, packed, ws, ws2, s, group, torch.bfloat16)
    st = K.two_stage_scale(ws, ws2, torch.bfloat16).t().contiguous().unsqueeze(1)
    for x in (q, codes):
        got = K.quant_matmul_pergroup_prepared(x, K.rowwise_codes(w), st, s, torch.bfloat16)
        assert _same_bits(got, want)


def test_split_layout_holds_the_channels_in_parts_along_n():
    """`rowwise_codes(w, parts)`: part p is the one-part layout of output channels [p n/P, (p+1) n/P), written
    out here from the formula; `rowwise_weight` inverts it; n must divide."""
    w = torch.randint(-128, 128, (12, 40), dtype=torch.int8)
    for parts in (2, 3, 4):
        packed = K.rowwise_codes(w, parts)
        m = 12 // parts
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == (parts, 40, m + 8)
        for p in range(parts):
            want = (w[p * m:(p + 1) * m].t().to(torch.int16) + 128).to(torch.uint8)
            assert torch.equal(packed[p, :, :m], want)
            assert torch.equal(packed[p, :, m:], K._ROWWISE_TAIL.expand(40, 8))
        assert torch.equal(K.rowwise_weight(packed), w)
        assert K._weight_k_n(packed) == (40, 12)
    with pytest.raises(ValueError, match="do not split"):
        K.rowwise_codes(w, 5)
    c = K.ROWWISE_PART_MIN_CHANNELS
    # the most of 8 / 4 / 2 parts that divide n, of >= c channels each
    assert [K.rowwise_parts(n, 576) for n in (8 * c, 16 * c, 4 * c, 2 * c, c, 8 * c + 4, 8 * c + 2, 8 * c + 1)] == [
        8, 8, 4, 2, 1, 4, 2, 1]
    assert K.rowwise_parts(8 * c, 2 * LIMIT) == 8 and K.rowwise_parts(8 * c, 2 * LIMIT + 1) == 1


@pytest.mark.parametrize("k", [576, LIMIT + 1, 1536, 2 * LIMIT])
@pytest.mark.parametrize("rows", [1, 3, K.ROWWISE_MAX_ROWS])
def test_split_layout_gives_every_channel_its_own_sum(rows, k):
    """Each output channel has a distinct exact sum (a channel or k-slice placed in the wrong column, or parts
    summed into each other, changes bits): the split layout's bags in every row / slice / part order the
    kernel's output is read in."""
    g = torch.Generator().manual_seed(rows * 10 + k)
    n = 12
    x = torch.randint(-128, 128, (rows, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w[:, : k // 2] = torch.arange(-60, -60 + 10 * n, 10, dtype=torch.int8)[:, None]  # first slice differs per channel
    want = _want(x, w)
    assert want.unique().numel() == want.numel()  # all distinct (the check below can see a misplaced one)
    for parts in (2, 3, 4, 6):
        got = K.exact_product_f32(x.float(), K.rowwise_codes(w, parts))
        assert _same_bits(got, want), parts


def _pergroup_case(rows, n, k, group, seed, dtype):
    from qcompiler.backends.ascend.int4 import pack_int4
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    # scales over 2**-20 .. 2**20: group terms of very different sizes, so their float sum depends on its order
    ws = torch.rand(n, 1, generator=g) + 0.5
    ws2 = (torch.rand(n, k // group, generator=g) + 0.5) * torch.exp2(torch.randint(-20, 21, (n, k // group),
                                                                                  generator=g).float())
    xb = (torch.randn(rows, k, generator=g) * 5).to(torch.bfloat16)
    q, s = K.dynamic_quant(xb)
    st = K.two_stage_scale(ws, ws2, dtype).t().contiguous().unsqueeze(1)
    return w, pack_int4(w, dim=0), ws, ws2, q, s, st


@pytest.mark.parametrize("rows", [1, K.ROWWISE_MAX_ROWS, 70])
@pytest.mark.parametrize("k,group", [(576, 32), (1536, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pergroup_fold_in_one_call_keeps_the_group_order(rows, k, group, dtype):
    """W4A8_DYNAMIC: the group sums folded in one embedding-bag call (`fold=True`, what layouts.py passes when
    `pergroup_fold_applies`) give the bits of the op's written-out `y += t_g` in group order, from the row-wise
    kernel (up to ROWWISE_MAX_ROWS rows) and from the widened weight (70 rows: two row blocks). The data is such
    that the reversed order gives other bits (checked), so a fold in another order fails here."""
    w, packed, ws, ws2, q, s, st = _pergroup_case(rows, 24, k, group, rows + k, dtype)
    assert K.pergroup_fold_applies(st) and K._group_fold_is_sequential()
    want = K.quant_matmul_pergroup(q, packed, ws, ws2, s, group, dtype)
    for weight in (K.rowwise_codes(w), K.pergroup_operands(w, st.squeeze(1).t(), group)[0]):
        got = K.quant_matmul_pergroup_prepared(q, weight, st, s, dtype, True)
        assert _same_bits(got, want)
    if dtype == torch.float32:  # the reversed group order rounds differently on this data
        groups = k // group
        acc = torch.bmm(q.double().view(rows, groups, group).transpose(0, 1),
                        w.double().view(24, groups, group).permute(1, 2, 0))  # [G, rows, n], exact integers
        terms = (acc.float() * st).unbind(0)  # [rows, n] per group: f32(acc_g * S_g)
        rev = terms[-1].clone()
        for t in reversed(terms[:-1]):
            rev.add_(t)
        assert not torch.equal(rev.mul(s.reshape(rows, 1)), want)


def test_pergroup_fold_is_off_where_a_channel_could_sum_to_minus_zero():
    """A channel whose every group scale is negative gives -0 for a zero activation row (every term -0: the
    spec's sum is -0, the one-call fold's accumulator starts at +0). layouts.py then passes fold=False, and the
    written-out fold keeps the -0; forcing the one-call fold there loses it (so the guard is needed)."""
    w, packed, ws, ws2, q, s, st = _pergroup_case(2, 8, 64, 32, 3, torch.bfloat16)
    ws[3] = -ws[3]  # channel 3: every two-stage scale negative
    q[0] = 0        # token 0: every group sum is 0
    st = K.two_stage_scale(ws, ws2, torch.bfloat16).t().contiguous().unsqueeze(1)
    want = K.quant_matmul_pergroup(q, packed, ws, ws2, s, 32, torch.bfloat16)
    assert torch.signbit(want[0, 3]) and want[0, 3] == 0
    assert not K.pergroup_fold_applies(st)
    got = K.quant_matmul_pergroup_prepared(q, K.rowwise_codes(w), st, s, torch.bfloat16, K.pergroup_fold_applies(st))
    assert _same_bits(got, want)
    forced = K.quant_matmul_pergroup_prepared(q, K.rowwise_codes(w), st, s, torch.bfloat16, True)
    assert not _same_bits(forced, want) and not torch.signbit(forced[0, 3])


# --------------------------------------------------------------------------------------------------
# decode-step paths planned once per shape (issue 16): `dynamic_quant_codes` in 6-7 torch calls and
# `quant_matmul_pergroup_prepared`'s `_pergroup_decode_plan`; bits against the reference math.


def _adversarial_rows(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[rows, k] activations where a quantizer that rounds, clamps, signs or scales differently shows: an
    all-zero row, -0 / +0, a row whose max|x| is a negative value, the dtype's extremes and subnormals, a
    float32 max of 2**-140 (m / 127 loses bits: the quotient reaches 128, the clamp must act), values far apart."""
    g = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    x = torch.randn(rows, k, generator=g) * torch.exp2(torch.randint(-30, 30, (rows, 1), generator=g).float())
    specials = [0.0, -0.0, fi.max, -fi.max, fi.tiny, -fi.tiny, 2.0 ** -133, -(2.0 ** -133), 2.0 ** -140,
                2.0 ** -149, 1.0, -1.0, 0.5, -2.5, 3.5]
    pick = torch.randint(0, len(specials), (rows, k), generator=g)
    x = torch.where(torch.rand(rows, k, generator=g) < 0.2, torch.tensor(specials)[pick], x.clamp(-fi.max, fi.max))
    x = x.to(dtype)  # finite (non-finite rows: the test adds them)
    x[0] = 0.0
    x[0, ::3] = -0.0                                     # all-zero row with -0s: scale 1, codes -0 / +0
    if rows > 1:
        x[1] = x[1].abs()
        x[1, k // 2] = -x[1].abs().max().clamp(max=fi.max / 2) * 2  # max|x| is a negative entry (finite)
    if rows > 2:
        x[2] = 0.0
        x[2, -1] = 2.0 ** -140 if dtype == torch.float32 else fi.tiny   # tiny max: s = f32(m / 127) inexact
        x[2, 0] = (2.0 ** -141) if dtype == torch.float32 else fi.tiny / 2
    if rows > 3:
        x[3, :] = fi.max
        x[3, 1::2] = -fi.max                             # extremes: codes +-127
    return x


def _quotient_ref(x: torch.Tensor):
    """`dynamic_quant_ref` before its int8 cast: (float32 codes, scale)."""
    xf = x.float()
    s = xf.abs().amax(dim=-1) / 127
    s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.round(xf / s.unsqueeze(-1)).clamp(-128, 127), s


def _same_or_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bits equal where not NaN, NaN at the same places (a NaN's payload is not part of the contract)."""
    na, nb = a.isnan(), b.isnan()
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(na, nb) and torch.equal(_bits(a)[~na],
                                                                                             _bits(b)[~nb])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 7, 576, 1536])
def test_dynamic_quant_codes_are_the_reference_bits(dtype, rows, k):
    """`dynamic_quant_codes` (decode: one infinity-norm reduction, the division by 127 in one call, no clamp for
    16-bit inputs) returns the reference's float32 codes and scale bit for bit (-0 codes included; an all-zero row
    scale 1; float32 rows where the clamp acts), its int8 codes on finite rows, and NaN where the reference divides
    by an infinite or NaN scale. Tolerance: none."""
    x = _adversarial_rows(rows, k, dtype, seed=rows * 100 + k)
    for lead, xs in (((rows,), x), ((1, rows), x.view(1, rows, k)), ((rows, 1), x.view(rows, 1, k))):
        codes, s = K.dynamic_quant_codes(xs)
        want_codes, want_s = _quotient_ref(xs)
        assert codes.dtype == torch.float32 and tuple(s.shape) == lead
        assert _same_or_nan(s, want_s) and _same_or_nan(codes, want_codes)
        q, s_ref = K.dynamic_quant_ref(xs)
        assert _same_or_nan(s, s_ref)
        codes_c, s_c = K.dynamic_quant_codes(xs, column=True)  # the scale as [..., 1]: the same bits
        assert tuple(s_c.shape) == lead + (1,) and _same_or_nan(s_c, s.unsqueeze(-1))
        assert _same_or_nan(codes_c, codes)
        finite = codes.isfinite()
        assert torch.equal(codes[finite].to(torch.int8), q[finite])
    if dtype == torch.float32 and rows > 2:
        assert want_codes.view(rows, k)[2].abs().max() == 127 and (x[2, -1].float() / want_s.view(-1)[2]) > 127.5
    for bad in (math.inf, -math.inf, math.nan):  # a non-finite row: the reference's quotients, NaN where it has NaN
        y = x.clone()
        y[0, k // 2] = bad
        codes, s = K.dynamic_quant_codes(y)
        want_codes, want_s = _quotient_ref(y)
        assert _same_or_nan(s, want_s) and _same_or_nan(codes, want_codes)


def _pergroup_decode_case(rows, n, k, group, dtype, seed):
    """Operands of a decode-step W4A8_DYNAMIC call: int4 weights at the extremes, two-stage scales over
    2**-20 .. 2**20 (group terms of very different sizes: their float32 sum depends on its order) with some
    negative groups (-0 and negative terms; every channel keeps a positive group, so the fold applies), codes of
    `_adversarial_rows` (an all-zero row, +-0 codes, +-127)."""
    from qcompiler.backends.ascend.int4 import pack_int4
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    w[0], w[1], w[2, ::2], w[2, 1::2] = -8, 7, -8, 7
    groups = k // group
    ws = torch.rand(n, 1, generator=g) + 0.5
    ws2 = (torch.rand(n, groups, generator=g) + 0.5) * torch.exp2(torch.randint(-20, 21, (n, groups),
                                                                              generator=g).float())
    if groups > 1:
        ws2[:, 1::3] = -ws2[:, 1::3]
    xb = _adversarial_rows(rows, k, torch.bfloat16, seed)
    q, s = K.dynamic_quant(xb)
    codes, s2 = K.dynamic_quant_codes(xb)
    assert torch.equal(s, s2)
    st = K.two_stage_scale(ws, ws2, dtype).t().contiguous().unsqueeze(1)
    assert K.pergroup_fold_applies(st)
    return w, pack_int4(w, dim=0), ws, ws2, q, codes, s, st


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k,group", [(24, 576, 32), (10, 1536, 32), (9, 64, 64), (6, 2048, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pergroup_decode_plan_gives_the_op_bits(rows, n, k, group, dtype):
    """The decode path of `quant_matmul_pergroup_prepared` (float32 codes, row-wise weight, fold: the planned
    6-7 torch calls) equals the op (`quant_matmul_pergroup`: widened weight, the spec's written-out group fold)
    bit for bit, with x's leading dims as a batch of one ([rows], [1, rows]: the scale broadcasts) or not
    ([rows, 1], [2, rows / 2]: reshaped), and is the path taken (its plan is cached). Tolerance: none."""
    w, packed, ws, ws2, q, codes, s, st = _pergroup_decode_case(rows, n, k, group, dtype, rows * 7 + k + n)
    want = K.quant_matmul_pergroup(q, packed, ws, ws2, s, group, dtype)  # [rows, n]
    wg = K.rowwise_codes(w)
    leads = [(rows,), (1, rows), (rows, 1)] + ([(2, rows // 2)] if rows % 2 == 0 else [])
    for lead in leads:
        x, ps = codes.reshape(*lead, k), s.reshape(lead)
        for scale in (ps, ps.unsqueeze(-1)):  # [*lead] or the column of `dynamic_quant_codes(column=True)`
            got = K.quant_matmul_pergroup_prepared(x, wg, st, scale, dtype, True)
            assert K._PG_DECODE[(x.shape, wg.shape, st.shape, scale.shape)], lead
            assert _same_bits(got, want.reshape(*lead, n)), lead
    again = K.quant_matmul_pergroup_prepared(codes, wg, st, s, dtype, True)  # the cached plan
    assert _same_bits(again, want)
    st2 = st.squeeze(1)  # a [G, n] scale: the same values
    assert _same_bits(K.quant_matmul_pergroup_prepared(codes, wg, st2, s, dtype, True), want)


def test_pergroup_decode_plan_leaves_other_calls_to_the_general_path():
    """No plan (general path, same bits) past ROWWISE_MAX_ROWS rows, for a weight split in parts, for int8 codes,
    and for a non-contiguous x (the kernel reads the codes in memory order)."""
    rows, n, k, group = K.ROWWISE_MAX_ROWS + 1, 8, 64, 32
    w, packed, ws, ws2, q, codes, s, st = _pergroup_decode_case(rows, n, k, group, torch.bfloat16, 5)
    want = K.quant_matmul_pergroup(q, packed, ws, ws2, s, group, torch.bfloat16)
    wg = K.rowwise_codes(w)
    assert _same_bits(K.quant_matmul_pergroup_prepared(codes, wg, st, s, torch.bfloat16, True), want)
    assert K._PG_DECODE[(codes.shape, wg.shape, st.shape, s.shape)] is False
    assert _same_bits(K.quant_matmul_pergroup_prepared(q, wg, st, s, torch.bfloat16, True), want)
    x = codes[:2].clone()              # [2, k] contiguous
    xt = codes[:2].t().contiguous().t()  # [2, k], the same values, not contiguous
    assert not xt.is_contiguous() and torch.equal(x, xt)
    a = K.quant_matmul_pergroup_prepared(x, wg, st, s[:2], torch.bfloat16, True)
    b = K.quant_matmul_pergroup_prepared(xt, wg, st, s[:2], torch.bfloat16, True)
    assert _same_bits(a, want[:2]) and _same_bits(b, want[:2])
    split = K.rowwise_codes(w, 2)
    assert _same_bits(K.quant_matmul_pergroup_prepared(codes[:2], split, st, s[:2], torch.bfloat16, True), want[:2])
    assert K._PG_DECODE[(codes[:2].shape, split.shape, st.shape, s[:2].shape)] is False


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [64, 576, 1535, 1536])
@pytest.mark.parametrize("parts", [1, 2, 8])
def test_rowwise_decode_plan_gives_the_reference_bits(rows, k, parts):
    """The planned decode product (`kernels._rowwise_product`: the per-sample weights as copies of x's k-slices,
    or gathered where the slices differ in width (k 1535), the bags' output viewed as [*lead, n], a second
    k-slice from k 1535) in the pertoken and
    static prepared matmuls equals the reference bit for bit: x's leading dims [rows], [1, rows], [rows, 1], the
    per-token scale as [*lead] or [*lead, 1] (`dynamic_quant_codes(column=True)`), with and without a bias,
    codes of `_adversarial_rows` (an all-zero row, +-0, +-127), a non-contiguous x. Tolerance: none."""
    g = torch.Generator().manual_seed(rows * 1000 + k + parts)
    n = 16 * parts
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w[:3] = torch.tensor([-128, 127, 0], dtype=torch.int8)[:, None]
    ws = torch.rand(n, 1, generator=g) / 100
    b = torch.randn(n, generator=g)
    xb = _adversarial_rows(rows, k, torch.bfloat16, seed=rows + k)
    q, s = K.dynamic_quant(xb)
    codes, _ = K.dynamic_quant_codes(xb)
    packed = K.rowwise_codes(w, parts)
    deq = torch.rand(n, generator=g) / 1000
    qb = torch.randint(-1000, 1000, (n,), generator=g, dtype=torch.int32)
    for bias in (None, b):
        want = K.quant_matmul_pertoken_ref(q, w, ws, s, bias, K.PACK_NONE, torch.bfloat16)
        wsf, bf = K.pertoken_operands(ws, bias, torch.bfloat16)
        for lead in ((rows,), (1, rows), (rows, 1)):
            x = codes.reshape(*lead, k)
            for scale in (s.reshape(lead), s.reshape(*lead, 1)):
                got = K.quant_matmul_pertoken_prepared(x, packed, wsf, scale, bf, torch.bfloat16)
                assert _same_bits(got, want.reshape(*lead, n)), (lead, scale.shape)
        xt = codes.t().contiguous().t()  # the same values, not contiguous (rows > 1)
        assert _same_bits(K.quant_matmul_pertoken_prepared(xt, packed, wsf, s, bf, torch.bfloat16), want)
    want = K.quant_matmul_ref(q, w, deq, qb, torch.bfloat16)
    got = K.quant_matmul_prepared(codes.reshape(1, rows, k), packed, deq, K.quant_bias_accumulator(k, qb),
                                  torch.bfloat16, qb.float())
    assert _same_bits(got, want.reshape(1, rows, n))
    assert (codes.reshape(1, rows, k).shape, packed.shape) in K._RW_PLANS  # the planned path ran
