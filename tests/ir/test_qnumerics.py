"""ir/qnumerics.py: the one definition of codes and scales, for every width 2..8 (formulas written out)."""
import numpy as np
import pytest
import torch

from qcompiler.ir import qnumerics as qn


def test_qmax_and_ranges_every_width():
    assert [qn.qmax(b) for b in range(2, 9)] == [1, 3, 7, 15, 31, 63, 127]
    assert qn.code_range(8) == (-127, 127) and qn.code_range(8, narrow=False) == (-128, 127)
    assert qn.code_range(2) == (-1, 1)
    assert all(qn.storage_dtype(b) == torch.int8 for b in range(2, 9))
    for bad in (1, 9, 0, 4.0, True):
        with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
            qn.qmax(bad)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group", [0, 4])
def test_quantize_weight_is_the_written_out_formula(bits, group):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 8, generator=g)
    w[1] = 0.0                                            # a zero row: scale 1.0, codes 0
    q, scale = qn.quantize_weight(w, bits, group)
    top = 2 ** (bits - 1) - 1
    cols = group or 8
    want_scale = w.reshape(6, 8 // cols, cols).abs().amax(-1) / top
    want_scale[1] = 1.0
    assert torch.equal(scale, want_scale)
    per_elem = want_scale.repeat_interleave(cols, dim=1)
    assert q.dtype == torch.int8
    assert torch.equal(q, torch.clamp(torch.round(w / per_elem), -top, top).to(torch.int8))
    assert int(q.abs().max()) == top                       # the row absmax maps to +-qmax exactly
    assert (q[1] == 0).all()
    hat, s2 = qn.fake_quant(w, bits, group)
    assert torch.equal(s2, scale) and torch.equal(hat, qn.dequantize(q, scale))


def test_given_scale_clamps_to_the_narrow_range():
    w = torch.tensor([[1.0, -1.0, 0.24, -0.26]])
    q, scale = qn.quantize_weight(w, 3, 0, torch.tensor([[0.1]]))
    assert torch.equal(scale, torch.tensor([[0.1]])) and q.tolist() == [[3, -3, 2, -3]]  # 0.24/0.1 -> 2


def test_ratio_one_is_min_max():
    a = torch.tensor([0.0, 1e-3, 5.0])
    assert torch.equal(qn.absmax_scale(a, 8, 1.0), torch.where(a > 0, a / 127, torch.ones_like(a)))  # float32 math
    assert torch.equal(qn.absmax_scale(a, 4, 0.5), torch.where(a > 0, a * 0.5 / 7, torch.ones_like(a)))


def test_deq_scale_codec():
    f = torch.tensor([1.0, 2.5e-6, 3.0e-4], dtype=torch.float32)
    bits = qn.float32_bits_to_int64(f)
    assert bits.dtype == torch.int64
    assert bits.tolist() == np.frombuffer(f.numpy().tobytes(), np.int32).astype(np.int64).tolist()
    assert bits[0].item() == 0x3F800000
    assert torch.equal(qn.int64_bits_to_float32(bits), f)
    assert torch.equal(qn.int64_bits_to_float32(f), f)
    with pytest.raises(ValueError, match="high 32 bits"):
        qn.int64_bits_to_float32(torch.tensor([1 << 40]))


# ---- int8_matmul: torch._int_mm's integers from float32 GEMMs ----------------------------------------------------
@pytest.mark.parametrize("m,k,n", [(1, 576, 576), (4096, 576, 192), (33, 1024, 8), (33, 1025, 8), (17, 1536, 576),
                                   (5, 3000, 7), (0, 64, 8), (3, 7, 5)])
def test_int8_matmul_is_int_mm(m, k, n, int8_gemm):
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    got = qn.int8_matmul(a, w.t())                        # w.t(): a view, as the kernels pass it
    assert got.dtype == torch.int32 and torch.equal(got, torch._int_mm(a, w.t()))
    assert torch.equal(got.to(torch.int64), (a.double() @ w.double().t()).to(torch.int64))  # exact below 2**53


@pytest.mark.parametrize("k", [1024, 1025, 1536, 4099])
def test_int8_matmul_exact_past_float32_mantissa(k, int8_gemm):
    # 127 * 127 = 16129 is odd: a float32 sum of more than ~1040 of them exceeds 2**24 and would be rounded; the
    # products must be summed in slices of at most F32_EXACT_K. (-128)^2 checks the largest product.
    for v, last in ((127, -1), (-128, -128)):
        a = torch.full((3, k), v, dtype=torch.int8)
        a[:, -1] = last
        w = torch.full((2, k), v, dtype=torch.int8)
        want = (k - 1) * v * v + last * v
        assert qn.int8_matmul(a, w.t()).tolist() == [[want] * 2] * 3


def _int_mm_spy(monkeypatch, native: bool) -> list:
    """`torch._int_mm` replaced by one that records its calls and returns zeros (ones @ ones gives 4 otherwise);
    the int8 GEMM choice fixed to `native`. Returns the list of calls."""
    monkeypatch.setattr(qn, "_INT8_NATIVE", [native])
    calls = []
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(1) or torch.zeros(a.shape[0], b.shape[1],
                                                                                       dtype=torch.int32))
    return calls


