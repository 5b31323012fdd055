"""int4 packing (qcompiler.backends.ascend.int4) against the artifact spec's byte layout.

All checks are exact: packing is pure integer bit layout, so there is no tolerance to allow.
"""
import pytest
import torch

from qcompiler.backends.ascend.int4 import nibbles_arithmetic, nibbles_shift, pack_int4, unpack_int4


def _rand_int4(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)


def _byte(lo: int, hi: int) -> int:
    """The spec's byte, written independently: low nibble = element 2i, high nibble = 2i+1."""
    b = (lo & 0xF) | ((hi & 0xF) << 4)
    return b - 256 if b >= 128 else b


def test_nibble_order_element0_low():
    # [1, -2]: low nibble 0x1, high nibble 0xE -> 0xE1 = int8 -31.
    assert pack_int4(torch.tensor([1, -2], dtype=torch.int8), dim=0).tolist() == [-31]
    # Swapped order must give a different byte (0x2F... i.e. lo=-2, hi=1 -> 0x1E = 30).
    assert pack_int4(torch.tensor([-2, 1], dtype=torch.int8), dim=0).tolist() == [30]


def test_every_pair_matches_spec_byte():
    vals = torch.arange(-8, 8, dtype=torch.int8)
    lo, hi = torch.meshgrid(vals, vals, indexing="ij")
    pairs = torch.stack([lo.flatten(), hi.flatten()], dim=1)  # [256, 2], packed along dim 1
    packed = pack_int4(pairs, dim=1)
    assert packed.shape == (256, 1)
    expected = [_byte(int(a), int(b)) for a, b in pairs.tolist()]
    assert packed.flatten().tolist() == expected
    # 256 distinct pairs -> 256 distinct bytes: the encoding is a bijection.
    assert len(set(expected)) == 256
    assert torch.equal(unpack_int4(packed, dim=1), pairs)


def test_edges_minus8_and_7():
    q = torch.tensor([[-8, 7], [7, -8], [-8, -8], [7, 7]], dtype=torch.int8)
    packed = pack_int4(q, dim=1)
    assert packed.flatten().tolist() == [_byte(-8, 7), _byte(7, -8), _byte(-8, -8), _byte(7, 7)]
    assert packed.flatten().tolist() == [0x78, -(256 - 0x87), -(256 - 0x88), 0x77]
    assert torch.equal(unpack_int4(packed, dim=1), q)


@pytest.mark.parametrize("shape", [(6, 10), (7, 10), (6, 9), (7, 9), (1, 1)])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_round_trip_both_dims_and_odd_sizes(shape, dim):
    q = _rand_int4(*shape, seed=sum(shape))
    packed = pack_int4(q, dim=dim)
    expected_shape = list(shape)
    expected_shape[dim] = (shape[dim] + 1) // 2
    assert list(packed.shape) == expected_shape
    assert packed.dtype == torch.int8
    assert torch.equal(unpack_int4(packed, dim=dim, size=shape[dim]), q)


