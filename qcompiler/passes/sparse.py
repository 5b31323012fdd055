"""sparse: unstructured pruning of every decoder Linear's weight to a target fraction of zeros.

Purpose: zero `ratio` of each Linear's weights (a float pass: the pruned float model is a model of its
own, and any scheme after it quantizes the zeros to exact zero codes, so it composes with every scheme;
`w8a8s` requires it). Exactly `round(ratio * k)` weights of every output row are zeroed (per-row
sparsity, as Wanda and the NPU compressors use), so the achieved ratio is exact per row and per Linear.

Methods (`method=`), all choosing per output row:
- `sparsegpt` (default, measured best on SmolLM2-135M: bench/results/sparse.md): SparseGPT (Frantar &
  Alistarh 2023). OBS pruning with error compensation: columns are processed left to right in blocks of
  `block`; at each block the weights to prune are those with the smallest `w^2 / [H^-1]_jj^2` (adaptive
  mask selection; `[H^-1]` = the upper Cholesky factor of the dampened inverse Hessian, as GPTQ uses)
  and each pruned weight's error is spread over the row's not-yet-processed weights through H^-1.
  H = 2 X^T X / N from the calibration inputs (`calibration.linear_inputs`, GPTQ's machinery). The per-row count
  is spread over the blocks (cumulative `round(ratio * column)`), so the row total is exact.
- `wanda`: Wanda (Sun et al. 2023). score |W_ij| * ||X_j||_2 (X_j: input channel j over every
  calibration token); the lowest scores of each row are zeroed; other weights unchanged.
- `magnitude`: the baseline; lowest |W_ij| of each row; needs no calibration data.
`fraction` (msModelSlim's 0.01..0.1): the largest-|W| `round(fraction * k)` weights of each row are
outliers that are never pruned (they still move under SparseGPT's compensation); ratio + fraction <= 1.

Linears: every decoder Linear whose full HF name matches `match` and no `--exclude` regex (excluded
Linears stay float and dense). Sequential (default, as gptq): Linears sharing an input (q/k/v, gate/up)
share one Hessian; groups run in graph order and each Hessian comes from inputs computed with the
already-pruned Linears before it. `sequential=false`: every statistic from the unpruned layer.
Result: the float weight parameter is replaced by the pruned one (model dtype); `meta.SPARSITY` on the
Linear's node holds the achieved fraction of zeros (gptq keeps those codes zero). Phase: TRANSFORM (after
the scheme passes' annotation): a Linear a scheme marked `meta.NEEDS_PRUNING` (w8a8s, w16a16s) that this
pass does not prune is a one-line error.
Records per Linear: method, sparsity (zeros / numel of the stored weight), protected (outliers kept per
row), and for calibration-aware methods rel_err = tr(dW H dW^T) / tr(W H W^T).
Requires: captured. Produces: weights_pruned. Forbids: annotated, weights_rounded (codes gptq/awq chose would go stale;
gptq/awq after sparse keep zeros zero: awq scales columns, gptq keeps zero codes for pruned weights).
Alone (`--passes sparse:ratio=0.5`, no scheme) the compile writes the pruned float model: every tensor
FLOAT, executable graph in float (the driver skips the quantization tail for `standalone` passes).
`ratio=0` prunes nothing but still records each Linear's (natural) sparsity, so a scheme that requires
`sparse` (w8a8s, w16a16s) runs on the unpruned weights: `sparse:ratio=0,w8a8s` is msModelSlim's "lowbit"
sparse quantization (w_bit 4 codes, no pruning ratio; QuantConfig is_lowbit, msmodelslim/pytorch/llm_ptq/
llm_ptq_tools/quant_config/quant_config_classes/config_utils.py `is_w4a8_sparse`).
Limits: unstructured only (no 2:4); SparseGPT's math runs on one thread in float32 (Cholesky float64).
"""
import re
from dataclasses import dataclass

import torch

