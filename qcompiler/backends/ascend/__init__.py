"""Ascend backend: fused quantized custom ops (`torch.ops.qc.*`), their CPU kernels reproducing the NPU
math, lazy torch_npu dispatch, and int4 packing helpers (spec: shared/spec/ascend-artifact.md).

Importing this package registers the ops; torch_npu is never imported here (it needs CANN and an NPU).
"""
from . import ops  # noqa: F401  registers torch.ops.qc.*
from . import attention  # noqa: F401  registers qc::kv_quant, fa_quant, cached_attention, ...
