"""Second-order statistics of Linear inputs inside a layer graph, gathered stage by stage.

Purpose: the one collector of calibration statistics inside a layer graph. Error-compensating and
activation-aware weight passes (gptq, awq, sparse) need, for the input `X` ([tokens, k]) of each Linear,
the Gram matrix `X^T X` (the GPTQ Hessian is `2 X^T X / N`) and the mean |x| per channel; smooth needs
the per-channel range (min, max, max|x|) and a sample of the rows themselves (to measure a quantized
output error). All over the whole calibration set (`ctx.inputs`, the outputs of the already-quantized
layers before this one).

- `LayerRunner(gm, ctx).collect(targets, keep=...)` runs the calibration sequences through the part of
  the graph that computes the `targets` nodes (a subgraph cut out of `gm`: nothing after the targets
  runs) and returns `{target: InputStats}`. Shared inputs (q/k/v, gate/up) are one node, so one entry.
- Sequential use (GPTQ's "true sequential"): collect the q/k/v input, quantize q/k/v in the graph,
  collect the o_proj input, ... Values of nodes named in `keep` are cached (per batch, model dtype) so
  the next stage starts from them instead of recomputing the layer from its inputs; e.g. the o_proj
  stage computes q/k/v + attention from the cached normed input, the gate/up stage only o_proj + norm.
  A cached node must not depend on any weight changed since it was cached: cache stage inputs only
  (a stage changes the weights of Linears that *read* its input). `drop(node)` frees a cache.
- `plan_caches(gm, stages)`: which stage inputs later stages read when every earlier one is cached.
- `stage_input_stats(gm, ctx, stages, sequential)`: the loop gptq and sparse share: yields each stage
  input's `InputStats` (Gram matrix) in order; sequentially, each stage is collected only after the
  caller has handled (rewritten) the previous one, with caches planned by `plan_caches`.

Statistics (each only when asked for): `xtx` float32 (`accumulate_gram`: float32 products, rows of
bf16/float16 inputs widened 4096 at a time), `abs_sum` float64 (summed in float32 within a batch),
`min`/`max` float32 per channel (`extrema`), `samples` float32 [keep_rows, k] (`keep_rows`: rows chosen
uniformly at random, seed 0, over the whole calibration set, in row order; all rows when there are
fewer); `rows` = tokens seen. Every dimension but the last (channels) is flattened into rows.
The subgraph is rebuilt at every `collect`, so it reads the graph's current parameters.
Several processes (distributed.py): each rank runs its share of the calibration sequences (a contiguous slice,
in rank order) and `collect` reduces every statistic across ranks before returning it: `rows` and the float
sums `xtx` / `abs_sum` are summed (per-rank partial sums: rounding differs from one process), `min` / `max` are
exact, and `samples` are the same global row indices as one process draws, gathered in global order (exact).
Limits: the graph's placeholders must be (hidden, cos, sin), as captured decoder layers are.
"""
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..ir.patterns import get_tensor


@dataclass
class InputStats:
    """Statistics of one Linear input `X` [rows, k] over the calibration set."""
    xtx: torch.Tensor | None     # [k, k] float32: sum of x^T x (None when not asked for)
    abs_sum: torch.Tensor        # [k] float64: sum of |x| (zeros when not asked for)
    rows: int                    # tokens seen
    min: torch.Tensor | None = None      # [k] float32 (extrema=True)
    max: torch.Tensor | None = None      # [k] float32 (extrema=True)
    samples: torch.Tensor | None = None  # [r, k] float32 rows kept (keep_rows > 0)
    routed: dict | None = None   # {expert: InputStats of the rows the router sends to it} (collect(routes=))
    _xtx_is_hessian: bool = field(default=False, repr=False)  # hessian(in_place=True) has scaled xtx

    @property
    def absmax(self) -> torch.Tensor:
        """max |x| per channel, float32 [k] (needs extrema)."""
        return torch.maximum(self.max.abs(), self.min.abs())

    @property
    def k(self) -> int:
        return int(self.abs_sum.shape[0])

    def hessian(self, in_place: bool = False) -> torch.Tensor:
        """GPTQ's H = 2 X^T X / N, float32 [k, k]. `in_place`: without a copy ([k, k] float32 is 1.4 GiB for a 7B
        down_proj input): `xtx` is scaled in place and then *is* H (later calls with in_place return it again;
        read `xtx` no more)."""
        if not in_place:
            return self.xtx * (2.0 / max(self.rows, 1))
        if not self._xtx_is_hessian:
            self.xtx.mul_(2.0 / max(self.rows, 1))
            self._xtx_is_hessian = True
        return self.xtx

    @property
    def mean_abs(self) -> torch.Tensor:
        """mean |x| per channel, float32 [k]."""
        return (self.abs_sum / max(self.rows, 1)).float()


