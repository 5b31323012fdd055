"""CPU kernels that reproduce the Ascend NPU quantized ops (spec: ascend-artifact.md sec. 3 and 4).

Purpose: the executable graph runs here with the numerics the NPU kernels have, so accuracy measured
on CPU is the accuracy the deployed artifact gets. Each `*_ref` function is the spec's math written
plainly; the functions without the suffix are the fast CPU paths `torch.ops.qc.*` call, and they are
bit-identical to the reference (tests/backends/ascend/test_kernels.py checks that).

Contract (shapes as the artifact stores them; `n` outputs, `k` inputs; "..." any leading dims):
- `quantize(x, input_scale, input_offset)`: static per-tensor activation quantization as the engines
  do it, with the reciprocal rounded to x's dtype first: `recip = dtype(1 / dtype(s_x))`.
- `quant_matmul(x int8 [..., k], weight int8 [n, k], deq_scale [n] f32 or int64-encoded, quant_bias
  int32 [n])`: W8A8 static, `dtype((x @ W^T + quant_bias) * deq_scale)`.
- `dynamic_quant(x)`: per-token symmetric int8, returns `(y int8 [..., k], scale f32 [...])`.
- `quant_matmul_pertoken(...)`: W8A8_DYNAMIC / W4A8_DYNAMIC matmul with per-token and per-channel scales.
- `weight_quant_matmul(...)`: W8A16 / W4A16 weight-only matmul (`+ offset` NPU semantics).

Integer products are exact: the accumulator is int32 on the NPU; here it is computed exactly (int32
via `torch._int_mm` when |acc| provably fits, else float64, exact below 2^53) and not wrapped, so the
two agree whenever the NPU's int32 does not overflow (k <= 131071 keeps the product in range).
Rounding is round-half-to-even everywhere (`torch.round`).

Limits: NaN/inf inputs are not handled specially (the int8 cast of NaN is undefined, as on any device);
`dynamic_quant` needs k > 0.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...ir import qnumerics as qn
from .int4 import unpack_int4

# Weight packings, as the artifact stores them (spec sec. 3).
PACK_NONE = 0  # int8 [n, k]
PACK_INT4_K = 1  # int4 packed along k: [n, ceil(k/2)] (W4A16 per-channel)
PACK_INT4_N = 2  # int4 packed along n: [ceil(n/2), k] (W4A16 per-group, W4A8_DYNAMIC)

_MAX_PRODUCT = 128 * 128  # largest |int8 * int8|
_INT32_MAX = 2**31 - 1
# `torch._int_mm` accumulates in int32: exact while k * 128 * 128 cannot exceed int32.
INT_MM_MAX_K = _INT32_MAX // _MAX_PRODUCT  # 131071
# float64 sums of integer products are exact (in any order) below 2^53.
_FLOAT64_MAX_K = 2**53 // _MAX_PRODUCT


# --------------------------------------------------------------------------------------------------
# helpers


def decode_deq_scale(deq_scale: Tensor) -> Tensor:
    """float32 deq_scale from either encoding: float32 as is, or int64 whose low 32 bits are the
    IEEE-754 bits of a float32 (fp16 artifacts: `np.frombuffer(f32.tobytes(), np.int32).astype(int64)`)."""
    if deq_scale.dtype == torch.float32:
        return deq_scale
    if deq_scale.dtype != torch.int64:
        raise ValueError(f"deq_scale must be float32 or int64-encoded, got {deq_scale.dtype}")
    return qn.int64_bits_to_float32(deq_scale, check=False)  # the one codec (ir/qnumerics.py)


def _check_int8_pair(x: Tensor, weight: Tensor, what: str) -> None:
    if x.dtype != torch.int8 or weight.dtype != torch.int8:
        raise ValueError(f"{what}: x and weight must be int8, got {x.dtype} and {weight.dtype}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{what}: x [..., k] and weight [n, k] disagree: {tuple(x.shape)} vs {tuple(weight.shape)}"
        )


def unpack_weight(weight: Tensor, packing: int, n: int, k: int) -> Tensor:
    """int8 [n, k] weight from its stored packing (PACK_NONE, PACK_INT4_K or PACK_INT4_N)."""
    if packing == PACK_NONE:
        w = weight
    elif packing == PACK_INT4_K:
        w = unpack_int4(weight, dim=1, size=k)
    elif packing == PACK_INT4_N:
        w = unpack_int4(weight, dim=0, size=n)
    else:
        raise ValueError(f"unknown weight packing {packing} (0 int8, 1 int4 along k, 2 int4 along n)")
    if w.dtype != torch.int8 or tuple(w.shape) != (n, k):
        raise ValueError(
            f"weight {tuple(weight.shape)} {weight.dtype} with packing {packing} "
            f"is not an int8 [n={n}, k={k}]"
        )
    return w


# --------------------------------------------------------------------------------------------------
# integer matmul: reference and fast path


def int_matmul_ref(x: Tensor, weight: Tensor) -> Tensor:
    """Exact `x @ weight.T` as int64 ([..., k] x [n, k] -> [..., n]), via float64 (exact below 2^53)."""
    _check_int8_pair(x, weight, "int_matmul")
    if x.shape[-1] >= _FLOAT64_MAX_K:
        raise ValueError(f"k={x.shape[-1]} too large for an exact float64 accumulation")
    return (x.double() @ weight.double().T).to(torch.int64)


def int_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """Exact `x @ weight.T` ([..., k] x [n, k] -> [..., n]); int32 when `torch._int_mm` applies.

    On this torch (2.13 CPU) `_int_mm` takes any 2-D int8 shapes (M=1, odd k and n, non-contiguous
    operands were all checked exact); the M > 16 / multiple-of-8 limits are CUDA-only. The one limit
    that matters for exactness is its int32 accumulator, hence k <= INT_MM_MAX_K. `weight.t()` is
    passed as a view: no per-call copy of the weight.
    """
    _check_int8_pair(x, weight, "int_matmul")
    k, n = weight.shape[1], weight.shape[0]
    if x.device.type == "cpu" and k <= INT_MM_MAX_K:
        rows = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous when k == 0
        acc = torch._int_mm(x.reshape(rows, k), weight.t())
        return acc.reshape(*x.shape[:-1], n)
    return int_matmul_ref(x, weight)


# --------------------------------------------------------------------------------------------------
# qc::quantize


def quantize(x: Tensor, input_scale: Tensor, input_offset: Tensor) -> Tensor:
    """Static per-tensor int8 quantization as npu_quantize runs it in the engines (spec sec. 3 W8A8).

    `recip = dtype(1 / dtype(s_x))` (the engines hold input_scale in the model dtype and pass its
    reciprocal, again in the model dtype), then `clamp(rint(f32(x) * f32(recip) + f32(o_x)), -128, 127)`.
    """
    dt = x.dtype
    recip = (1 / input_scale.to(dt)).to(dt)
    # torch.mul promotes x to float32 inside the kernel (exact): one pass instead of x.float() then *;
    # the in-place ops below keep the same float32 rounding steps as the written-out formula.
    y = torch.mul(x, recip.float())
    y.add_(input_offset.float()).round_().clamp_(-128, 127)
    return y.to(torch.int8)


# --------------------------------------------------------------------------------------------------
# qc::quant_matmul (W8A8 static)


def quant_matmul_ref(
    x: Tensor, weight: Tensor, deq_scale: Tensor, quant_bias: Tensor, output_dtype: torch.dtype
) -> Tensor:
    """`dtype(f32(x @ W^T + quant_bias) * deq_scale_f32)`, integer part exact (spec sec. 4)."""
    acc = int_matmul_ref(x, weight) + quant_bias.to(torch.int64)
    return (acc.to(torch.float32) * decode_deq_scale(deq_scale)).to(output_dtype)


def quant_matmul(
    x: Tensor, weight: Tensor, deq_scale: Tensor, quant_bias: Tensor, output_dtype: torch.dtype
) -> Tensor:
    """Fast path of `quant_matmul_ref`, bit-identical: `torch._int_mm` for the product, then the bias
    in int32 when the sum provably cannot overflow (else int64). Both integer sums are exact and the
    integer -> float32 conversion rounds the same exact value, so the result equals the reference."""
    acc = int_matmul(x, weight)
    if acc.dtype == torch.int32 and not _int32_sum_safe(x.shape[-1], quant_bias):
        acc = acc.to(torch.int64)
    acc.add_(quant_bias.to(acc.dtype))
    # int * float32 promotes inside one kernel (same int -> float32 rounding as .to(float32)) and the
    # out= store rounds float32 -> output dtype exactly like .to(): one memory pass instead of three.
    out = torch.empty(acc.shape, dtype=output_dtype)
    return torch.mul(acc, decode_deq_scale(deq_scale), out=out)


def _int32_sum_safe(k: int, bias: Tensor) -> bool:
    """True when |x @ W^T| + |bias| <= int32 max for any int8 operands with this k."""
    bias_max = int(bias.to(torch.int64).abs().max()) if bias.numel() else 0
    return k * _MAX_PRODUCT + bias_max <= _INT32_MAX


# --------------------------------------------------------------------------------------------------
# qc::dynamic_quant


def dynamic_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8 (npu_dynamic_quant): per row over the last dim
    `s = max|f32(x)| / 127` in float32 (s == 0 -> 1), `y = clamp(round(f32(x) / s), -128, 127)`.
    Returns `(y int8 [..., k], s float32 [...])`."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"dynamic_quant needs a non-empty last dim, got shape {tuple(x.shape)}")
    xf = x.float()
    s = xf.abs().amax(dim=-1) / 127
    s = torch.where(s == 0, torch.ones_like(s), s)  # all-zero rows quantize to zeros with scale 1
    y = torch.round(xf / s.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return y, s


# --------------------------------------------------------------------------------------------------
# qc::quant_matmul_pertoken (W8A8_DYNAMIC, W4A8_DYNAMIC)


def _pertoken_weight(weight: Tensor, weight_scale: Tensor, packing: int, k: int) -> Tensor:
    if packing not in (PACK_NONE, PACK_INT4_N):
        raise ValueError(f"quant_matmul_pertoken takes packing 0 (int8) or 2 (int4 along n), got {packing}")
    return unpack_weight(weight, packing, weight_scale.shape[0], k)


def _pertoken_epilogue(
    acc: Tensor,
    weight_scale: Tensor,
    pertoken_scale: Tensor,
    bias: Tensor | None,
    output_dtype: torch.dtype,
) -> Tensor:
    # float32, left to right: ((f32(acc) * weight_scale) * pertoken_scale) + bias, then one rounding
    # to the output dtype.
    n = weight_scale.shape[0]
    y = acc.to(torch.float32) * weight_scale.float().reshape(n) * pertoken_scale.float().unsqueeze(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(output_dtype)


def quant_matmul_pertoken_ref(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    pertoken_scale: Tensor,
    bias: Tensor | None,
    packing: int,
    output_dtype: torch.dtype,
) -> Tensor:
    """npu_quant_matmul with pertoken_scale, in float32 and in this order:
    `y = ((f32(x @ W^T) * weight_scale[n]) * pertoken_scale[..., None]) + f32(bias)`, then
    `y.to(output_dtype)`. `x @ W^T` is exact (int); weight int8 [n, k] or int4 packed along n."""
    w = _pertoken_weight(weight, weight_scale, packing, x.shape[-1])
    return _pertoken_epilogue(int_matmul_ref(x, w), weight_scale, pertoken_scale, bias, output_dtype)


def quant_matmul_pertoken(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    pertoken_scale: Tensor,
    bias: Tensor | None,
    packing: int,
    output_dtype: torch.dtype,
) -> Tensor:
    """Fast path of `quant_matmul_pertoken_ref` (`torch._int_mm` product), bit-identical to it."""
    w = _pertoken_weight(weight, weight_scale, packing, x.shape[-1])
    return _pertoken_epilogue(int_matmul(x, w), weight_scale, pertoken_scale, bias, output_dtype)


# --------------------------------------------------------------------------------------------------
# qc::weight_quant_matmul (W8A16, W4A16)


def _expand_groups(t: Tensor, group_size: int, n: int, k: int, what: str) -> Tensor:
    """[n, 1] (group_size 0) or [n, ceil(k/g)] per-group -> something that broadcasts to [n, k]."""
    if group_size == 0:
        if tuple(t.shape) != (n, 1):
            raise ValueError(f"{what} must be [n, 1] = [{n}, 1] per-channel, got {tuple(t.shape)}")
        return t
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0, got {group_size}")
    groups = -(-k // group_size)
    if tuple(t.shape) != (n, groups):
        raise ValueError(f"{what} must be [n, ceil(k/g)] = [{n}, {groups}], got {tuple(t.shape)}")
    return t.repeat_interleave(group_size, dim=1)[:, :k]


def dequantize_weight(
    weight: Tensor,
    antiquant_scale: Tensor,
    antiquant_offset: Tensor,
    group_size: int,
    packing: int,
    k: int,
    dtype: torch.dtype,
) -> Tensor:
    """`W = (w + offset) * scale` in `dtype` (npu_weight_quant_batchmatmul: `+ offset`), [n, k]."""
    n = antiquant_scale.shape[0]
    w = unpack_weight(weight, packing, n, k)
    scale = _expand_groups(antiquant_scale, group_size, n, k, "antiquant_scale").to(dtype)
    offset = _expand_groups(antiquant_offset, group_size, n, k, "antiquant_offset").to(dtype)
    return (w.to(dtype) + offset) * scale


def weight_quant_matmul(
    x: Tensor,
    weight: Tensor,
    antiquant_scale: Tensor,
    antiquant_offset: Tensor,
    bias: Tensor | None,
    group_size: int,
    packing: int,
) -> Tensor:
    """Weight-only matmul in x's dtype: `y = x @ W^T (+ dtype(bias))` with `W` from `dequantize_weight`.

    This is both the reference and the CPU path: dequantize + one matmul in x's dtype.
    `torch._weight_int8pack_mm` was measured not bit-identical (it scales after accumulating), so it
    is not used. The NPU accumulates in float32 in its own order, so CPU and NPU agree to matmul
    rounding only, not bit for bit.
    """
    if not x.dtype.is_floating_point:
        raise ValueError(f"weight_quant_matmul expects float activations, got {x.dtype}")
    w = dequantize_weight(
        weight, antiquant_scale, antiquant_offset, group_size, packing, x.shape[-1], x.dtype
    )
    y = x @ w.T
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y
