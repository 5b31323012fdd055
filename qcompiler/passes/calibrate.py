"""calibrate (internal): run the layer's calibration inputs through the graph so observers see data.

The inputs are the outputs of the already-quantized layers before this one (sequential calibration).
Skipped when the graph has no observer (dynamic and weight-only schemes need no activation statistics).
Requires: observed. Produces: calibrated. Does not modify the graph.
"""
import torch

from ..ir import meta
from .base import Pass, PassResult
from .registry import register


@register
class Calibrate(Pass):
    name = "calibrate"
    summary = "feed calibration data through observers"
    requires = frozenset({"observed"})
    produces = frozenset({"calibrated"})
    internal = True

    def run(self, gm, ctx):
        observers = [n for n in gm.graph.nodes if meta.OBSERVER in n.meta]
        if observers:
            with torch.no_grad():
                ctx.run_layer(gm)
        return PassResult(gm, modified=False, stats={"sequences": int(ctx.inputs.hidden.shape[0])})