def ancestors(targets: Iterable[torch.fx.Node], stop: set) -> set:
    """Nodes needed to compute `targets`, not walking past nodes in `stop` (those are inputs)."""
    needed, stack = set(), list(targets)
    while stack:
        n = stack.pop()
        if n in needed or n in stop:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return needed


def segment(gm: torch.fx.GraphModule, sources: Sequence[torch.fx.Node],
            targets: Sequence[torch.fx.Node]) -> tuple[torch.fx.GraphModule, list[torch.fx.Node]]:
    """A GraphModule computing `targets` (returned as a tuple) from the `sources` it needs.

    Returns (module, used sources in call order). Parameters are shared with `gm` (read at build time).
    """
    stop = set(sources)
    needed = ancestors(targets, stop)
    used = [s for s in sources if s in targets or any(s in n.all_input_nodes for n in needed)]
    g = torch.fx.Graph()
    env = {}
    for s in used:
        env[s] = g.placeholder(s.name)
    for n in gm.graph.nodes:
        if n in needed and n not in env:
            if n.op == "placeholder":
                raise ValueError(f"segment: input {n.name} is needed but not given as a source")
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[t] for t in targets))
    return torch.fx.GraphModule(gm, g), used


def plan_caches(gm: torch.fx.GraphModule, stages: Sequence[torch.fx.Node]) -> dict[torch.fx.Node, int]:
    """{stage input: index of the last later stage whose subgraph reads it} for the stage inputs worth
    caching, when stages run in the given (topological) order and every earlier stage input is cached."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    last_use = {}
    for s, target in enumerate(stages):
        sources = set(placeholders) | set(stages[:s])
        needed = ancestors([target], sources)
        for earlier in stages[:s]:
            if earlier == target or any(earlier in n.all_input_nodes for n in needed):
                last_use[earlier] = s
    return last_use


def stage_input_stats(gm: torch.fx.GraphModule, ctx, stages: Sequence[torch.fx.Node],
                      sequential: bool, routes: dict | None = None,
                      route_node: torch.fx.Node | None = None) -> Iterator["InputStats"]:
    """`InputStats` (Gram matrix, no mean |x|) of each stage input, in the given (topological) order.

    sequential=False: one pass over the calibration data collects every stage at once (statistics of
    the graph as it is now). sequential=True: stage s is collected when the caller asks for it, i.e.
    after the caller has rewritten the Linears of stage s-1 in `gm`, so each stage sees the earlier
    stages' changes; earlier stage inputs stay cached while a later stage reads them (`plan_caches`).
    `routes` / `route_node`: per-expert statistics too (`LayerRunner.collect`).
    """
    runner = LayerRunner(gm, ctx)
    if not sequential:
        all_stats = runner.collect(list(stages), abs_mean=False, routes=routes, route_node=route_node)
        for node in stages:
            yield all_stats.pop(node)
        return
    last_use = plan_caches(gm, stages)
    for s, node in enumerate(stages):
        yield runner.collect([node], abs_mean=False, keep=[node] if node in last_use else [], routes=routes,
                             route_node=route_node)[node]
        for cached, last in last_use.items():  # runs after the caller handled stage s
            if last <= s:
                runner.drop(cached)


#: rows of a bf16/float16 input widened to float32 at a time by `accumulate_gram` (a [4096, 18944] float32
#: chunk is 310 MB; the whole [8192, 18944] input widened at once would be 620 MB)
GRAM_CHUNK = 4096


def accumulate_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc (float32 [k, k]) += x^T x for rows x [m, k], in float32 for every input dtype (as GPTQ's reference
    implementation and llm-compressor accumulate H).

    Why not bf16 products for bf16 inputs: a bf16 GEMM is slow on CPUs without native bf16 (AVX2-only x86,
    ARM hosts without BF16 instructions): on the AMD EPYC (AVX2) host it was measured on, one thread,
    [8192, 3584]^T x [8192, 3584] took 38.7 s in bf16 vs 2.7 s in float32 (14x). Memory: float32 inputs go
    into one `addmm_` (no copy); other dtypes are widened GRAM_CHUNK rows at a time and each chunk is
    `addmm_`-ed into acc, so no float32 copy of the whole input or of a [k, k] product is made.
    Chunking changes only the float32 summation order (inputs of at most GRAM_CHUNK rows: one product).
    """
    if x.dtype == torch.float32:
        acc.addmm_(x.T, x)
        return
    for start in range(0, x.shape[0], GRAM_CHUNK):
        xc = x[start:start + GRAM_CHUNK].float()
        acc.addmm_(xc.T, xc)


