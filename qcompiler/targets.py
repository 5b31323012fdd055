"""Ascend targets: which dtypes and artifact quant types each device runs (spec section 5).

`check_target(target, dtype, quant_types)` is called before any work: an impossible request is a
QCError with the reason; a type the spec marks *unsure* for a target is a warning. W16A16S (float sparse)
loads in MindIE only (a FastLinear on the pruned float weight, atb_llm/utils/layers/linear/__init__.py
`get_linear`; vLLM-Ascend registers no W16A16S scheme): allowed with that warning on both devices.
"""
from dataclasses import dataclass

import torch

from .errors import QCError


@dataclass(frozen=True)
class Target:
    name: str
    device: str
    dtypes: frozenset
    quant_types: frozenset        # supported
    unsure_types: frozenset = frozenset()   # allowed with a warning


TARGETS = {
    "ascend910b": Target("ascend910b", "Atlas 800I A2", frozenset({torch.bfloat16, torch.float16}),
                         frozenset({"W8A8", "W8A8_DYNAMIC", "W8A8_MIX", "W8A16", "W4A16", "W4A8_DYNAMIC",
                                    "C8", "FAQuant"}),
                         frozenset({"W16A16S"})),
    # W8A8_DYNAMIC: vLLM-Ascend has a 310P scheme (vllm_ascend/_310p/quantization/methods/w8a8_dynamic.py);
    # which engine loads what on each device: backends/ascend/engines.py (checked before any work, --engine)
    "ascend310p": Target("ascend310p", "Atlas 300I Duo", frozenset({torch.float16}),
                         frozenset({"W8A8", "W8A8S", "W8A16", "W8A8_DYNAMIC"}),
                         frozenset({"W8A8_MIX", "W4A16", "W4A8_DYNAMIC", "C8", "FAQuant", "W16A16S"})),
    # ONNX (backends/onnx): the Ascend artifact + executable graph are made as for ascend910b (same
    # dtypes), then lowered to OUT/onnx/model.onnx, which onnxruntime runs in float32.
    "onnx": Target("onnx", "onnxruntime CPU", frozenset({torch.bfloat16, torch.float16}),
                   frozenset({"W8A8", "W8A8_DYNAMIC", "W8A8_MIX", "W8A16", "W4A16", "W4A8_DYNAMIC", "W8A8S",
                              "W16A16S", "C8", "FAQuant"})),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise QCError(f"unknown --target {name!r}; supported: {', '.join(TARGETS)}")
    return TARGETS[name]


def check_target(target: Target, dtype: torch.dtype, quant_types: set[str]) -> list[str]:
    """Raise QCError if the target cannot run this; return warnings for types the spec is unsure of."""
    dname = str(dtype).replace("torch.", "")
    if dtype not in target.dtypes:
        allowed = ", ".join(sorted(str(d).replace("torch.", "") for d in target.dtypes))
        hint = " (use --dtype float16)" if torch.float16 in target.dtypes else ""
        raise QCError(f"target {target.name} ({target.device}) runs {allowed} only, not {dname}{hint}")
    warnings = []
    for t in sorted(quant_types):
        if t in target.quant_types:
            continue
        if t in target.unsure_types:
            warnings.append(f"{t} on {target.name} is not confirmed to run; verify on the device")
        else:
            others = [n for n, o in TARGETS.items() if t in o.quant_types]
            hint = f" ({t} runs on --target {', '.join(others)})" if others else ""
            raise QCError(f"target {target.name} does not run {t}; it runs "
                          f"{', '.join(sorted(target.quant_types))}{hint}")
    return warnings
