"""Per-channel statistics of activations inside a layer graph, gathered by running calibration data.

Purpose: passes that rescale input channels (smooth, awq) need, per input channel of a Linear, the
range (min, max, max|x|) or the mean |x| of its activation over the calibration set, and sometimes a
sample of the activation rows themselves (to measure a quantized output error).

- `collect_linear_input_stats(gm, ctx, names=None, keep_rows=0)` runs `ctx.inputs` through `gm` and
  returns `{input node: ChannelStats}` for the inputs of the named Linears (all Linears by default).
  Linears that read one node (q/k/v, gate/up) share one entry.
- `collect_node_stats(gm, ctx, nodes, keep_rows=0)` does the same for any tensor-valued nodes.

The graph is not modified: an `torch.fx.Interpreter` subclass runs it node by node and looks at the
watched nodes' values as they are produced. Statistics are over the last dimension (channels); every
other dimension is flattened into rows (tokens). Sums are kept in float64, extrema in float32.
`keep_rows` keeps that many rows, chosen uniformly at random (seed 0) over the whole calibration set, as
float32 `[keep_rows, channels]` (all rows when there are fewer).
Limits: the graph's placeholders must be (hidden, cos, sin), as captured decoder layers are.
"""
from dataclasses import dataclass, field

import torch

from .patterns import linear_sites


@dataclass
class ChannelStats:
    """Statistics of one activation over its last dimension."""
    min: torch.Tensor                   # [k] float32
    max: torch.Tensor                   # [k] float32
    abs_sum: torch.Tensor               # [k] float64, sum of |x| over rows
    rows: int = 0                       # rows (tokens) seen
    samples: torch.Tensor | None = None  # [r, k] float32 rows kept (keep_rows > 0), else None
    _kept: list = field(default_factory=list, repr=False)

    @property
    def absmax(self) -> torch.Tensor:
        """max |x| per channel, float32 [k]."""
        return torch.maximum(self.max.abs(), self.min.abs())

    @property
    def mean_abs(self) -> torch.Tensor:
        """mean |x| per channel, float32 [k] (what AWQ scales by)."""
        return (self.abs_sum / max(self.rows, 1)).float()


class _Accumulator:
    def __init__(self, keep: torch.Tensor | None):
        self.keep = keep        # sorted global row indices to keep, or None
        self.stats: ChannelStats | None = None
        self.offset = 0         # global index of the next row

    def update(self, value: torch.Tensor) -> None:
        x = value.detach().reshape(-1, value.shape[-1]).float()
        if self.stats is None:
            k = x.shape[-1]
            self.stats = ChannelStats(min=torch.full((k,), float("inf")), max=torch.full((k,), float("-inf")),
                                      abs_sum=torch.zeros(k, dtype=torch.float64))
        s = self.stats
        if x.shape[0]:
            s.min = torch.minimum(s.min, x.amin(0))
            s.max = torch.maximum(s.max, x.amax(0))
            s.abs_sum += x.abs().sum(0, dtype=torch.float64)
        if self.keep is not None:
            lo, hi = self.offset, self.offset + x.shape[0]
            idx = self.keep[(self.keep >= lo) & (self.keep < hi)] - lo
            if idx.numel():
                s._kept.append(x[idx].clone())
        self.offset += x.shape[0]
        s.rows += x.shape[0]

    def finish(self) -> ChannelStats:
        s = self.stats
        if s is None:
            raise RuntimeError("watched node produced no value")
        if self.keep is not None:
            s.samples = torch.cat(s._kept) if s._kept else torch.zeros(0, s.min.shape[0])
        s._kept = []
        return s


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm, watched: dict[torch.fx.Node, _Accumulator]):
        super().__init__(gm)
        self.watched = watched

    def run_node(self, n):
        out = super().run_node(n)
        acc = self.watched.get(n)
        if acc is not None:
            acc.update(out)
        return out


def _rows_per_sequence(gm, ctx, node) -> int:
    """Rows one calibration sequence contributes to `node` (tokens x any inner dims): from its meta val."""
    val = node.meta.get("val")
    if val is None or val.dim() < 2:
        return int(ctx.inputs.hidden.shape[1])
    n = 1
    for d in val.shape[1:-1]:
        n *= int(d) if not isinstance(d, torch.SymInt) else int(ctx.inputs.hidden.shape[1])
    return n


def collect_node_stats(gm: torch.fx.GraphModule, ctx, nodes, keep_rows: int = 0,
                       seed: int = 0) -> dict[torch.fx.Node, ChannelStats]:
    """Run every calibration sequence of `ctx` through `gm`; per-channel stats of each node in `nodes`."""
    nodes = list(dict.fromkeys(nodes))
    hidden = ctx.inputs.hidden
    cos, sin = ctx.inputs.position_embeddings
    total_seqs = int(hidden.shape[0])
    accs = {}
    for node in nodes:
        keep = None
        if keep_rows > 0:
            total = total_seqs * _rows_per_sequence(gm, ctx, node)
            g = torch.Generator().manual_seed(seed)
            keep = torch.randperm(total, generator=g)[:keep_rows].sort().values if keep_rows < total \
                else torch.arange(total)
        accs[node] = _Accumulator(keep)
    batch = max(1, int(getattr(ctx, "batch_size", None) or 8))
    with torch.inference_mode():
        for start in range(0, total_seqs, batch):
            h = hidden[start:start + batch]
            _Recorder(gm, accs).run(h, cos, sin, enable_io_processing=False)
    return {n: a.finish() for n, a in accs.items()}


def collect_linear_input_stats(gm: torch.fx.GraphModule, ctx, names=None, keep_rows: int = 0,
                               seed: int = 0) -> dict[torch.fx.Node, ChannelStats]:
    """Per-channel stats of the inputs of the Linears named in `names` (layer-relative, e.g.
    `mlp.down_proj`; None: all), keyed by the input node (shared by Linears that read one input)."""
    wanted = None if names is None else set(names)
    inputs = [s.input for s in linear_sites(gm) if wanted is None or s.name in wanted]
    if wanted is not None:
        missing = wanted - {s.name for s in linear_sites(gm)}
        if missing:
            raise KeyError(f"no Linear named {sorted(missing)} in the graph")
    return collect_node_stats(gm, ctx, inputs, keep_rows=keep_rows, seed=seed)
