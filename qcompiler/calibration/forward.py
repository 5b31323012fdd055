"""The calibration forward: one pass of a layer's calibration data through its final float graph, in stages.

Every statistic taken on the graph as it will be lowered comes from this one forward (the `calibrate` pass
runs it): the activation observers of statically quantized Linears (passes/observe.py) and the observers of
the pending rewrites that kv8 and fa3 place (`PendingRewrite`: absmax of K and V, of Q, K and V). A pending
rewrite changes the graph with its statistic (kv8 quantizes K and V with the scale their absmax gives), so
everything computed after its observers must see the rewritten graph. The forward is therefore cut at each
pending rewrite, in the order the passes placed them:

  stage 1    the calibration sequences (ctx.batch_size sequences per batch, as `LayerContext.run_layer`)
             through the part of the graph that computes the first rewrite's observers, and every observer on
             the way (the q/k/v input's); the values later stages read are cached per batch (q, k and v after
             RoPE: tokens x (q + k + v widths) in the model dtype; the layer input is read again, not cached)
  rewrite    its `finish(gm, ctx)`: reduces its statistics across ranks, rewrites the graph (removing its
             observers), returns the stats recorded under its pass's name in `ctx.records`
  stage 2..  from the cached values to the next rewrite's observers, then to the remaining observers (the
             o_proj, gate/up and down_proj inputs'); nothing after the last observer runs

Each node runs once per batch, so every observer sees every calibration token once, with the values a whole
forward of the graph as it stands at that point gives (the same kernels on the same batches): the artifacts are the
ones of running a forward per pass (as kv8 and fa3 did before: one each, plus calibrate's). A node that would
run twice is an internal error, never a double count.

Statistics the float transforms take (smooth, awq, gptq, sparse: calibration/linear_inputs.py) are of the graph
before they change it, so they come from their own forward; any other forward of a graph with pending rewrites
must settle them first (`settle_pending`; `LayerContext.run_layer` and `LayerRunner` refuse otherwise).
"""
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .linear_inputs import LayerBatches, ancestors, segment


@dataclass
class PendingRewrite:
    """Observers a pass placed in a layer graph and the rewrite their statistics decide (kv8, fa3)."""
    owner: str                          # the pass that placed them: `finish`'s stats go to ctx.records[owner]
    observers: list[torch.fx.Node]      # call_module nodes, identity in the forward (statistics kept inside)
    finish: Callable[[torch.fx.GraphModule, object], dict]  # (gm, ctx) -> stats; removes `observers` from gm


def settle_pending(gm: torch.fx.GraphModule, ctx) -> bool:
    """Apply every pending rewrite of `ctx` to `gm` (the stages up to their observers); True when there were any."""
    return calibration_forward(gm, ctx, ())


def calibration_forward(gm: torch.fx.GraphModule, ctx, observers: Sequence[torch.fx.Node]) -> bool:
    """Run the calibration data once through `gm`, settling `ctx.pending` in order, until every node of
    `observers` (call_module observers of `gm`) has seen every sequence. Returns True when `gm` was rewritten
    (a pending rewrite was applied; `gm` is recompiled by the rewrite). Raises what `finish` raises."""
    stages = _Stages(gm, ctx)
    rewritten = False
    while ctx.pending:
        item = ctx.pending.pop(0)
        stages.run(item.observers)
        stats = item.finish(gm, ctx)
        if stats:
            ctx.records.setdefault(item.owner, {}).update(stats)
        rewritten = True
    remaining = [n for n in observers if n not in stages.done]
    if remaining:
        stages.run(remaining, last=True)
    return rewritten


class _Stages(LayerBatches):
    """Runs a layer graph stage by stage over the calibration batches, each node once."""

    def __init__(self, gm: torch.fx.GraphModule, ctx):
        super().__init__(gm, ctx)
        self.done: set[torch.fx.Node] = set(self.placeholders)

    def run(self, targets: Sequence[torch.fx.Node], last: bool = False) -> None:
        """Feed every batch through the nodes `targets` need that have not run yet; cache what later stages
        read (nothing when `last`: no stage follows)."""
        sources = self.placeholders + list(self.cache)
        ran = ancestors(targets, set(sources))
        again = ran & self.done
        if again:  # an observer would count these tokens twice
            raise RuntimeError(f"calibration forward: nodes {sorted(n.name for n in again)} would run twice")
        self.done |= ran
        # cache the values a node not run yet reads; the targets count as not run (a rewrite replaces them by
        # nodes reading the targets' inputs) and are not cached themselves (nothing reads them afterwards)
        outputs = list(targets) + [n for n in self.gm.graph.nodes if not last and n in ran and n not in targets
                                   and any(u not in self.done or u in targets for u in n.users)]
        module, used = segment(self.gm, sources, outputs)
        kept = {n: [] for n in outputs[len(targets):]}
        with torch.inference_mode():  # as LayerContext.run_layer (model.run_layer_batched)
            for b in range(len(self.batches)):
                outs = module(*[self.source(s, b) for s in used])
                for node, value in zip(outputs, outs):
                    if node in kept:
                        kept[node].append(value)
                del outs
        self.cache.update(kept)
        for node in [n for n in self.cache if all(u in self.done and u not in targets for u in n.users)]:
            del self.cache[node]  # no node left to run reads it
