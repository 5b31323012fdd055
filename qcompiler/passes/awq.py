"""awq: activation-aware weight scaling and clipping (AWQ, Lin et al. 2023) for weight-quantized schemes.

Purpose: weight-only int4/int8 (w4a16, w8a16, w4a8d) loses most where the input channels are large.
AWQ scales those weight columns up before rounding (their relative rounding error shrinks) and divides
the input by the same factor in the op that produces it, so the float function is unchanged; then it
clips each weight group's range where that lowers the output error.

How, per decoder layer (statistics of every Linear input from one run of the float layer over the
calibration inputs: mean |x| per channel and X^T X, `calibration.linear_inputs`):
1. Scale search per shared input, with the op that absorbs 1/s (the mappings of ir/folding.py):
     input_layernorm weight (and the bias a shifting smooth added) -> q/k/v
     post_attention_layernorm weight -> gate/up
     v_proj rows (and bias)      -> o_proj         (only when v_proj's out == o_proj's in: no GQA; the
                                                   search scales each o_proj column on its own, so it
                                                   takes the table with gqa=False)
     up_proj rows (and bias)     -> down_proj
   s = mean|x|^a / sqrt(max * min), a over `grid` points in [0, 1); the loss is the summed squared
   output error of the group's quantized Linears, tr(dW H dW^T) with dW = W - Q(W diag(s)) diag(s)^-1,
   exact over all calibration tokens via H = X^T X. a = 0 (s = 1) is in the grid, so scaling never
   raises this loss. A group is skipped (and the reason recorded) when its producer is not one of the
   above, or when the input or the producer output has other readers than the scaled ops.
   Folding: `folding.fold` (producer / s, consumer columns * s, in the model dtype: float function
   unchanged up to it).
2. Clip search per quantized Linear (q/k skipped unless `clip_qk`, as AutoAWQ does: attention scores
   are sensitive to clipping): per (row, group) the ratio r in 1.0 .. 1 - `max_shrink` (`clip_grid` + 1
   points) minimizing that group's output error d_g^T H_gg d_g (H of the scaled input), with scale
   r * absmax / qmax. r = 1 is in the grid, so clipping never raises this error.
3. Result: `meta.WEIGHT_QPARAMS = (codes, scales)` on each quantized Linear (lowering stores exactly
   these), and the float weight clamped to +-qmax * scale (a following gptq then reads the clipped
   absmax as its scale). Norm weights and v/up rows change: the artifact must take every float tensor
   of the layer from the graph, not from the checkpoint.
Bits and group come from each Linear's spec (`weight_targets`; the scheme passes annotate first). The searches run on one thread
and compute every loss with float32 products; see `quadratic_rows`.
Requires: captured. Produces: weights_rounded. Forbids: annotated, weights_rounded (gptq must see
awq's weights). Phase: TRANSFORM.
Limits: all four Hessians of a layer are held at once (intermediate_size^2 floats for down_proj);
per-channel clipping of a Linear with k > 4096 uses 512-wide diagonal blocks of H (an approximation).
"""
from dataclasses import dataclass

import torch

from .. import distributed
from ..ir import meta
from ..ir import qnumerics as qn
from ..ir.folding import fold, match_group
from ..calibration.linear_inputs import LayerRunner
from ..ir.patterns import get_tensor, linear_sites, replace_tensor, shared_input_groups
from .base import Pass, PassResult, Phase
from .properties import ANNOTATED, CAPTURED, WEIGHTS_ROUNDED
from .registry import register
from .weight_targets import WeightTarget, column_scale, fake_quant, quantize, single_thread, weight_targets

#: per-channel clip search uses exact row errors up to this k; above it, diagonal blocks of this size
_EXACT_CLIP_K, _CLIP_BLOCK = 4096, 512


