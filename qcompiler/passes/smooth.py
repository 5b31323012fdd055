"""smooth: SmoothQuant-style outlier migration (msModelSlim anti-outlier m1/m2 family), alpha searched.

Purpose: move activation outliers into the weights before a static (or dynamic) int8 scheme. For each
group of Linears that read one activation X, per input channel j

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)      (max over the group's Linears' column j)

clamped to [1e-5, 1e5] (s_j = 1 where channel j is all zero); X is divided by s (folded into the op
that produces X) and the Linears' columns are multiplied by s, so the float layer computes the same
function (up to rounding the folded tensors to the model dtype). Groups, found by graph dataflow and
folded by the one folding module (ir/folding.py: `find_fold_groups`, `fold`, `share_heads`):

  norm     `mul(norm.weight, rmsnorm(h))` -> q/k/v, and -> gate/up: s folded into the norm weight.
  attn_v   v_proj -> (sdpa value) -> o_proj: s folded into v_proj rows (and bias). o_proj's columns are
           head-major (query head h, dim d); the query heads of one kv group read the same v_proj rows,
           so s is computed per o_proj column, then reduced (max) over the heads sharing a kv head and
           repeated back over them.
  mlp_up   `mul(silu(gate), up_proj)` -> down_proj: s folded into up_proj rows (and bias).

Selection: `subgraphs=` (msModelSlim's names norm-linear / ov / up-down, '+'-joined; default all three) and
`match=` (regex on the group's source module, as msModelSlim's include/exclude) choose the groups smoothed.

alpha: `alpha=A` fixes it (and `beta=B` then replaces the weight exponent 1 - alpha, as msModelSlim's flex
smooth `FlexSmoothScaleCalculator.compute_smooth_scale`: s = act^alpha / w^beta); otherwise it is searched per group over {0, 1/grid, ..., 1}: the group's
outputs on a sample of calibration rows (`tokens`) with fake quantization (weights as the following
scheme quantizes them; activations per-tensor asymmetric min-max over the whole calibration set for
static schemes, per-token symmetric for dynamic ones, float for weight-only ones) are compared with the
float outputs; the alpha with the lowest MSE wins. The chosen alphas and the MSE before/after go to
PassResult.stats (`alphas`, `mse`), so into the report. How each Linear will be quantized is its spec
(`meta.QUANT_SPEC`): the scheme passes annotate before smooth runs, whatever the --passes order (passes/
base.py Phase); groups whose Linears carry no spec (no scheme quantizes them) are left alone.

shift (`shift=true`, norm groups only): z_j = (max_j + min_j) / 2 is subtracted from the normed
activation first: the norm gains a bias (`<norm>.bias` = -z/s, a new parameter read by a new `add`
node) and each consumer Linear's bias becomes `b + W @ z` (W before smoothing). Only where every
consumer Linear already has a bias (Qwen2's q/k/v): the artifact layout has no place for a bias the
architecture lacks (engines and the checker reject it, and static W8A8's quant_bias must match the stored
bias). Groups where it cannot apply are smoothed without shift and named in stats["shift_skipped"].

Requires: captured. Produces: smoothed. Forbids: annotated (write it before the scheme pass). Phase: TRANSFORM.
Cost: one extra forward of the calibration set per layer for the statistics, plus (grid + 2) quantized
matmuls of `tokens` rows through every Linear of the layer (exact int8 products, `qnumerics.int8_matmul`):
about 6 CPU-seconds per SmolLM2-135M layer at the defaults; lower `grid` / `tokens` for big models.
Memory: the search reads each Linear's weight as stored, in row chunks of qnumerics.ROW_CHUNK_ELEMENTS /
max(k, tokens) rows made float32 one at a time (`group_error`), and keeps the float outputs ([tokens, n] float32
per Linear); no float32 copy of a whole weight (a Qwen2.5-7B gate/up group: bench/probe_smooth_memory.py).
Limits: the graph must be a captured dense decoder layer; a group whose producer is not recognised is
skipped and named in stats["skipped"]. The folded norm weights / new norm biases live only in the graph:
the artifact writer takes a layer's float tensors from the transformed graph (driver._add_layer_tensors).
"""
import re
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..ir import meta
from ..ir import qnumerics as qn
from ..ir.folding import MAPPINGS, FoldGroup, find_fold_groups, fold, share_heads
from ..calibration.linear_inputs import InputStats, LayerRunner
from ..ir.patterns import get_tensor, replace_tensor
from ..ir.qspec import LinearQuantSpec, PerGroup, PerToken, TensorQuant
from .base import Pass, PassResult, Phase
from .properties import ANNOTATED, CAPTURED, SMOOTHED, WEIGHTS_ROUNDED
from .registry import register

