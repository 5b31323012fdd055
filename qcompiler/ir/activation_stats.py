"""Per-channel statistics of Linear inputs: a thin front of `ir.linear_inputs.LayerRunner`, the one
collector of calibration statistics (kept for callers of the former separate collector).

- `collect_linear_input_stats(gm, ctx, names=None, keep_rows=0)` runs `ctx.inputs` through `gm` and
  returns `{input node: InputStats}` (min, max, absmax, mean_abs, samples) for the inputs of the named
  Linears (layer-relative names, e.g. `mlp.down_proj`; all Linears by default). Linears that read one
  node (q/k/v, gate/up) share one entry.
- `collect_node_stats(gm, ctx, nodes, keep_rows=0)` does the same for any tensor-valued nodes.
`ChannelStats` is `InputStats`. The graph is not modified.
"""
import torch

from .linear_inputs import InputStats, LayerRunner
from .patterns import linear_sites

ChannelStats = InputStats


def collect_node_stats(gm: torch.fx.GraphModule, ctx, nodes, keep_rows: int = 0,
                       seed: int = 0) -> dict[torch.fx.Node, InputStats]:
    """Per-channel stats (min, max, mean |x|, `keep_rows` sampled rows) of each node in `nodes`."""
    return LayerRunner(gm, ctx).collect(list(nodes), hessian=False, abs_mean=True, extrema=True,
                                        keep_rows=keep_rows, seed=seed)


def collect_linear_input_stats(gm: torch.fx.GraphModule, ctx, names=None, keep_rows: int = 0,
                               seed: int = 0) -> dict[torch.fx.Node, InputStats]:
    """Per-channel stats of the inputs of the Linears named in `names` (None: all), keyed by input node."""
    wanted = None if names is None else set(names)
    if wanted is not None:
        missing = wanted - {s.name for s in linear_sites(gm)}
        if missing:
            raise KeyError(f"no Linear named {sorted(missing)} in the graph")
    inputs = [s.input for s in linear_sites(gm) if wanted is None or s.name in wanted]
    return collect_node_stats(gm, ctx, inputs, keep_rows=keep_rows, seed=seed)
