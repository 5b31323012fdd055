"""Passes. Every pass module is imported here explicitly: a broken pass fails loudly at import.

User-facing schemes: w8a8, w8a8d, w8a8mix, w8a16, w4a16, w4a8d, w8a8s and w16a16s (need sparse before them).
Float transforms before them: smooth, sparse, awq, gptq.
After them: kv8, fa3 (attention: int8 KV cache, per-head Q/K/V); simulate_tp (N-card row-parallel Linears); fallback (keeps the most sensitive Linears float; model-wide, see fallback.presweep).
Internal (appended by the driver): observe, calibrate, and the target's lowering `lower` (backends/ascend/lower.py,
registered when qcompiler.backends.ascend is imported: passes never import a backend).
"""
from . import awq, calibrate, fallback, gptq, observe, smooth, w4a8d, w4a16, w8a8, w8a8d, w8a8mix, w8a16  # noqa: F401
from . import sparse, w8a8s, w16a16s  # noqa: F401  (sparsity: issue 6; w16a16s: issue 14)
from . import fa3, kv8  # noqa: F401  (attention quantization: issue 5)
from . import simulate_tp  # noqa: F401  (msModelSlim tp_size: issue 14)
from .base import LayerContext, Pass, PassResult  # noqa: F401
from .manager import PassManager  # noqa: F401
from .registry import REGISTRY, make_pass, register, user_pass_names  # noqa: F401

#: appended after the user's passes, in this order ("lower": the backend's, see above)
TAIL = ("observe", "calibrate", "lower")
