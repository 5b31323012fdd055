"""int4 packing helpers for the Ascend artifact (spec: ascend-artifact.md sec. 3, W4A16 / W4A8_DYNAMIC).

Contract: two int4 values (two's complement, [-8, 7]) share one int8 byte; along the packed dimension,
element `2i` sits in the low nibble and element `2i+1` in the high nibble. Example: packing [1, -2]
gives 0xE1, i.e. int8 -31.

Where the spec packs (dim is the caller's choice here):
- W4A16 per-channel: along k, [n, k] -> [n, k/2]  (`pack_int4(q, dim=1)`)
- W4A16 per-group and W4A8_DYNAMIC: along n, [n, k] -> [n/2, k]  (`pack_int4(q, dim=0)`)

W4A16 MoE experts use another layout, LLM-Compressor's, the only one vLLM-Ascend's W4A16 fused-MoE method
reads (vllm_ascend/quantization/methods/w4a16.py `unpack_from_int32`, packed_dim 1): eight int4 values per
int32 along k, [n, k] -> int32 [n, k/8]; element `8j+i` sits in bits 4i..4i+3 of word j as the offset-binary
code value + 8 in [0, 15] (`pack_int4_int32`, `unpack_int4_int32`). Example: [1, -2, 0, 0, 0, 0, 0, 0] packs
to 0x88888869.

Limits: an odd size along `dim` is padded with one zero element; `unpack_int4(..., size=)` trims it.
"""
from __future__ import annotations

import torch
from torch import Tensor

INT4_MIN, INT4_MAX = -8, 7


def pack_int4(q: Tensor, dim: int) -> Tensor:
    """Pack int8 values in [-8, 7] two per byte along `dim` (result size ceil(size / 2) there)."""
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4 expects int8 values in [-8, 7], got dtype {q.dtype}")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(
            f"pack_int4 expects values in [-8, 7], got range [{int(q.min())}, {int(q.max())}]"
        )
    moved = q.movedim(dim, -1)
    if moved.shape[-1] % 2:
        moved = torch.nn.functional.pad(moved, (0, 1))  # zero element; trimmed by unpack(size=)
    # Plain int32 arithmetic (no bit ops, so it runs on any device): hi * 16 lies in [-128, 112] and
    # the low nibble's two's complement code lo mod 16 in [0, 15]; their sum is the byte, in int8 range.
    lo = torch.remainder(moved[..., 0::2].to(torch.int32), 16)
    hi = moved[..., 1::2].to(torch.int32) * 16
    return (hi + lo).to(torch.int8).movedim(-1, dim).contiguous()


def unpack_int4(p: Tensor, dim: int, size: int | None = None) -> Tensor:
    """Inverse of `pack_int4`: int8 values in [-8, 7], `size` elements along `dim` (default 2x)."""
    if p.dtype != torch.int8:
        raise ValueError(f"unpack_int4 expects packed int8, got dtype {p.dtype}")
    full = 2 * p.shape[dim]
    if size is None:
        size = full
    if not full - 1 <= size <= full:
        raise ValueError(
            f"unpack_int4: size {size} does not match {p.shape[dim]} packed bytes along dim {dim} "
            f"(expected {full - 1} or {full})"
        )
    if p.device.type == "cpu":  # nibbles written in place, along dim itself: no stack copy, no transposes
        d = dim % p.dim()
        out = torch.empty(*p.shape[:d + 1], 2, *p.shape[d + 1:], dtype=torch.int8)
        nibbles_shift(p, out=(out.select(d + 1, 0), out.select(d + 1, 1)))
        return out.flatten(d, d + 1).narrow(d, 0, size).contiguous()
    moved = p.movedim(dim, -1)
    lo, hi = nibbles_arithmetic(moved)
    out = torch.stack((lo, hi), dim=-1).flatten(-2)[..., :size]
    return out.movedim(-1, dim).contiguous()


def nibbles_arithmetic(b: Tensor) -> tuple[Tensor, Tensor]:
    """(low, high) nibbles of int8 bytes `b` as int8 in [-8, 7], in plain int32 arithmetic (no bit ops, so it
    runs on any device, as pack_int4)."""
    wide = b.to(torch.int32)
    hi = torch.div(wide, 16, rounding_mode="floor")  # floor division = arithmetic shift by 4
    lo = wide - hi * 16  # low nibble code in [0, 15]
    lo = torch.where(lo >= 8, lo - 16, lo)  # two's complement nibble -> [-8, 7]
    return lo.to(torch.int8), hi.to(torch.int8)


def nibbles_shift(b: Tensor, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """`nibbles_arithmetic` with int8 shifts (the CPU path: a third of its time, and the executable graph
    unpacks every int4 weight at load): `>> 4` is arithmetic (sign-extending) and `<< 4` wraps modulo 256,
    so `(b << 4) >> 4` is the sign-extended low nibble. `out`: int8 (low, high) tensors of b's shape (any
    strides) to write them into. tests/backends/ascend/test_int4.py: equal on all 256 bytes."""
    if out is None:
        return torch.bitwise_right_shift(torch.bitwise_left_shift(b, 4), 4), torch.bitwise_right_shift(b, 4)
    lo, hi = out
    torch.bitwise_left_shift(b, 4, out=lo).bitwise_right_shift_(4)
    torch.bitwise_right_shift(b, 4, out=hi)
    return lo, hi


PACK_FACTOR_INT32 = 8  # int4 values per int32 word (LLM-Compressor's pack_factor)


def pack_int4_int32(q: Tensor) -> Tensor:
    """int8 [n, k] values in [-8, 7] -> int32 [n, k/8] in LLM-Compressor's offset-binary layout (module
    docstring); k must be a multiple of 8 (vLLM-Ascend's get_weight asserts it for the fused-MoE sizes)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int4_int32 expects int8 [n, k], got {q.dtype} {list(q.shape)}")
    if q.shape[1] % PACK_FACTOR_INT32:
        raise ValueError(f"pack_int4_int32 needs k % 8 == 0, got shape {list(q.shape)}")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError(f"pack_int4_int32 expects values in [-8, 7], got range [{int(q.min())}, {int(q.max())}]")
    codes = (q.to(torch.int64) + 8).reshape(q.shape[0], -1, PACK_FACTOR_INT32)  # [n, k/8, 8] in [0, 15]
    shifts = torch.arange(PACK_FACTOR_INT32, dtype=torch.int64) * 4
    words = (codes << shifts).sum(dim=-1)              # [0, 2^32): the int32 bit pattern as an unsigned value
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


def unpack_int4_int32(p: Tensor, k: int | None = None) -> Tensor:
    """Inverse of `pack_int4_int32` (vLLM-Ascend's `unpack_from_int32`, packed_dim 1, num_bits 4): int8 [n, k]
    values in [-8, 7]; `k` (default 8 x the packed columns) may trim the last word's padding."""
    if p.dtype != torch.int32 or p.dim() != 2:
        raise ValueError(f"unpack_int4_int32 expects int32 [n, k/8], got {p.dtype} {list(p.shape)}")
    full = PACK_FACTOR_INT32 * p.shape[1]
    k = full if k is None else k
    if not full - PACK_FACTOR_INT32 < k <= full:
        raise ValueError(f"unpack_int4_int32: k={k} does not match {p.shape[1]} packed int32 columns")
    shifts = torch.arange(PACK_FACTOR_INT32, dtype=torch.int32) * 4
    codes = (p.unsqueeze(-1) >> shifts) & 15            # arithmetic shift, then the nibble: [n, k/8, 8]
    return (codes - 8).to(torch.int8).reshape(p.shape[0], full)[:, :k].contiguous()
