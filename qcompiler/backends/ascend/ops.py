"""The Ascend backend's fused quantized ops, registered as `torch.ops.qc.*` (torch.library custom ops).

Purpose: the lowered graph calls these ops; they stay opaque nodes under torch.export (each has a fake
kernel giving output shape and dtype, symbolic token dims included), run on CPU through
`kernels.py` (numerics of the NPU kernels), and on an NPU through torch_npu.

| op | schema | NPU kernel |
|---|---|---|
| qc::quantize | (Tensor x, Tensor input_scale, Tensor input_offset) -> Tensor | npu_quantize |
| qc::quant_matmul | (Tensor x, Tensor weight, Tensor deq_scale, Tensor quant_bias, ScalarType output_dtype) -> Tensor | npu_quant_matmul |
| qc::dynamic_quant | (Tensor x) -> (Tensor, Tensor) | npu_dynamic_quant |
| qc::quant_matmul_pertoken | (Tensor x, Tensor weight, Tensor weight_scale, Tensor pertoken_scale, Tensor? bias, int packing, ScalarType output_dtype) -> Tensor | npu_quant_matmul |
| qc::quant_matmul_pergroup | (Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_scale_second, Tensor pertoken_scale, int group_size, ScalarType output_dtype) -> Tensor | plain tensor math on every device (see below) |
| qc::weight_quant_matmul | (Tensor x, Tensor weight, Tensor antiquant_scale, Tensor antiquant_offset, Tensor? bias, int group_size, int packing) -> Tensor | npu_weight_quant_batchmatmul |

Arguments are the artifact's tensors as stored (weight [n, k] HF layout, scales [n, 1], deq_scale in its
dtype-dependent encoding); see kernels.py for the math and ascend-artifact.md sec. 3-4 for the source.
`packing`: 0 int8 [n, k]; 1 int4 packed along k [n, ceil(k/2)]; 2 int4 packed along n [ceil(n/2), k]; 3 (weight_quant_matmul
only: W4A16 MoE experts) int4 in int32 words along k, offset-binary [n, k/8] (int4.py pack_int4_int32).

NPU (PrivateUse1) kernels import torch_npu inside the function: it needs CANN and a device to import,
and a tensor on the NPU means torch_npu is loaded already. They cannot run here; the tests check their
argument encoding against a stand-in torch_npu written from the CANN docs.
Limits: int4 weights reach the NPU unpacked to int8 (same integers, same results, not int4 speed).
`qc::quant_matmul_pergroup` (W4A8_DYNAMIC) has one kernel for every device, the plain tensor math of
`kernels.quant_matmul_pergroup`: the fused A8W4 kernel the engines call (aclnnQuantMatmulV5 through MindIE's
`W4A8LinearDynamic`, with the uint64 `npu_trans_quant_param` scale and scale_bias as yoffset) has no documented
torch_npu binding in the releases the spec was written against, so an NPU runs the same formula with its own
float32 matmuls instead (exact group sums; slower than the fused kernel).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .int4 import unpack_int4

_NPU = "privateuseone"  # torch_npu's device; its dispatch key is PrivateUse1


def _out_shape(x: Tensor, n) -> list:
    return [*x.shape[:-1], n]


# --------------------------------------------------------------------------------------------------
# qc::quantize


@torch.library.custom_op(
    "qc::quantize",
    mutates_args=(),
    device_types="cpu",
    schema="(Tensor x, Tensor input_scale, Tensor input_offset) -> Tensor",
)
def quantize(x: Tensor, input_scale: Tensor, input_offset: Tensor) -> Tensor:
    """Static per-tensor int8 activation quantization (W8A8); int8 with x's shape."""
    return kernels.quantize(x, input_scale, input_offset)


@quantize.register_fake
def _(x, input_scale, input_offset):
    return torch.empty_like(x, dtype=torch.int8)


@quantize.register_kernel(_NPU)
def _quantize_npu(x, input_scale, input_offset):
    import torch_npu  # noqa: PLC0415  needs CANN; only reached with NPU tensors

    # As vLLM-Ascend W8A8 calls it: reciprocal of the dtype-rounded scale, in x's dtype, and the
    # offset in x's dtype, both repeated per input channel; multiply mode (div_mode=False).
    k = x.shape[-1]
    recip = (1 / input_scale.to(x.dtype)).to(x.dtype).reshape(1).expand(k).contiguous()
    offset = input_offset.to(x.dtype).reshape(1).expand(k).contiguous()
    return torch_npu.npu_quantize(x, recip, offset, torch.qint8, -1, False)