S_MIN, S_MAX = 1e-5, 1e5

aten = torch.ops.aten
#: msModelSlim's subgraph type names (processor/anti_outlier/common/subgraph_type.py; the Qwen3 adapter
#: `get_adapter_config_for_subgraph` maps norm-linear, ov, up-down) -> our group kinds. Dense Llama/Qwen decoder
#: layers have no linear-linear subgraph (a Linear feeding a Linear directly), so it selects nothing here.
SUBGRAPH_KINDS = {**{sub: kind for kind, (sub, _) in MAPPINGS.items()}, "linear-linear": None}
ALL_SUBGRAPHS = "norm-linear+ov+up-down"


@dataclass(frozen=True)
class SmoothOptions:
    """alpha: fixed migration strength in [0, 1] (None: searched per group). beta: weight exponent with a
    fixed alpha, s = act^alpha / w^beta (None: 1 - alpha; msModelSlim flex smooth's beta). grid: search steps
    over [0, 1] (20 -> 0, 0.05, ..., 1). shift: also center norm outputs per channel (adds norm/Linear biases).
    tokens: calibration rows sampled per group for the search. subgraphs: '+'-joined msModelSlim subgraph
    types to smooth (norm-linear, ov, up-down; linear-linear matches none in dense layers). match: regex on
    the full name of a group's source module (`model.layers.3.input_layernorm`, `...self_attn.v_proj`,
    `...mlp.up_proj`, as msModelSlim's smooth include/exclude filter `mapping.source`)."""
    alpha: float | None = None
    grid: int = 20
    shift: bool = False
    tokens: int = 1024
    beta: float | None = None
    subgraphs: str = field(default=ALL_SUBGRAPHS, metadata={"choices": "any '+'-joined subset"})
    match: str = ".*"

    def __post_init__(self):
        if self.alpha is not None and not (0.0 <= float(self.alpha) <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.beta is not None and (self.alpha is None or not (0.0 <= float(self.beta) <= 1.0)):
            raise ValueError(f"beta={self.beta} needs a fixed alpha and must be in [0, 1]")
        unknown = [t for t in str(self.subgraphs).split("+") if t not in SUBGRAPH_KINDS]
        if unknown or not str(self.subgraphs):
            raise ValueError(f"subgraphs must be '+'-joined {', '.join(SUBGRAPH_KINDS)}, got {self.subgraphs!r}")
        try:
            re.compile(self.match)
        except (re.error, TypeError) as e:
            raise ValueError(f"match {self.match!r} is not a valid regular expression ({e})") from None

        if isinstance(self.grid, bool) or int(self.grid) != self.grid or not (1 <= self.grid <= 1000):
            raise ValueError(f"grid must be an integer in [1, 1000], got {self.grid!r}")
        if isinstance(self.tokens, bool) or int(self.tokens) != self.tokens or self.tokens < 16:
            raise ValueError(f"tokens must be an integer >= 16, got {self.tokens!r}")

    def kinds(self) -> set[str]:
        return {SUBGRAPH_KINDS[t] for t in self.subgraphs.split("+")} - {None}


# ---- the quantization the search emulates ------------------------------------------------------------
@dataclass
class QTensor:
    """Integer codes with their scale (and offset): value ~ (codes - offset) * scale."""
    codes: torch.Tensor                  # int8, [r, k]
    scale: torch.Tensor                  # float32, broadcastable to a row ([r, 1]) or per-group [r, k/g, 1]
    offset: float = 0.0

    def dequant(self) -> torch.Tensor:
        c = self.codes.float()
        if self.scale.dim() == 3:        # per-group
            r, k = c.shape
            return ((c.view(r, self.scale.shape[1], -1) - self.offset) * self.scale).view(r, k)
        return (c - self.offset) * self.scale


def quant_weight(w: torch.Tensor, q: TensorQuant) -> QTensor:
    """Symmetric per-channel / per-group quantization of [n, k] float32 (codes in [-qmax, qmax], ir/qnumerics.py)."""
    n, k = w.shape
    if isinstance(q.granularity, PerGroup) and k % q.granularity.size == 0 and q.granularity.size < k:
        wg = w.view(n, k // q.granularity.size, q.granularity.size)
        scale = qn.absmax_scale(wg.abs().amax(-1, keepdim=True), q.bits)
        return QTensor(qn.quantize(wg, scale, q.bits).to(torch.int8).view(n, k), scale)
    scale = qn.absmax_scale(w.abs().amax(-1, keepdim=True), q.bits)
    return QTensor(qn.quantize(w, scale, q.bits).to(torch.int8), scale)


def quant_activation(x: torch.Tensor, q: TensorQuant, lo: float, hi: float) -> QTensor:
    """x [r, k] float32 as the scheme quantizes it: per-tensor with the calibration range [lo, hi]
    (asymmetric: the spec's W8A8 convention x_q = round(x / s + o)) or per-token symmetric (dynamic)."""
    qmin, qmax = qn.code_range(q.bits, narrow=False)
    if isinstance(q.granularity, PerToken) or q.dynamic:
        s = qn.absmax_scale(x.abs().amax(-1, keepdim=True), q.bits)
        return QTensor(qn.quantize(x, s, q.bits, narrow=False).to(torch.int8), s)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if q.symmetric:
        s, o = max(abs(lo), abs(hi)) / qmax, 0.0
    else:
        s = (hi - lo) / (qmax - qmin)
        s = s if s > 0 else 1.0
        o = float(min(max(round(qmin - lo / s), qmin), qmax))
    s = s if s > 0 else 1.0
    codes = torch.clamp(torch.round(x * (1.0 / s) + o), qmin, qmax).to(torch.int8)
    return QTensor(codes, torch.tensor(s, dtype=torch.float32), o)


def quant_matmul(x: QTensor, w: QTensor, n: int | None = None) -> torch.Tensor:
    """(x codes - o) s_x @ ((w codes) s_w)^T in float32, exactly as an int32-accumulating kernel does
    (torch._int_mm when shapes allow; else float math on the dequantized values). n: the whole Linear's output
    width when w is a row chunk of it: the path is chosen for the whole Linear, as without chunks."""
    r, k = x.codes.shape
    n = w.codes.shape[0] if n is None else n
    if w.scale.dim() == 2 and r > 16 and k % 8 == 0 and n % 8 == 0:
        try:
            acc = qn.int8_matmul(x.codes, w.codes.T)  # == torch._int_mm (exact float32 GEMMs on CPU)
        except RuntimeError:
            acc = None
        if acc is not None:
            if x.offset:
                acc -= int(x.offset) * w.codes.sum(1, dtype=torch.int32)
            return acc.float() * x.scale * w.scale.T
    return x.dequant() @ w.dequant().T


# ---- scales -------------------------------------------------------------------------------------------
def smooth_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float,
                  heads: tuple[int, int, int] | None = None, w_limit: float | None = None,
                  beta: float | None = None) -> torch.Tensor:
    """s_j = act^alpha / w^beta (beta = 1 - alpha unless given), clamped to [S_MIN, S_MAX]; 1 where either side
    is 0. With `heads` (nh, kvh, hd) the per-column scales are reduced (max) over the query heads sharing a kv
    head and repeated back. `w_limit` caps s_j * w_j (keeps folded float16 weights finite)."""
    a, w = act_absmax.float(), w_absmax.float()
    beta = 1.0 - alpha if beta is None else beta
    s = a.clamp_min(1e-12).pow(alpha) / w.clamp_min(1e-12).pow(beta)
    s = torch.where((a > 0) & (w > 0), s.clamp(S_MIN, S_MAX), torch.ones_like(s))
    if heads is not None:
        s = share_heads(s, heads)
        w = share_heads(w, heads)
    if w_limit is not None:
        s = torch.minimum(s, w_limit / w.clamp_min(1e-12))
    return s


# ---- shift (norm groups): z subtracted before the scale ---------------------------------------------------
def shift_linear_biases(gm, group: FoldGroup, z: torch.Tensor) -> None:
    """Each consumer Linear's bias b becomes b + W @ z (W before folding; every consumer has a bias:
    `shift_blocker`)."""
    for site in group.sites:
        w = get_tensor(gm, site.weight.target)
        old = get_tensor(gm, site.bias.target).float()
        replace_tensor(gm, site.bias.target, (old + w.float() @ z).to(w.dtype))


def add_norm_bias(gm, group: FoldGroup, bias: torch.Tensor) -> None:
    """Give the norm a new parameter `<norm>.bias` (in the norm weight's dtype) added to its output by a new
    `add` node that the group's Linears read instead."""
    nw = get_tensor(gm, group.norm_weight.target)
    target = f"{group.producer}.bias"
    replace_tensor(gm, target, bias.to(nw.dtype), create=True)
    x = group.input
    with gm.graph.inserting_after(x):
        b = gm.graph.get_attr(target)
    with gm.graph.inserting_after(b):
        y = gm.graph.call_function(aten.add.Tensor, (x, b))
    y.meta["val"] = x.meta.get("val")
    for site in group.sites:
        site.node.replace_input_with(x, y)
        site.input = y
    group.input = y


def shift_blocker(group: FoldGroup) -> str:
    """Why shift cannot be applied to `group` ('' if it can). Each consumer Linear gains a bias W @ z; the
    artifact can only carry it where the architecture has that bias (Qwen2's q/k/v): engines and the
    checker reject a `bias` elsewhere, and without the tensor a static W8A8 `quant_bias` holding it no
    longer matches the layout's formula."""
    if group.norm_bias is not None:
        return f"{group.producer} already has a bias"
    for site in group.sites:
        if site.bias is None:
            return f"{site.name} has no bias in this architecture"
    return ""


# ---- the pass -----------------------------------------------------------------------------------------
def _row_slices(w: torch.Tensor, tokens: int, elements: int | None) -> list[slice]:
    """Row chunks of a Linear's weight w [n, k] for the search: each chunk's temporaries ([rows, k] float32 weight
    work, [tokens, rows] outputs) stay within `elements` (qnumerics.ROW_CHUNK_ELEMENTS unless given)."""
    return qn.row_slices(w.shape[0], max(w.shape[1], tokens), elements, multiple=8)  # 8: torch._int_mm's shapes


def column_absmax(weights: list[torch.Tensor], elements: int | None = None) -> torch.Tensor:
    """max |W_j| per input column j over the group's Linears, float32 [k], read from the weights as stored (model
    dtype) in row chunks: abs and max are exact in any float dtype, so this is the value of the float32 copies'.
    A Linear without rows (an empty Linear) adds nothing; when no Linear has rows every column's max is 0.0."""
    out = None
    for w in weights:
        if w.shape[0] == 0:  # amax over no rows is an error
            continue
        for rows in qn.row_slices(w.shape[0], w.shape[1], elements):
            m = w[rows].abs().amax(0)
            out = m if out is None else torch.maximum(out, m)
    return torch.zeros(weights[0].shape[1]) if out is None else out.float()


def float_outputs(x: torch.Tensor, weights: list[torch.Tensor],
                  elements: int | None = None) -> list[list[torch.Tensor]]:
    """The float outputs x @ W^T the search compares with, per Linear a list of column chunks [tokens, rows] (one per
    row chunk of W, `_row_slices`; `group_error` takes its chunks from these widths). W is read as stored and made
    float32 one chunk at a time."""
    return [[x @ w[rows].float().T for rows in _row_slices(w, x.shape[0], elements)] for w in weights]


def _chunk_output(xs: torch.Tensor, xq: QTensor | None, w: torch.Tensor, spec: LinearQuantSpec | None,
                  s: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Output columns of one row chunk w [rows, k] (stored dtype) of a Linear of n outputs, smoothed by s, as the
    scheme computes them. Weight quantization is per row (per channel or per group within a row), so its codes and
    scales are the unchunked ones' rows, and the int8 product (`quant_matmul`) is exact: those columns are the
    unchunked ones bit for bit. The float products (a Linear left float, weight-only schemes, quant_matmul's
    dequantized fallback) are float32 GEMMs whose blocking may depend on the width: equal to float32 rounding.
    Temporaries die on return."""
    ws = w.float() * s
    if spec is None:                         # this Linear stays float
        return xs @ ws.T
    q = quant_weight(ws, spec.weight)
    del ws
    if xq is None:                           # weight-only scheme
        return xs @ q.dequant().T
    return quant_matmul(xq, q, n)


def group_error(x: torch.Tensor, refs: list[list[torch.Tensor]], weights: list[torch.Tensor],
                specs: list[LinearQuantSpec | None], s: torch.Tensor, stats: InputStats,
                z: torch.Tensor | None = None) -> float:
    """MSE of the group's fake-quantized outputs, smoothed by s, against the float outputs `refs` (`float_outputs`:
    per Linear, column chunks; x: sampled input rows, already shifted by z; a None spec: that Linear stays float).

    Each Linear runs in the row chunks of its weight that `refs` has (weights as stored, made float32 a chunk at a
    time), so memory does not grow with the output width. The squared error is summed per chunk: with one chunk per
    Linear (every Linear up to ROW_CHUNK_ELEMENTS / max(k, tokens) rows: SmolLM2's and the tiny models' all) the
    result is bit-identical to the unchunked formula; with several, the float32 norms are taken per chunk and their
    squares added in float64, a different summation order. torch's float32 vector_norm accumulates in float32, so
    its own relative error grows with the element count (random data: 2e-5 at 1M elements, 2e-3 at 19M, a 7B
    gate_proj's [1024, 18944] output): on a Qwen2.5-7B gate/up group the 5-chunk MSE is closer to the float64 sum
    than the one-chunk MSE, and the two differ by ~2e-3 relative (bench/probe_smooth_memory.py, BENCHMARKS.md)."""
    act = next(sp.activation for sp in specs if sp is not None)
    lo = hi = 0.0
    if act is not None and not act.dynamic:  # per-tensor range over the whole calibration set
        zz = z if z is not None else 0.0
        lo, hi = float(((stats.min - zz) / s).min()), float(((stats.max - zz) / s).max())
    xs = x / s
    xq = quant_activation(xs, act, lo, hi) if act is not None else None
    total, count = 0.0, 0
    for w, spec, chunks in zip(weights, specs, refs):
        r0 = 0
        for ref in chunks:
            r1 = r0 + ref.shape[1]
            out = _chunk_output(xs, xq, w[r0:r1], spec, s, w.shape[0])
            out -= ref
            total += float(torch.linalg.vector_norm(out)) ** 2
            count += out.numel()
            del out
            r0 = r1
        assert r0 == w.shape[0], (r0, w.shape)
    return total / count


def search_alpha(samples: torch.Tensor, weights: list[torch.Tensor], specs: list[LinearQuantSpec | None],
                 stats: InputStats, act_absmax: torch.Tensor, w_absmax: torch.Tensor, alphas: list[float],
                 heads: tuple[int, int, int] | None = None, limit: float | None = None,
                 z: torch.Tensor | None = None, elements: int | None = None) -> tuple[float, float, float]:
    """(MSE without smoothing or shift, the lowest MSE over `alphas`, its alpha) of one group. weights: the
    Linears' weights as stored in the graph (read in row chunks of `elements`, qnumerics.ROW_CHUNK_ELEMENTS unless
    given). Several processes: each rank scores its share of the alphas (every rank holds the same samples), and
    all get every score: the choice of one process, at 1/W of the work."""
    refs = float_outputs(samples, weights, elements)
    base = group_error(samples, refs, weights, specs, torch.ones_like(act_absmax), stats, None)
    x = samples
    if z is not None:
        x = x - z
        del refs
        refs = float_outputs(x, weights, elements)
    losses = distributed.split_map(lambda a: group_error(
        x, refs, weights, specs, smooth_scales(act_absmax, w_absmax, a, heads, limit), stats, z), alphas)
    best_err, alpha = min(zip(losses, alphas), key=lambda e: e[0])
    return base, best_err, alpha


@register
class Smooth(Pass):
    name = "smooth"
    summary = "SmoothQuant: migrate activation outliers into weights (alpha searched per group; shift=true centers)"
    requires = frozenset({CAPTURED})
    produces = frozenset({SMOOTHED})
    forbids = frozenset({ANNOTATED, WEIGHTS_ROUNDED})  # codes gptq/awq chose would go stale
    phase = Phase.TRANSFORM
    migrates_outliers = True
    Options = SmoothOptions

    def alphas(self) -> list[float]:
        if self.options.alpha is not None:
            return [float(self.options.alpha)]
        return [round(i / self.options.grid, 6) for i in range(self.options.grid + 1)]

    def run(self, gm, ctx):
        groups, skipped = find_fold_groups(gm)
        todo = []
        kinds = self.options.kinds()
        for g in groups:
            if g.kind not in kinds or re.search(self.options.match, ctx.prefix + g.producer) is None:
                skipped[g.sites[0].name] = f"not selected (subgraphs={self.options.subgraphs}, match)"
                continue
            specs = [s.node.meta.get(meta.QUANT_SPEC) for s in g.sites]  # None: stays float
            if all(sp is None for sp in specs):
                skipped[g.sites[0].name] = "no scheme quantizes these Linears"
                continue
            todo.append((g, specs))
        stats_out = {"alphas": {}, "groups": {}, "schemes": {}, "skipped": skipped, "shift": self.options.shift}
        if not todo:
            return PassResult(gm, modified=False, stats=stats_out)
        search = self.options.alpha is None
        keep = self.options.tokens if search else 0
        stats = LayerRunner(gm, ctx).collect([g.input for g, _ in todo], hessian=False, abs_mean=False,
                                             extrema=True, keep_rows=keep)
        if search:
            stats_out["mse"] = {}
        for g, specs in todo:
            st = stats[g.input]
            z = None
            if self.options.shift and g.kind == "norm":
                why = shift_blocker(g)
                if why:
                    stats_out.setdefault("shift_skipped", {})[g.producer] = why
                else:
                    z = (st.max + st.min) / 2
            act_absmax = st.absmax if z is None else (st.max - st.min) / 2
            weights = [get_tensor(gm, s.weight.target) for s in g.sites]  # as stored: read in row chunks
            w_absmax = column_absmax(weights)
            limit = torch.finfo(weights[0].dtype).max / 16
            if search:  # before (base): no smoothing, no shift (what the scheme alone would do)
                base, best_err, alpha = search_alpha(st.samples, weights, specs, st, act_absmax, w_absmax,
                                                     self.alphas(), g.heads, limit, z)
                stats_out["mse"][g.producer] = [_sig(base), _sig(best_err)]
            else:
                alpha = float(self.options.alpha)
            s = smooth_scales(act_absmax, w_absmax, alpha, g.heads, limit, self.options.beta)
            del weights  # fold replaces them; the old tensors need not outlive it
            if z is not None:
                shift_linear_biases(gm, g, z)
            fold(gm, g, s)
            if z is not None:
                add_norm_bias(gm, g, -z / s)
            stats_out["alphas"][g.producer] = alpha
            stats_out["groups"][g.producer] = [s.name for s in g.sites]
            stats_out["schemes"][g.producer] = next(sp.quant_type for sp in specs if sp is not None)
        gm.recompile()
        return PassResult(gm, modified=True, stats=stats_out)


def _sig(v: float) -> float:
    return float(f"{v:.4g}")