from ..errors import QCError
from ..ir import meta
from ..calibration.linear_inputs import stage_input_stats
from ..ir.patterns import get_tensor, linear_sites, replace_tensor, shared_input_groups
from ..ir.outlier_ranges import check_outlier_settings
from .base import Pass, PassResult, Phase
from .gptq import _columns_as_rows, _factor_row_blocks, row_errors
from .properties import ANNOTATED, CAPTURED, WEIGHTS_PRUNED, WEIGHTS_ROUNDED
from .registry import register
from .weight_targets import single_thread

METHODS = ("sparsegpt", "wanda", "magnitude")


@dataclass(frozen=True)
class SparseOptions:
    """ratio: fraction of each row's weights set to zero, in [0, 1). method: sparsegpt | wanda | magnitude.
    fraction: fraction of each row's largest-|W| weights never pruned (outliers; 0 or msModelSlim's 0.01..0.1,
    ir/outlier_ranges.py check_outlier_settings).
    match: regex on the full HF Linear name (default every decoder Linear). block/damp: SparseGPT's
    column block and dampening (fraction of mean diag H). sequential: statistics from the already-pruned
    Linears before each group (else all from the unpruned layer)."""
    ratio: float = 0.5
    method: str = "sparsegpt"
    fraction: float = 0.0
    match: str = ".*"
    block: int = 128
    damp: float = 0.01
    sequential: bool = True

    def __post_init__(self):
        if not (0.0 <= self.ratio < 1.0):
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        check_outlier_settings(float(self.fraction), None)   # msModelSlim's fraction range, as w8a8s:fraction=
        if not (0.0 <= self.fraction < 1.0) or self.ratio + self.fraction > 1.0:
            raise ValueError(f"fraction must be in [0, 1 - ratio] (outliers kept besides the pruned "
                             f"ratio {self.ratio}), got {self.fraction}")
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")
        if not (0.0 < self.damp < 1.0):
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        try:
            re.compile(self.match)
        except (re.error, TypeError) as e:
            raise ValueError(f"match {self.match!r} is not a valid regular expression ({e})") from None


def prune_count(k: int, ratio: float) -> int:
    """Weights zeroed per row of k: round(ratio * k), halves up."""
    return int(ratio * k + 0.5)


def protected_mask(w: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """bool [n, k]: the round(fraction * k) largest-|W| weights of each row (None when none)."""
    p = prune_count(w.shape[1], fraction)
    if p == 0:
        return None
    idx = torch.topk(w.detach().float().abs(), p, dim=1).indices
    return torch.zeros(w.shape, dtype=torch.bool).scatter_(1, idx, True)


def _lowest(score: torch.Tensor, count) -> torch.Tensor:
    """bool mask of the `count` lowest scores of each row (count: int or LongTensor [n]); stable on ties."""
    n, k = score.shape
    order = torch.argsort(score, dim=1, stable=True)
    counts = torch.as_tensor(count).reshape(-1, 1)
    chosen = torch.arange(k).unsqueeze(0) < counts
    return torch.zeros(n, k, dtype=torch.bool).scatter_(1, order, chosen.expand(n, k))


def prune_by_score(w: torch.Tensor, score: torch.Tensor, ratio: float, protect=None) -> torch.Tensor:
    """float32 copy of `w` with the round(ratio * k) lowest-`score` unprotected weights of each row zeroed."""
    score = score.float().clone()
    if protect is not None:
        score[protect] = float("inf")
    mask = _lowest(score, prune_count(w.shape[1], ratio))
    return w.detach().float().masked_fill(mask, 0.0)


def magnitude_prune(w, ratio, protect=None):
    return prune_by_score(w, w.detach().float().abs(), ratio, protect)


def wanda_prune(w, x_norm, ratio, protect=None):
    """Wanda: score |W_ij| * ||X_j||_2 (x_norm [k]: the input channels' L2 norms over all tokens)."""
    return prune_by_score(w, w.detach().float().abs() * x_norm.float().unsqueeze(0), ratio, protect)


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, ratio: float, protect=None, *, damp: float = 0.01,
                    block: int = 128) -> torch.Tensor:
    """SparseGPT: float32 [n, k] weight with exactly round(ratio * k) zeros per row (see module docstring).

    The result is the transposed view of the column-major working copy (strides (1, n): not contiguous), so the
    call's only weight-sized float32 tensor is that copy (`.T.contiguous()` made a second one beside it at the
    return); callers that store or hand rows to a GEMM take `.contiguous()` of the rows they need."""
    with single_thread():
        return _sparsegpt(w, h, ratio, protect, damp, block)


