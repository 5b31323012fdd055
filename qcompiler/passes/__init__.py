"""Passes. Every pass module is imported here explicitly: a broken pass fails loudly at import.

User-facing: w8a8. Internal (appended by the driver): observe, calibrate, lower.
"""
from . import calibrate, lower, observe, w8a8  # noqa: F401
from .base import LayerContext, Pass, PassResult  # noqa: F401
from .manager import PassManager  # noqa: F401
from .registry import REGISTRY, make_pass, register, user_pass_names  # noqa: F401

#: appended after the user's passes, in this order
TAIL = ("observe", "calibrate", "lower")
