"""Passes. Every pass module is imported here explicitly: a broken pass fails loudly at import.

User-facing schemes: w8a8, w8a8d, w8a8mix, w8a16, w4a16, w4a8d. Float transforms before them: smooth, awq, gptq.
Internal (appended by the driver): observe, calibrate, lower.
"""
from . import awq, calibrate, gptq, lower, observe, smooth, w4a8d, w4a16, w8a8, w8a8d, w8a8mix, w8a16  # noqa: F401
from .base import LayerContext, Pass, PassResult  # noqa: F401
from .manager import PassManager  # noqa: F401
from .registry import REGISTRY, make_pass, register, user_pass_names  # noqa: F401

#: appended after the user's passes, in this order
TAIL = ("observe", "calibrate", "lower")