def _sparsegpt(w, h, ratio, protect, damp, block):
    n, k = w.shape
    # inputs never seen (diag(H) = 0) get H_jj = 1: any weight there is free to prune (no output error).
    # Memory (issue 15), as gptq: no float32 copy of H; the float64 buffer (2 x H) is gathered from h, inverted
    # and narrowed to float32 in its own storage, and U is read a block of rows at a time (`_factor_row_blocks`).
    factor_blocks = _factor_row_blocks(h.detach().float(), damp, block)
    # column-major working copies (as gptq): column j of W is row j here, so updates are contiguous; made a
    # row chunk at a time (`.T.clone().contiguous()` held two full float32 copies of the weight)
    Wt = _columns_as_rows(w.detach(), None)
    Pt = _columns_as_rows(protect, None) if protect is not None else None
    pruned = torch.zeros(n, dtype=torch.long)
    for i1, i2, U1 in factor_blocks:  # U1[:, i1:] = U[i1:i2, i1:]
        W1 = Wt[i1:i2].clone()
        H1 = U1[:, i1:i2]
        d = H1.diagonal()
        score = (W1 / d.unsqueeze(1)) ** 2          # w^2 / [H^-1]_jj^2, [b, n]
        avail = torch.full((n,), i2 - i1, dtype=torch.long)
        if Pt is not None:
            score[Pt[i1:i2]] = float("inf")
            avail -= Pt[i1:i2].sum(0)
        # per-row count of this block: what the cumulative target still asks for (exact row total)
        want = torch.minimum((prune_count(i2, ratio) - pruned).clamp(min=0), avail)
        mask1 = _lowest(score.T, want).T             # [b, n]
        pruned += mask1.sum(0)
        E1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            col = W1[i]
            q = col.masked_fill(mask1[i], 0.0)
            err = (col - q) / H1[i, i]
            E1[i] = err
            W1[i] = q
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(H1[i, i + 1:], err, alpha=-1.0)
        Wt[i1:i2] = W1
        if i2 < k:
            Wt[i2:].addmm_(U1[:, i2:].T, E1, alpha=-1.0)
    out = Wt.T  # a view: no second weight-sized copy (see sparsegpt_prune)
    del Wt, Pt
    short = prune_count(k, ratio) - pruned
    if (short > 0).any():
        # protected outliers crowded a late block: prune the rest by magnitude (no compensation left)
        zero = out == 0
        score = out.abs().masked_fill(zero, float("inf"))
        if protect is not None:
            score[protect] = float("inf")
        out = out.masked_fill(_lowest(score, short.clamp(min=0)), 0.0)
    return out