@dataclass(frozen=True)
class AWQOptions:
    """grid: scale exponents a = i / grid (i < grid). clip: search weight clipping. clip_grid: shrink
    steps from 1.0 down to 1 - max_shrink. clip_qk: clip q_proj/k_proj too."""
    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_qk: bool = False

    def __post_init__(self):
        if self.grid < 1 or self.clip_grid < 1:
            raise ValueError("grid and clip_grid must be >= 1")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink}")


# ---- search kernels (pure functions) ---------------------------------------------------------------
def quadratic_rows(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d_r H d_r^T per row of d [n, k], float32 [n], from float32 products. Not bf16: a bf16 GEMM is slow on
    CPUs without native bf16 (on the AMD EPYC AVX2 host measured, one thread, [4096, 576] x [576, 576] took
    35x as long in bf16 as in float32)."""
    d = d.float()
    return ((d @ h.float()) * d).sum(-1)


def scale_loss(weights, targets, h: torch.Tensor, s: torch.Tensor) -> float:
    """Output error of the quantized Linears (target None: stays float, no error) with input scale s."""
    diffs = [w - fake_quant(w * s, t)[0] / s for w, t in zip(weights, targets) if t is not None]
    if not diffs:
        return 0.0
    return float(quadratic_rows(torch.cat(diffs), h).sum())


def search_scale(x_mean: torch.Tensor, weights, targets, h: torch.Tensor, grid: int = 20):
    """(best s [k] float32, best a, loss at best, loss at s = 1) over a = i / grid, i = 0 .. grid - 1.
    Every loss is float32 (`quadratic_rows`)."""
    x_mean = x_mean.float().clamp(min=0)
    hq = h.float()

    def scale(a: float) -> torch.Tensor:
        s = x_mean.pow(a).clamp(min=1e-4)
        return s / (s.max() * s.min()).sqrt()

    with single_thread():
        # several processes: each rank scores its share of the grid (x_mean and H are reduced, the same on
        # every rank) and all get every loss (distributed.split_map): one process's choice at 1/W of the work
        losses = distributed.split_map(lambda i: scale_loss(weights, targets, hq, scale(i / grid)), list(range(grid)))
        best = 0
        for i, loss in enumerate(losses):  # the first minimum
            if loss < losses[best]:
                best = i
        a = best / grid
        s = scale(a)
        return s, a, scale_loss(weights, targets, hq, s), scale_loss(weights, targets, hq, torch.ones_like(s))


def _rescale_hessian_(h: torch.Tensor, factor: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """H of the input x / factor: h / (factor_i * factor_j), float32 [k, k], written into h `rows` rows at a time
    (the outer product of the factors and the quotient were two more k x k float32 matrices)."""
    f = factor.float()
    for start in range(0, h.shape[0], rows):
        h[start:start + rows].div_(f[start:start + rows, None] * f[None, :])
    return h


def _block_hessian(h: torch.Tensor, block: int) -> torch.Tensor:
    """Diagonal blocks of H as [k / block, block, block]."""
    k = h.shape[0]
    g = k // block
    return h.reshape(g, block, g, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def group_errors(d: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
    """Per (row, block) error d_g^T H_gg d_g: d [n, k], hb [G, g, g] -> float32 [n, G] (float32 products)."""
    n, k = d.shape
    G, g, _ = hb.shape
    dg = d.float().reshape(n, G, g).transpose(0, 1)     # [G, n, g]
    prod = torch.bmm(dg, hb.float())
    return (prod * dg).sum(-1).T                        # [n, G]


def search_clip(w: torch.Tensor, h: torch.Tensor, t: WeightTarget, clip_grid: int = 20,
                max_shrink: float = 0.5):
    """Clipped scales [n, G] for weight w [n, k]: per (row, group) the ratio of absmax/qmax in
    1 .. 1 - max_shrink minimizing d_g^T H_gg d_g. Returns (scale, errors at best [n, G], at r = 1).
    float32 products (see `quadratic_rows`)."""
    n, k = w.shape
    group = t.group or k
    G = k // group
    block = group if (t.group or k <= _EXACT_CLIP_K) else _CLIP_BLOCK
    if k % block:
        block = group
    hb = _block_hessian(h.float(), block)
    per_block = group // block                          # blocks per scale group
    with single_thread():
        absmax = w.abs().reshape(n, G, group).amax(-1)
        best_err = best_scale = base = None
        for i in range(clip_grid + 1):
            r = 1.0 - max_shrink * i / clip_grid
            scale = qn.absmax_scale(absmax, t.bits, r)
            wq, scale = fake_quant(w, t, scale)
            err = group_errors(w - wq, hb).reshape(n, G, per_block).sum(-1)
            if i == 0:
                best_err, best_scale, base = err, scale, err
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, scale, best_scale)
    return best_scale, best_err, base


@register
class AWQ(Pass):
    name = "awq"
    summary = "AWQ: activation-aware weight scaling (folded into norms / v / up) + weight clipping search"
    requires = frozenset({CAPTURED})
    produces = frozenset({WEIGHTS_ROUNDED})
    forbids = frozenset({ANNOTATED, WEIGHTS_ROUNDED})
    phase = Phase.TRANSFORM
    Options = AWQOptions

    def run(self, gm, ctx):
        targets = weight_targets(gm, ctx, self)
        sites = linear_sites(gm)
        groups = [g for g in shared_input_groups(sites) if any(s.name in targets for s in g)]
        if not groups:
            return PassResult(gm, modified=False, stats={"groups": {}})
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        groups.sort(key=lambda g: order[g[0].input])
        sites_by_node = {s.node: s for s in sites}
        stats = LayerRunner(gm, ctx).collect([g[0].input for g in groups])
        hessians = {}
        group_records, skipped = {}, {}
        for group in groups:
            x = group[0].input
            st = stats[x]
            # memory (issue 15): H is the statistics' own Gram matrix scaled in place (stats is read no more), and
            # the fold's rescaling below is in place too: one k x k float32 per input, not up to four (a 7B
            # down_proj's H is 1.34 GiB). The same element operations as out of place: bit-identical.
            h = st.xtx.div_(max(st.rows, 1))
            key = "+".join(s.name.rsplit(".", 1)[-1] for s in group)
            producer, reason = match_group(gm, group, sites_by_node, gqa=False)  # ir/folding.py
            if producer is None:
                skipped[key] = reason
                hessians[x] = h
                continue
            weights = [get_tensor(gm, s.weight.target).float() for s in group]
            factor, a, loss, base = search_scale(st.mean_abs, weights, [targets.get(s.name) for s in group], h,
                                                 self.options.grid)
            fold(gm, producer, factor)
            hessians[x] = _rescale_hessian_(h, factor)   # the consumers now read x / factor
            group_records[key] = {"alpha": a, "loss_vs_unscaled": round(loss / base, 6) if base else 1.0,
                                  "into": "+".join(producer.producer_targets()) if producer.kind == "norm"
                                  else producer.producer}
        clips = {}
        for group in groups:
            h = hessians[group[0].input]
            for site in group:
                t = targets.get(site.name)
                if t is None:
                    continue
                w = get_tensor(gm, site.weight.target).float()
                name = site.name.rsplit(".", 1)[-1]
                if self.options.clip and (self.options.clip_qk or name not in ("q_proj", "k_proj")):
                    scale, err, base = search_clip(w, h, t, self.options.clip_grid, self.options.max_shrink)
                    clips[site.name] = round(float(err.sum() / base.sum()), 6) if base.sum() > 0 else 1.0
                else:
                    scale = None
                q, scale = quantize(w, t, scale)
                site.node.meta[meta.WEIGHT_QPARAMS] = (q, scale)
                bound = column_scale(scale, w.shape[1]) * t.qmax
                replace_tensor(gm, site.weight.target, torch.minimum(torch.maximum(w, -bound), bound))
        return PassResult(gm, modified=True, stats={"groups": group_records, "skipped": skipped,
                                                    "clip_err_vs_unclipped": clips})