def _rows_per_sequence(node: torch.fx.Node, seq_len: int) -> int:
    """Rows one calibration sequence contributes to `node` (tokens x any inner dims): from its meta val."""
    val = node.meta.get("val")
    if val is None or val.dim() < 2:
        return seq_len
    n = 1
    for d in val.shape[1:-1]:
        n *= int(d) if not isinstance(d, torch.SymInt) else seq_len
    return n


class _RowSampler:
    """Keeps the rows at fixed global indices (drawn once, seeded) as they stream past, batch by batch, as float32
    (`update` takes a [rows, k] batch in any float dtype and widens only the rows it keeps)."""

    def __init__(self, keep_rows: int, total: int, seed: int, offset: int = 0):
        """total: rows of the whole calibration set (every rank); offset: global index of this rank's first row."""
        if keep_rows < total:
            g = torch.Generator().manual_seed(seed)
            self.keep = torch.randperm(total, generator=g)[:keep_rows].sort().values
        else:
            self.keep = torch.arange(total)
        self.offset, self.kept = offset, []

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self.offset, self.offset + x.shape[0]
        idx = self.keep[(self.keep >= lo) & (self.keep < hi)] - lo
        if idx.numel():
            self.kept.append(x[idx].float())  # float32 rows (a new tensor: advanced indexing copies)
        self.offset = hi

    def finish(self, k: int) -> torch.Tensor:
        return torch.cat(self.kept) if self.kept else torch.zeros(0, k)


def refuse_while_pending(ctx) -> None:
    """RuntimeError when `ctx` has rewrites pending (calibration/forward.py): a forward now would feed their
    observers as well, a pass-ordering fault (settle them first: `forward.settle_pending`)."""
    if getattr(ctx, "pending", None):
        owners = ", ".join(dict.fromkeys(r.owner for r in ctx.pending))
        raise RuntimeError(f"layer {ctx.index}: a forward with rewrites pending ({owners}): settle them first "
                           "(calibration.forward.settle_pending)")


class LayerBatches:
    """A layer graph and its LayerContext's calibration inputs, batch by batch: the (hidden, cos, sin)
    placeholders, `ctx.batch_size` sequences a batch (as `LayerContext.run_layer`), and node values cached per
    batch, which `source` hands out in place of computing them again."""

    def __init__(self, gm: torch.fx.GraphModule, ctx):
        self.gm, self.ctx = gm, ctx
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(self.placeholders) != 3:
            raise ValueError(f"layer graph has {len(self.placeholders)} inputs, expected (hidden, cos, sin)")
        hidden = ctx.inputs.hidden
        batch = max(1, int(getattr(ctx, "batch_size", None) or 8))
        self.batches = [(s, min(s + batch, hidden.shape[0])) for s in range(0, hidden.shape[0], batch)]
        self.cache: dict[torch.fx.Node, list[torch.Tensor]] = {}

    def source(self, node: torch.fx.Node, b: int) -> torch.Tensor:
        """Batch `b`'s value of `node`: a cached node or a placeholder."""
        if node in self.cache:
            return self.cache[node][b]
        i = self.placeholders.index(node)
        if i == 0:
            start, stop = self.batches[b]
            return self.ctx.inputs.hidden[start:stop]
        return self.ctx.inputs.position_embeddings[i - 1]