def test_spec_layouts_per_channel_k_and_per_group_n():
    n, k = 6, 8
    q = _rand_int4(n, k, seed=3)
    along_k = pack_int4(q, dim=1)  # W4A16 per-channel: [n, k/2]
    along_n = pack_int4(q, dim=0)  # W4A16 per-group, W4A8_DYNAMIC: [n/2, k]
    assert along_k.shape == (n, k // 2) and along_n.shape == (n // 2, k)
    # W4A8_DYNAMIC: "two consecutive output rows share a byte, row 2i in the low nibble".
    for i in range(n // 2):
        for j in range(k):
            assert int(along_n[i, j]) == _byte(int(q[2 * i, j]), int(q[2 * i + 1, j]))
    for r in range(n):
        for i in range(k // 2):
            assert int(along_k[r, i]) == _byte(int(q[r, 2 * i]), int(q[r, 2 * i + 1]))


def test_odd_size_pads_with_zero_and_default_unpack_keeps_pad():
    q = torch.tensor([3, -4, 5], dtype=torch.int8)
    packed = pack_int4(q, dim=0)
    assert packed.tolist() == [_byte(3, -4), _byte(5, 0)]
    assert unpack_int4(packed, dim=0).tolist() == [3, -4, 5, 0]
    assert unpack_int4(packed, dim=0, size=3).tolist() == [3, -4, 5]


@pytest.mark.parametrize("bad", [[8], [-9], [0, 127], [-128]])
def test_out_of_range_raises(bad):
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor(bad, dtype=torch.int8), dim=0)


def test_wrong_dtype_and_size_raise():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([1, 2], dtype=torch.int32), dim=0)
    with pytest.raises(ValueError):
        unpack_int4(torch.tensor([1, 2], dtype=torch.int8), dim=0, size=7)


# ---- W4A16 MoE experts: LLM-Compressor's int32 words (vLLM-Ascend methods/w4a16.py unpack_from_int32) ----------
def _engine_unpack_from_int32(weight, k):
    """vLLM-Ascend 0.23.0 `unpack_from_int32(weight, shape, 4, packed_dim=1)`, rewritten from its source: column
    i::8 of the result takes nibble i of each word, minus the offset 8."""
    out = torch.zeros((weight.shape[0], weight.shape[1] * 8), dtype=torch.int32)
    for i in range(8):
        out[:, i::8] = (weight >> (4 * i)) & 15
    return (out[:, :k] - 8).to(torch.int8)


def test_int32_words_offset_binary_element0_lowest_nibble():
    from qcompiler.backends.ascend.int4 import pack_int4_int32
    # [1, -2, 0...]: nibble 0 = 1 + 8 = 9, nibble 1 = -2 + 8 = 6, the rest 8 -> 0x88888869
    got = pack_int4_int32(torch.tensor([[1, -2, 0, 0, 0, 0, 0, 0]], dtype=torch.int8))
    assert got.dtype == torch.int32 and got.item() & 0xFFFFFFFF == 0x88888869
    # the sign bit: a 7 in the top nibble gives 0xF... (negative int32)
    assert pack_int4_int32(torch.tensor([[0] * 7 + [7]], dtype=torch.int8)).item() < 0


def test_int32_words_round_trip_and_engine_unpack():
    from qcompiler.backends.ascend.int4 import pack_int4_int32, unpack_int4_int32
    q = _rand_int4(6, 40, seed=3)
    p = pack_int4_int32(q)
    assert p.shape == (6, 5)
    assert torch.equal(unpack_int4_int32(p), q)
    assert torch.equal(_engine_unpack_from_int32(p, 40), q)


def test_int32_words_errors():
    from qcompiler.backends.ascend.int4 import pack_int4_int32, unpack_int4_int32
    with pytest.raises(ValueError, match="k % 8"):
        pack_int4_int32(torch.zeros(2, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match="values in"):
        pack_int4_int32(torch.full((1, 8), 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="int32"):
        unpack_int4_int32(torch.zeros(1, 1, dtype=torch.int8))


def test_cpu_shift_unpack_equals_arithmetic_on_every_byte():
    """unpack_int4's CPU path (int8 shifts) and its any-device path (int32 arithmetic) give the same nibbles for
    all 256 bytes, in a contiguous and a strided (moved) layout."""
    b = torch.arange(-128, 128, dtype=torch.int8)
    for x in (b, b.reshape(16, 16).t()):
        lo_s, hi_s = nibbles_shift(x)
        lo_a, hi_a = nibbles_arithmetic(x)
        assert lo_s.dtype == hi_s.dtype == torch.int8
        assert torch.equal(lo_s, lo_a) and torch.equal(hi_s, hi_a)
    lo, hi = nibbles_shift(b)
    assert [(int(l), int(h)) for l, h in zip(lo, hi)] == [((v & 0xF) - 16 * ((v >> 3) & 1), v >> 4) for v in range(-128, 128)]


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_cpu_unpack_in_place_equals_the_any_device_path(dim):
    """unpack_int4's CPU path (nibbles written in place along `dim`, no transposes) equals the any-device
    path (`nibbles_arithmetic` on the moved bytes, stacked, moved back) on every byte value, 3-D, contiguous and
    strided input, full and odd (trimmed) sizes."""
    b = torch.arange(-128, 128, dtype=torch.int8).repeat(3)[: 4 * 6 * 8].reshape(4, 6, 8)
    for x in (b, b.transpose(0, 2).contiguous().transpose(0, 2)):
        for size in (2 * x.shape[dim], 2 * x.shape[dim] - 1):
            moved = x.movedim(dim, -1)
            lo, hi = nibbles_arithmetic(moved)
            want = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :size].movedim(-1, dim)
            got = unpack_int4(x, dim=dim, size=size)
            assert got.is_contiguous() and torch.equal(got, want)
