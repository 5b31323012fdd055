"""Calibration activations must be finite: refuse instead of writing an artifact that computes NaN/Inf.

The driver calls these while it runs the calibration data through the model, so the executable graph it
writes is known to give finite logits on that data:
- `check_finite(hidden, layer, dtype, what)`: QCError naming the layer when a layer's output has NaN/Inf:
  the lowered layer the executable graph holds (always), and, to say why, the float layer when a float16
  layer failed (a pass cannot calibrate on Inf, or the lowered output is not finite);
- `check_logits(head, hidden, dtype)`: the same for the final norm and lm_head (a bound first; the logits
  are computed only when the bound does not prove them finite).
In float16 the cause is almost always activations beyond float16's range (65504), so the message says so
and suggests --dtype bfloat16 (same exponent range as float32). Limits: data other than the calibration set
may still overflow; the check states what was seen, not a proof.
"""
import torch

from .errors import QCError
from .loading import row_blocks

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
    """QCError when the final norm + lm_head give NaN/Inf on the last layer's (finite) calibration outputs.

    Cheap first: by Cauchy-Schwarz every logit (and every partial sum of it) is at most max ||normed token||
    x max ||lm_head row||; only when that bound reaches the dtype's maximum are the logits computed."""
    limit = torch.finfo(dtype).max
    with torch.inference_mode():  # the row norms block by block: never a float32 copy of the whole lm_head
        rows = max(float(b.float().norm(dim=1).max()) for b in row_blocks(head.lm_head_weight))
        for start in range(0, hidden.shape[0], LOGIT_WINDOWS):
            chunk = hidden[start:start + LOGIT_WINDOWS]
            normed = head.final_norm(chunk)
            if not bool(torch.isfinite(normed).all()):
                raise QCError(f"the final norm (before lm_head) produces NaN/Inf in {str(dtype)[6:]} on the "
                              f"calibration data: {_advice(dtype)}")
            if float(normed.float().norm(dim=-1).max() * rows) < limit:
                continue
            if not bool(torch.isfinite(head.logits(chunk)).all()):
                raise QCError(f"the final norm and lm_head produce NaN/Inf in {str(dtype)[6:]} on the calibration "
                              f"data: {_advice(dtype)}")
