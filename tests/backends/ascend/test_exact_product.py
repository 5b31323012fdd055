"""The decode fast path of the quantized matmuls (backends/ascend/kernels.py, issue 16) against the reference math,
bit for bit: `exact_product_f32` (float32 GEMM or fbgemm's row-wise kernel on the `rowwise_codes` layout) must
equal the exact integer product (+ bias) converted to float32, and the prepared kernels that use it must equal
the `*_ref` kernels. Tolerance: none; bits are compared (`.view` as integers, so -0.0 != +0.0), on codes at the
int8 extremes with k at the float32 slice limits, where a kernel that rounded or lost a sign would show."""
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
    big = K.ROWWISE_SPLIT_MIN_N
    assert K.rowwise_parts(big, 576) == 2 and K.rowwise_parts(big + 1, 576) == 1
    assert K.rowwise_parts(big, LIMIT + 1) == 1 and K.rowwise_parts(big - 2, 576) == 1


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