@register
class Sparse(Pass):
    name = "sparse"
    summary = ("unstructured pruning to ratio= zeros per row (sparsegpt | wanda | magnitude), fraction= "
               "outliers protected; a float pass before any scheme")
    requires = frozenset({CAPTURED})
    produces = frozenset({WEIGHTS_PRUNED})
    forbids = frozenset({ANNOTATED, WEIGHTS_ROUNDED})
    phase = Phase.TRANSFORM
    Options = SparseOptions
    #: `--passes sparse` alone is a valid compile: the driver then writes the pruned float model (no scheme)
    standalone = True

    def _targets(self, gm, ctx):
        return [s for s in linear_sites(gm)
                if re.search(self.options.match, ctx.prefix + s.name)
                and not any(re.search(p, ctx.prefix + s.name) for p in ctx.exclude)]

    def run(self, gm, ctx):
        sites = self._targets(gm, ctx)
        pruned = {s.name for s in sites}
        for site in linear_sites(gm):  # a scheme annotated it for pruned weights (w8a8s, w16a16s)
            claimer = site.node.meta.get(meta.NEEDS_PRUNING)
            if claimer is not None and site.name not in pruned:
                raise QCError(f"{claimer} claims {ctx.prefix}{site.name} but the sparse pass did not prune it; "
                              f"give sparse the same match/--exclude as {claimer}")
        if not sites:
            return PassResult(gm, modified=False, stats={"linears": {}})
        if self.options.ratio == 0.0:
            # nothing pruned: the weights' own zeros are recorded, so `sparse:ratio=0,w8a8s` is msModelSlim's
            # "lowbit" sparse quantization (4-bit-range codes, sparsity only from codes that round to 0)
            records = {}
            for site in sites:
                w = get_tensor(gm, site.weight.target)
                sparsity = float((w == 0).sum()) / w.numel()
                site.node.meta[meta.SPARSITY] = sparsity
                records[site.name] = {"method": "none (ratio=0)", "sparsity": round(sparsity, 6), "protected": 0}
            return PassResult(gm, modified=True, stats={"linears": records})
        records = {}
        if self.options.method == "magnitude":
            for site in sites:
                self._prune_group(gm, ctx, [site], None, records)
            return PassResult(gm, modified=True, stats={"linears": records})
        names = {s.name for s in sites}
        groups = [[s for s in g if s.name in names] for g in shared_input_groups(linear_sites(gm))]
        groups = [g for g in groups if g]
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        groups.sort(key=lambda g: order[g[0].input])
        stage_inputs = [g[0].input for g in groups]
        for group, stats in zip(groups, stage_input_stats(gm, ctx, stage_inputs, self.options.sequential)):
            self._prune_group(gm, ctx, group, stats, records)
            del stats  # before the next stage is collected
        return PassResult(gm, modified=True, stats={"linears": records})

    def _prune_group(self, gm, ctx, group, stats, records):
        """Prune the Linears of one shared input (rows stacked: every method is row-independent). Each weight is
        read from the graph once (`get_tensor`) and written once (`replace_tensor`)."""
        o = self.options
        weights = [get_tensor(gm, s.weight.target).detach() for s in group]  # each read once
        counts = [w.shape[0] for w in weights]
        w_all = torch.cat(weights).float()  # one float32 copy
        protect = protected_mask(w_all, o.fraction)
        h = stats.hessian() if stats is not None else None
        if o.method == "magnitude":
            pruned = magnitude_prune(w_all, o.ratio, protect)
        elif o.method == "wanda":
            # ||X_j||_2 over every calibration token: sqrt of the Gram matrix's diagonal
            pruned = wanda_prune(w_all, stats.xtx.diagonal().clamp(min=0).sqrt(), o.ratio, protect)
        else:
            pruned = sparsegpt_prune(w_all, h, o.ratio, protect, damp=o.damp, block=o.block)
        if not torch.isfinite(pruned).all():
            raise ValueError(f"{ctx.prefix}{group[0].name}: {o.method} produced a non-finite weight")
        if h is not None:
            with single_thread():
                err, ref = row_errors(lambda r: (w_all[r] - pruned[r], w_all[r]), w_all.shape[0], h)
        row = 0
        for site, count in zip(group, counts):
            rows = slice(row, row + count)
            row += count
            stored = pruned[rows].to(ctx.dtype).contiguous()  # sparsegpt's result is column-major
            sparsity = float((stored == 0).sum()) / stored.numel()
            rec = {"method": o.method, "sparsity": round(sparsity, 6),
                   "protected": prune_count(w_all.shape[1], o.fraction) if protect is not None else 0}
            if h is not None:
                total = float(ref[rows].sum())
                rec["rel_err"] = round(float(err[rows].sum()) / total, 6) if total else 0.0
            records[site.name] = rec
            site.node.meta[meta.SPARSITY] = sparsity
            replace_tensor(gm, site.weight.target, stored)
