"""calibrate (internal): the layer's one calibration forward, which every observer of the final float graph sees.

Observers: the activation observers of statically quantized Linears (passes/observe.py) and those of the
rewrites kv8 and fa3 queued (`ctx.pending`): calibration/forward.py runs the calibration data once, cut at each
pending rewrite, which it applies (K/V quantized) before anything downstream runs; nothing after the last
observer runs. The inputs are the outputs of the already-quantized layers before this one (sequential
calibration). No forward when there is nothing to observe (dynamic and weight-only schemes without kv8/fa3).
Several processes: each observer's statistics are then reduced over every rank (`reduce_across_ranks`; an
observer without one is refused, never used with one rank's statistics).
Requires: observed. Produces: calibrated. Modifies the graph only by applying the pending rewrites.
"""
from ..calibration.forward import calibration_forward
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
        owners = list(dict.fromkeys(r.owner for r in ctx.pending))
        rewritten = calibration_forward(gm, ctx, observers) if observers else False
        observers = [n for n in gm.graph.nodes if meta.OBSERVER in n.meta]  # the pending rewrites' are gone
        if observers:
            reduce_observers(gm, observers)
        stats = {"sequences": int(ctx.inputs.hidden.shape[0])}
        if owners:  # the rewrites it applied (their own stats are under their passes' names)
            stats["applied"] = owners
        return PassResult(gm, modified=rewritten, stats=stats)
