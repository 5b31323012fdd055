"""The Ascend backend's kernels for the Linear ops of the `qc` vocabulary (`torch.ops.qc.*`, ir/qc_ops.py).

Purpose: the lowered graph calls these ops; ir/qc_ops.py defines them (schema, fake kernel: they stay opaque
nodes under torch.export); importing this module registers how they run: on CPU through `kernels.py` (numerics
of the NPU kernels), and on an NPU through torch_npu.

| op | NPU kernel |
|---|---|
| qc::quantize | npu_quantize |
| qc::quant_matmul | npu_quant_matmul |
| qc::dynamic_quant | npu_dynamic_quant |
| qc::quant_matmul_pertoken | npu_quant_matmul |
| qc::quant_matmul_pergroup | plain tensor math on every device (see below) |
| qc::weight_quant_matmul | npu_weight_quant_batchmatmul |

Schemas and argument encodings: ir/qc_ops.py; the math: kernels.py; the source: ascend-artifact.md sec. 3-4.

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

from ...ir import qc_ops
from . import kernels
from .int4 import unpack_int4

_NPU = "privateuseone"  # torch_npu's device; its dispatch key is PrivateUse1


def _out_shape(x, n) -> list:
    return [*x.shape[:-1], n]


# ---- CPU kernels: the NPU's numerics (kernels.py) ----------------------------------------------------------------
qc_ops.quantize.register_kernel("cpu")(kernels.quantize)
qc_ops.quant_matmul.register_kernel("cpu")(kernels.quant_matmul)
qc_ops.dynamic_quant.register_kernel("cpu")(kernels.dynamic_quant)
qc_ops.quant_matmul_pertoken.register_kernel("cpu")(kernels.quant_matmul_pertoken)
qc_ops.weight_quant_matmul.register_kernel("cpu")(kernels.weight_quant_matmul)
# W4A8_DYNAMIC: one plain-tensor-math kernel for every device (module docstring)
qc_ops.quant_matmul_pergroup.register_kernel(None)(kernels.quant_matmul_pergroup)


# ---- NPU kernels: torch_npu, imported inside each kernel -------------------------------------------------------
@qc_ops.quantize.register_kernel(_NPU)
def _quantize_npu(x, input_scale, input_offset):
    import torch_npu  # noqa: PLC0415  needs CANN; only reached with NPU tensors

    # As vLLM-Ascend W8A8 calls it: reciprocal of the dtype-rounded scale, in x's dtype, and the
    # offset in x's dtype, both repeated per input channel; multiply mode (div_mode=False).
    k = x.shape[-1]
    recip = (1 / input_scale.to(x.dtype)).to(x.dtype).reshape(1).expand(k).contiguous()
    offset = input_offset.to(x.dtype).reshape(1).expand(k).contiguous()
    return torch_npu.npu_quantize(x, recip, offset, torch.qint8, -1, False)


@qc_ops.quant_matmul.register_kernel(_NPU)
def _quant_matmul_npu(x, weight, deq_scale, quant_bias, output_dtype):
    import torch_npu  # noqa: PLC0415

    # x2 is [k, n]; deq_scale goes as stored (int64-encoded for fp16 output, float32 for bf16: the
    # encodings the kernel takes); quant_bias is the int32 bias added before scaling.
    k, n = weight.shape[1], weight.shape[0]
    y = torch_npu.npu_quant_matmul(
        x.reshape(-1, k), weight.t().contiguous(), deq_scale, bias=quant_bias, output_dtype=output_dtype
    )
    return y.reshape(_out_shape(x, n))


@qc_ops.dynamic_quant.register_kernel(_NPU)
def _dynamic_quant_npu(x):
    import torch_npu  # noqa: PLC0415

    y, scale = torch_npu.npu_dynamic_quant(x)
    return y, scale


@qc_ops.quant_matmul_pertoken.register_kernel(_NPU)
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


@qc_ops.weight_quant_matmul.register_kernel(_NPU)
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


# the Linear ops' overloads (defined in ir/qc_ops.py), for this backend's tests and tools
QC_OPS = qc_ops.QC_OPS