def test_int8_matmul_uses_int_mm_when_float32_matmul_is_lowered(monkeypatch):
    calls = _int_mm_spy(monkeypatch, native=False)
    a, b = torch.ones(2, 4, dtype=torch.int8), torch.ones(4, 3, dtype=torch.int8)
    assert qn.int8_matmul(a, b).unique().tolist() == [4] and not calls
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")      # float32 GEMMs may run in bf16: not exact
        assert qn.int8_matmul(a, b).unique().tolist() == [0] and calls == [1]
    finally:
        torch.set_float32_matmul_precision(old)


def test_row_chunks_step_by_the_one_rule():
    """`row_step` (the rows per chunk the quantized kernels and `row_slices` use): elements // width, at least 1, or
    rounded down to a multiple (at least that multiple); `row_slices` cuts [0, rows) by it, the last slice ragged.
    Exact integers: no tolerance."""
    assert [qn.row_step(w, 100) for w in (24, 40, 100, 1000, 0)] == [4, 2, 1, 1, 100]
    assert qn.row_step(3, 100, multiple=8) == 32 and qn.row_step(50, 100, multiple=8) == 8
    assert qn.row_step(1 << 12) == qn.ROW_CHUNK_ELEMENTS >> 12
    assert qn.row_slices(13, 24, 100) == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 13)]
    assert qn.row_slices(13, 2, 100) == [slice(0, 13)] and qn.row_slices(0, 24, 100) == [slice(0, 0)]


def test_int8_matmul_uses_int_mm_where_it_is_native(monkeypatch):
    """With int8 dot products (qn.int8_gemm_native) `_int_mm` itself runs, even with IEEE float32 matmuls."""
    calls = _int_mm_spy(monkeypatch, native=True)
    a, b = torch.ones(2, 4, dtype=torch.int8), torch.ones(4, 3, dtype=torch.int8)
    assert torch.get_float32_matmul_precision() == "highest"
    assert qn.int8_matmul(a, b).unique().tolist() == [0] and calls == [1]


@pytest.mark.parametrize("value,native", [("native", True), ("onednn", True), ("float32", False)])
def test_int8_gemm_choice_from_the_environment(monkeypatch, value, native):
    monkeypatch.setattr(qn, "_INT8_NATIVE", [])
    monkeypatch.setenv("QC_INT8_GEMM", value)
    assert qn.int8_gemm_native() is native
    monkeypatch.setenv("QC_INT8_GEMM", "float32" if native else "native")
    assert qn.int8_gemm_native() is native  # decided once per process


def test_int8_gemm_choice_refuses_an_unknown_value(monkeypatch):
    from qcompiler.errors import QCError
    monkeypatch.setattr(qn, "_INT8_NATIVE", [])
    monkeypatch.setenv("QC_INT8_GEMM", "amx")
    with pytest.raises(QCError, match="QC_INT8_GEMM='amx': expected one of auto, onednn, native, float32"):
        qn.int8_gemm_native()


def test_auto_int8_gemm_needs_the_instructions_and_an_exact_int_mm(monkeypatch):
    """"auto" picks `_int_mm` only on a CPU with int8 dot products (torch.cpu's VNNI / AMX checks) whose `_int_mm`
    passes the exactness check; a kernel that saturates its int16 pair sums (AVX2's vpmaddubsw) fails that check."""
    def saturating(a, b):  # u8 x s8 pair sums clamped to int16, as vpmaddubsw does: wrong for -128 * -128 pairs
        pairs = (a.to(torch.int64)[:, :, None] * b.to(torch.int64)[None]).reshape(a.shape[0], -1, 2, b.shape[1])
        return pairs.sum(2).clamp(-2 ** 15, 2 ** 15 - 1).sum(1).to(torch.int32)

    monkeypatch.delenv("QC_INT8_GEMM", raising=False)
    for vnni, amx, int_mm, want in [(True, False, None, True), (False, True, None, True), (False, False, None, False),
                                    (True, True, saturating, False)]:
        monkeypatch.setattr(qn, "_INT8_NATIVE", [])
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda v=vnni: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        if int_mm is not None:
            monkeypatch.setattr(torch, "_int_mm", int_mm)
        assert qn.int8_gemm_native() is (want and (int_mm is not None or qn._int_mm_is_exact())), (vnni, amx)