# --------------------------------------------------------------------------------------------------
# qc::quant_matmul


@torch.library.custom_op(
    "qc::quant_matmul",
    mutates_args=(),
    device_types="cpu",
    schema=(
        "(Tensor x, Tensor weight, Tensor deq_scale, Tensor quant_bias, ScalarType output_dtype) "
        "-> Tensor"
    ),
)
def quant_matmul(
    x: Tensor, weight: Tensor, deq_scale: Tensor, quant_bias: Tensor, output_dtype: torch.dtype
) -> Tensor:
    """W8A8 static: `dtype((x @ W^T + quant_bias) * deq_scale)`, x int8 [..., k] -> [..., n]."""
    return kernels.quant_matmul(x, weight, deq_scale, quant_bias, output_dtype)


@quant_matmul.register_fake
def _(x, weight, deq_scale, quant_bias, output_dtype):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "quant_matmul: x [..., k] vs weight [n, k]")
    return x.new_empty(_out_shape(x, weight.shape[0]), dtype=output_dtype)


@quant_matmul.register_kernel(_NPU)
def _quant_matmul_npu(x, weight, deq_scale, quant_bias, output_dtype):
    import torch_npu  # noqa: PLC0415

    # x2 is [k, n]; deq_scale goes as stored (int64-encoded for fp16 output, float32 for bf16: the
    # encodings the kernel takes); quant_bias is the int32 bias added before scaling.
    k, n = weight.shape[1], weight.shape[0]
    y = torch_npu.npu_quant_matmul(
        x.reshape(-1, k), weight.t().contiguous(), deq_scale, bias=quant_bias, output_dtype=output_dtype
    )
    return y.reshape(_out_shape(x, n))


# --------------------------------------------------------------------------------------------------
# qc::dynamic_quant


@torch.library.custom_op(
    "qc::dynamic_quant", mutates_args=(), device_types="cpu", schema="(Tensor x) -> (Tensor, Tensor)"
)
def dynamic_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8: `(y int8 [..., k], scale float32 [...])`."""
    return kernels.dynamic_quant(x)


@dynamic_quant.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@dynamic_quant.register_kernel(_NPU)
def _dynamic_quant_npu(x):
    import torch_npu  # noqa: PLC0415

    y, scale = torch_npu.npu_dynamic_quant(x)
    return y, scale


# --------------------------------------------------------------------------------------------------
# qc::quant_matmul_pertoken


@torch.library.custom_op(
    "qc::quant_matmul_pertoken",
    mutates_args=(),
    device_types="cpu",
    schema=(
        "(Tensor x, Tensor weight, Tensor weight_scale, Tensor pertoken_scale, Tensor? bias, "
        "int packing, ScalarType output_dtype) -> Tensor"
    ),
)
def quant_matmul_pertoken(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    pertoken_scale: Tensor,
    bias: Tensor | None,
    packing: int,
    output_dtype: torch.dtype,
) -> Tensor:
    """W8A8_DYNAMIC / W4A8_DYNAMIC: float32 `((acc * weight_scale) * pertoken_scale) + bias`, then
    `output_dtype`; weight int8 [n, k] (packing 0) or int4 along n [ceil(n/2), k] (packing 2)."""
    return kernels.quant_matmul_pertoken(
        x, weight, weight_scale, pertoken_scale, bias, packing, output_dtype
    )


@quant_matmul_pertoken.register_fake
def _(x, weight, weight_scale, pertoken_scale, bias, packing, output_dtype):
    torch._check(packing in (0, 2), lambda: f"quant_matmul_pertoken: packing {packing} not in (0, 2)")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "quant_matmul_pertoken: x [..., k] vs weight")
    return x.new_empty(_out_shape(x, weight_scale.shape[0]), dtype=output_dtype)


@quant_matmul_pertoken.register_kernel(_NPU)
def _quant_matmul_pertoken_npu(x, weight, weight_scale, pertoken_scale, bias, packing, output_dtype):
    import torch_npu  # noqa: PLC0415

    n, k = weight_scale.shape[0], x.shape[-1]
    # int4 widened to int8 keeps the same integers, so the int8 kernel gives the W4A8 result.
    w = weight if packing == kernels.PACK_NONE else unpack_int4(weight, dim=0, size=n)
    # weight_scale and bias rounded to the model dtype as the engines hold them, passed as float32
    # (the dtype npu_quant_matmul takes with pertoken_scale for both fp16 and bf16 output)
    y = torch_npu.npu_quant_matmul(
        x.reshape(-1, k),
        w.t().contiguous(),
        weight_scale.to(output_dtype).float().reshape(n),
        pertoken_scale=pertoken_scale.float().reshape(-1),
        bias=None if bias is None else bias.to(output_dtype).float(),
        output_dtype=output_dtype,
    )
    return y.reshape(_out_shape(x, n))


# --------------------------------------------------------------------------------------------------
# qc::quant_matmul_pergroup


@torch.library.custom_op(
    "qc::quant_matmul_pergroup",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_scale_second, Tensor pertoken_scale, "
        "int group_size, ScalarType output_dtype) -> Tensor"
    ),
)
def quant_matmul_pergroup(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    weight_scale_second: Tensor,
    pertoken_scale: Tensor,
    group_size: int,
    output_dtype: torch.dtype,
) -> Tensor:
    """W4A8_DYNAMIC two-stage per-group: x int8 [..., k], weight int4 along n [n/2, k], weight_scale [n, 1],
    weight_scale_second [n, k/group_size], pertoken_scale [...] -> [..., n] in output_dtype."""
    return kernels.quant_matmul_pergroup(
        x, weight, weight_scale, weight_scale_second, pertoken_scale, group_size, output_dtype
    )


@quant_matmul_pergroup.register_fake
def _(x, weight, weight_scale, weight_scale_second, pertoken_scale, group_size, output_dtype):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "quant_matmul_pergroup: x [..., k] vs weight")
    return x.new_empty(_out_shape(x, weight_scale.shape[0]), dtype=output_dtype)


# --------------------------------------------------------------------------------------------------
# qc::weight_quant_matmul


@torch.library.custom_op(
    "qc::weight_quant_matmul",
    mutates_args=(),
    device_types="cpu",
    schema=(
        "(Tensor x, Tensor weight, Tensor antiquant_scale, Tensor antiquant_offset, Tensor? bias, "
        "int group_size, int packing) -> Tensor"
    ),
)
def weight_quant_matmul(
    x: Tensor,
    weight: Tensor,
    antiquant_scale: Tensor,
    antiquant_offset: Tensor,
    bias: Tensor | None,
    group_size: int,
    packing: int,
) -> Tensor:
    """W8A16 / W4A16: `x @ ((w + offset) * scale)^T (+ bias)` in x's dtype; [..., k] -> [..., n]."""
    return kernels.weight_quant_matmul(
        x, weight, antiquant_scale, antiquant_offset, bias, group_size, packing
    )


