"""calibrate (internal): run the layer's calibration inputs through the graph so observers see data.

The inputs are the outputs of the already-quantized layers before this one (sequential calibration).
Skipped when the graph has no observer (dynamic and weight-only schemes need no activation statistics).
Several processes: each observer's statistics are then reduced over every rank (`reduce_across_ranks`; an
observer without one is refused, never used with one rank's statistics).
Requires: observed. Produces: calibrated. Does not modify the graph.
"""
import torch

from ..ir import meta
from ..errors import QCError
from .base import Pass, PassResult
from .properties import CALIBRATED, OBSERVED
from .registry import register


def reduce_observers(gm, observers) -> None:
    """Several processes: every observer's statistics over all ranks' calibration shares (distributed.py)."""
    from .. import distributed
    if distributed.world() <= 1:
        return
    for node in observers:  # graph order: the same on every rank
        module = gm.get_submodule(node.meta[meta.OBSERVER])
        reduce = getattr(module, "reduce_across_ranks", None)
        if reduce is None:
            raise QCError(f"{type(module).__name__} ({node.meta[meta.OBSERVER]}) has no reduction across "
                          "processes: compile with one process")
        reduce()


@register
class Calibrate(Pass):
    name = "calibrate"
    summary = "feed calibration data through observers"
    requires = frozenset({OBSERVED})
    produces = frozenset({CALIBRATED})
    internal = True

    def run(self, gm, ctx):
        observers = [n for n in gm.graph.nodes if meta.OBSERVER in n.meta]
        if observers:
            with torch.no_grad():
                ctx.run_layer(gm)
            reduce_observers(gm, observers)
        return PassResult(gm, modified=False, stats={"sequences": int(ctx.inputs.hidden.shape[0])})