class LayerRunner(LayerBatches):
    """Runs parts of a layer graph over a LayerContext's calibration inputs, batch by batch."""

    def __init__(self, gm: torch.fx.GraphModule, ctx):
        refuse_while_pending(ctx)
        super().__init__(gm, ctx)

    def collect(self, targets: Sequence[torch.fx.Node], hessian: bool = True, abs_mean: bool = True,
                keep: Iterable[torch.fx.Node] = (), extrema: bool = False, keep_rows: int = 0,
                seed: int = 0, routes: dict | None = None,
                route_node: torch.fx.Node | None = None) -> dict[torch.fx.Node, InputStats]:
        """Stats of each target's value over every calibration sequence (`abs_sum` stays zero without
        `abs_mean`; min/max with `extrema`; `keep_rows` sampled rows); caches the values of `keep`.
        `routes` {target: experts} with `route_node` (a MoE block's top-k expert indices [rows, top_k], ir/moe.py
        router_index_node): also `InputStats.routed[e]` (Gram matrix, |x| sums, rows) over only the rows whose
        top-k holds e, the tokens the router sends to expert e (the target's rows are the block's tokens)."""
        targets = list(dict.fromkeys(targets))
        keep = [n for n in dict.fromkeys(keep) if n in targets]
        routes = {n: list(es) for n, es in (routes or {}).items() if n in targets and es}
        if routes and route_node is None:
            raise ValueError("collect(routes=) needs the router's top-k index node")
        outputs = targets + ([route_node] if routes else [])
        module, used = segment(self.gm, self.placeholders + list(self.cache), outputs)
        stats: dict[torch.fx.Node, InputStats] = {}
        kept = {n: [] for n in keep}
        samplers = {}
        if keep_rows > 0:
            hidden = self.ctx.inputs.hidden
            counts = distributed.all_gather_counts(int(hidden.shape[0]))  # sequences of every rank
            for n in targets:
                per_seq = _rows_per_sequence(n, int(hidden.shape[1]))
                samplers[n] = _RowSampler(keep_rows, sum(counts) * per_seq, seed,
                                          offset=sum(counts[:distributed.rank()]) * per_seq)
        with torch.no_grad():
            for b in range(len(self.batches)):
                outs = module(*[self.source(s, b) for s in used])
                chosen = outs[len(targets)].reshape(-1, outs[len(targets)].shape[-1]) if routes else None
                for node, value in zip(targets, outs):
                    if node in kept:
                        kept[node].append(value)
                    x = value.reshape(-1, value.shape[-1])
                    st = stats.get(node)
                    if st is None:
                        k = x.shape[-1]
                        st = stats[node] = InputStats(xtx=torch.zeros(k, k) if hessian else None,
                                                      abs_sum=torch.zeros(k, dtype=torch.float64), rows=0)
                    if hessian:
                        accumulate_gram(st.xtx, x)
                    if abs_mean:
                        st.abs_sum += x.abs().sum(0, dtype=torch.float32).double()  # float32 per batch
                    # extrema in x's dtype, widened after (picks; rounding to float32 is monotone: the same
                    # values as from x.float()), and the sampler widens only the rows it keeps: no float32 copy
                    # of the whole input (592 MiB for a 7B down_proj input, BENCHMARKS.md issue 15)
                    if extrema and x.shape[0]:
                        lo, hi = (v.float() for v in torch.aminmax(x, dim=0))
                        st.min = lo if st.min is None else torch.minimum(st.min, lo)
                        st.max = hi if st.max is None else torch.maximum(st.max, hi)
                    if node in samplers:
                        samplers[node].update(x)
                    st.rows += x.shape[0]
                    for e in routes.get(node, ()):
                        _accumulate_routed(st, e, x[(chosen == e).any(-1)], hessian, abs_mean)
                del outs
        for node, sampler in samplers.items():
            stats[node].samples = sampler.finish(stats[node].k)
        for node in targets:  # several processes: every statistic over the whole calibration set
            _reduce_across_ranks(stats[node])
        self.cache.update(kept)
        return stats

    def drop(self, node: torch.fx.Node) -> None:
        self.cache.pop(node, None)


def _accumulate_routed(st: InputStats, expert: int, x: torch.Tensor, hessian: bool, abs_mean: bool) -> None:
    """Add rows `x` (the tokens routed to `expert`) to `st.routed[expert]`."""
    if st.routed is None:
        st.routed = {}
    k = x.shape[-1]
    r = st.routed.get(expert)
    if r is None:
        r = st.routed[expert] = InputStats(xtx=torch.zeros(k, k) if hessian else None,
                                           abs_sum=torch.zeros(k, dtype=torch.float64), rows=0)
    if hessian and x.shape[0]:
        accumulate_gram(r.xtx, x)
    if abs_mean:
        r.abs_sum += x.abs().sum(0, dtype=torch.float32).double()
    r.rows += x.shape[0]


def _reduce_across_ranks(st: InputStats) -> None:
    """In place: one rank's InputStats -> the whole calibration set's (identity with one process)."""
    if distributed.world() <= 1:
        return
    for e in sorted(st.routed or {}):
        _reduce_across_ranks(st.routed[e])
    st.rows = int(distributed.all_sum(torch.tensor([st.rows], dtype=torch.int64)).item())
    if st.xtx is not None:
        st.xtx = distributed.all_sum(st.xtx)
    st.abs_sum = distributed.all_sum(st.abs_sum)
    if st.min is not None:
        st.min, st.max = distributed.all_min(st.min), distributed.all_max(st.max)
    if st.samples is not None:
        st.samples = distributed.gather_rows(st.samples)