@weight_quant_matmul.register_fake
def _(x, weight, antiquant_scale, antiquant_offset, bias, group_size, packing):
    torch._check(packing in (0, 1, 2, 3), lambda: f"weight_quant_matmul: packing {packing} not in (0, 1, 2, 3)")
    return x.new_empty(_out_shape(x, antiquant_scale.shape[0]))


@weight_quant_matmul.register_kernel(_NPU)
def _weight_quant_matmul_npu(x, weight, antiquant_scale, antiquant_offset, bias, group_size, packing):
    import torch_npu  # noqa: PLC0415

    dt, k, n = x.dtype, x.shape[-1], antiquant_scale.shape[0]
    w = kernels.unpack_weight(weight, packing, n, k)  # int4 widened to int8: same integers
    # The kernel wants weight [k, n] and scale/offset in x's dtype as [n] (per-channel) or
    # [ceil(k/g), n] (per-group): the transpose of the artifact's [n, 1] / [n, k/g].
    scale = antiquant_scale.to(dt).t().contiguous()
    offset = antiquant_offset.to(dt).t().contiguous()
    if group_size == 0:
        scale, offset = scale.reshape(n), offset.reshape(n)
    # bias: float32 for bf16 activations, fp16 for fp16 (the dtypes the kernel accepts).
    if bias is not None:
        bias = bias.to(torch.float32 if dt == torch.bfloat16 else dt)
    y = torch_npu.npu_weight_quant_batchmatmul(
        x.reshape(-1, k), w.t().contiguous(), scale, offset, bias=bias, antiquant_group_size=group_size
    )
    return y.reshape(_out_shape(x, n))


# The op overloads this module defines, for passes and verifiers that need to recognise them.
QC_OPS = (
    torch.ops.qc.quantize.default,
    torch.ops.qc.quant_matmul.default,
    torch.ops.qc.dynamic_quant.default,
    torch.ops.qc.quant_matmul_pertoken.default,
    torch.ops.qc.quant_matmul_pergroup.default,
    torch.ops.qc.weight_quant_matmul.default,
)
