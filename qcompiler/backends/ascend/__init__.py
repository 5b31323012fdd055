"""Ascend backend: fused quantized custom ops (`torch.ops.qc.*`), their CPU kernels reproducing the NPU
math, lazy torch_npu dispatch, and int4 packing helpers (spec: shared/spec/ascend-artifact.md).

Importing this package registers the kernels of the `qc` ops (defined target-neutrally in ir/qc_ops.py) and the
internal `lower` pass (lower.py); torch_npu is never imported here (it needs CANN and an NPU).
"""
from . import ops  # noqa: F401  registers the kernels of torch.ops.qc.* Linear ops
from . import attention  # noqa: F401  registers the kernels of qc::kv_quant, fa_quant, cached_attention, ...
from . import lower  # noqa: F401  registers the internal pass "lower"
