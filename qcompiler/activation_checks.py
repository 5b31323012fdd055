"""Calibration activations must be finite: refuse instead of writing an artifact that computes NaN/Inf.

The driver calls these while it runs the calibration data through the model, so the executable graph it
writes is known to give finite logits on that data:
- `check_finite(hidden, layer, dtype, what)`: QCError naming the layer when a layer's output (float layer
  before the passes, or the lowered layer the executable graph holds) has NaN/Inf;
- `check_logits(head, hidden, dtype)`: the same for the final norm and lm_head, chunk by chunk.
In float16 the cause is almost always activations beyond float16's range (65504), so the message says so
and suggests --dtype bfloat16 (same exponent range as float32). Limits: data other than the calibration set
may still overflow; the check states what was seen, not a proof.
"""
import torch

from .errors import QCError

#: windows per lm_head chunk (logits are windows x seq_len x vocab floats)
LOGIT_WINDOWS = 4


def _advice(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return (f"activations exceed float16's range ({torch.finfo(torch.float16).max:.0f}); compile with "
                "--dtype bfloat16")
    return "the model computes NaN/Inf on this data in its own dtype; check the weights and the calibration text"


def check_finite(hidden: torch.Tensor, layer: int, dtype: torch.dtype, what: str) -> None:
    """QCError when `hidden` (layer `layer`'s output on the calibration data, `what` made it) is not finite."""
    if not bool(torch.isfinite(hidden).all()):
        raise QCError(f"layer {layer} (model.layers.{layer}, {what}) produces NaN/Inf in {str(dtype)[6:]} on the "
                      f"calibration data: {_advice(dtype)}")


def check_logits(head, hidden: torch.Tensor, dtype: torch.dtype) -> None:
    """QCError when the final norm + lm_head give NaN/Inf on the last layer's calibration outputs."""
    with torch.inference_mode():
        for start in range(0, hidden.shape[0], LOGIT_WINDOWS):
            if not bool(torch.isfinite(head.logits(hidden[start:start + LOGIT_WINDOWS])).all()):
                raise QCError(f"the final norm and lm_head produce NaN/Inf in {str(dtype)[6:]} on the calibration "
                              f"data: {_advice(dtype)}")
