"""fallback: keep the decoder Linears whose quantization hurts most in float, chosen by measured sensitivity.

Usage: after every scheme pass, e.g. `--passes w8a8,fallback:level=3` or `smooth,w8a8,fallback:budget=0.05`.
  level=N   keep exactly N decoder Linears float, model-wide (msModelSlim's disable_level L0..L5: L0 = none;
            any N >= 0 up to the number of quantized Linears is accepted).
  budget=X  keep the fewest Linears that bring the model's estimated calibration error E (below) to <= X.

Sensitivity (the measured number). For a candidate unit U of layer i (below), on the calibration data:
    s_U = mean over calibration tokens t of ||y_U[t] - y_ref[t]||^2 / ||y_ref[t]||^2
y_ref: the layer's output with nothing quantized (the graph as the passes before the scheme left it: smooth /
awq are float-equivalent; after gptq the float weights already hold gptq's rounding, so s_U is then the error
that quantizing U's activations adds); y_U: the same layer with ONLY U quantized by the pipeline's scheme
(its annotation, real observe/calibrate/lower, the exact kernels the artifact runs). Per-token normalisation
keeps a few massive-activation tokens from dominating. The model's error estimate is additive:
    E = sum over layers i and units U of s_U      (what `budget` compares with; the report prints E)
so falling back a set F leaves E - sum_{U in F} s_U. X is in those units: e.g. X = 0.5 * E (see the report of
any fallback run, level=0 included) halves the estimate.

Units. q/k/v and gate/up share one quant type in the artifact (engines fuse them; the spec requires it), so
they fall back together: the units are q/k/v (3 Linears), o_proj (1), gate/up (2), down_proj (1), each
measured as a whole; level/budget count Linears. The choice is exact on the additive estimate: a 0/1
knapsack over units (size = Linears) gives, for every count c, the set of units of c Linears removing the
most error; level=N takes c = N (always reachable when single o_proj/down_proj units exist; otherwise an
unreachable N is an error before any work), budget=X takes the smallest c whose remaining error is <= X.
Only Linears the scheme passes quantize are candidates (--exclude / unmatched ones are already float).

Mechanism (the decision is model-wide, the driver compiles layer by layer): fallback is a `model_wide` pass
(passes/base.py), so the driver first runs its `presweep` (the module function below): per layer, capture -> the user passes before `fallback` ->
`measure_layer`, with float inputs (layer i+1 gets y_ref of layer i). Then `decide` picks the units and the
driver rebuilds the pipeline with the decided pass (`Fallback(options, decision)`). In the main compile this
pass only strips the scheme annotation (and gptq/awq weight codes) from the chosen Linears, so they are
lowered as float Linears and written "FLOAT". Cost: per layer, the pre-scheme passes once more plus about
(2 + number of units) forwards of the calibration set. Requires: annotated. Produces: fallback_applied.
Forbids: observed (the internal tail comes after it). No scheme pass may follow it (it would claim the
Linears it released): checked before any work (`check_fallback`).
Records (report): the decision (metric, E before/after, chosen units with their sensitivities and ranks,
the cutoff between chosen and not chosen) at the top of the report, and per layer which Linears fell back.
"""
import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .. import distributed, knobs
from ..calibration.forward import settle_pending
from ..errors import QCError
from ..ir import meta
from ..ir.capture import LayerInputs
from ..ir.patterns import linear_sites
from .base import LayerContext, Pass, PassResult
from .properties import ANNOTATED, FALLBACK_APPLIED, LOWERED, OBSERVED
from .registry import make_pass, register

#: fallback units inside a decoder layer (fused groups fall back together), in graph order
UNITS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
         ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
#: Qwen2-MoE's shared expert: a dense MLP (its gate/up fused)
SHARED_EXPERT_UNITS = (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"), ("mlp.shared_expert.down_proj",))


def layer_units(names) -> list[tuple[str, ...]]:
    """The fallback units among `names` (layer-relative Linear names of one decoder layer that a scheme quantizes):
    the dense UNITS, and on a MoE layer (ir/moe.py) every routed expert's gate/up/down as ONE unit (engines build
    one fused-MoE method per layer from expert 0's entries and refuse mixed or partly FLOAT experts:
    vLLM-Ascend modelslim_config.py get_linear_quant_type / is_layer_skipped_ascend; ir/moe.moe_fused_groups),
    then the shared expert's units. A unit is listed only when all its Linears are in `names`."""
    from ..ir.moe import EXPERT_LINEAR
    present = set(names)
    units = [u for u in UNITS if all(n in present for n in u)]
    experts = tuple(n for n in names if EXPERT_LINEAR.search(n))
    if experts:
        units.append(experts)
    units += [u for u in SHARED_EXPERT_UNITS if all(n in present for n in u)]
    return units


def unit_label(names) -> str:
    """A unit as the report prints it: its Linears, or `<layer>.mlp.experts.* (N Linears)` for a MoE expert set."""
    from ..ir.moe import EXPERT_LINEAR
    if len(names) > 3 and all(EXPERT_LINEAR.search(n) for n in names):
        head = names[0][:EXPERT_LINEAR.search(names[0]).start()]
        return f"{head}.mlp.experts.* ({len(names)} Linears)"
    return ", ".join(names)

METRIC = ("per-token relative squared error of the decoder layer output, ||y_U - y_ref||^2 / ||y_ref||^2, "
          "mean over calibration tokens, with only unit U quantized; E = sum over layers and units")


@dataclass(frozen=True)
class FallbackOptions:
    """level: keep exactly N decoder Linears float (0 = none, msModelSlim disable_level L0..). budget: keep the
    fewest Linears that bring the estimated calibration error E (sum over layers and units of the per-token
    relative squared error of the layer output) to <= X. Give exactly one of them."""
    level: int | None = None
    budget: float | None = None

    def __post_init__(self):
        if (self.level is None) == (self.budget is None):
            raise ValueError("give exactly one of level=N (Linears kept float) or budget=X (error bound), "
                             f"got level={self.level}, budget={self.budget}")
        if self.level is not None and (isinstance(self.level, bool) or not isinstance(self.level, int)
                                       or self.level < 0):
            raise ValueError(f"level must be an integer >= 0, got {self.level!r}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, (int, float))
                                        or not math.isfinite(self.budget) or self.budget <= 0):
            raise ValueError(f"budget must be a number > 0, got {self.budget!r}")

    def describe(self) -> str:
        return f"level={self.level}" if self.level is not None else f"budget={self.budget}"


@dataclass(frozen=True)
class Decision:
    keep: frozenset          # full HF names of the Linears kept float
    report: dict             # what the compile report shows


@register
class Fallback(Pass):
    name = "fallback"
    summary = "keep the most sensitive decoder Linears float (measured on calibration data): level=N or budget=X"
    requires = frozenset({ANNOTATED})
    produces = frozenset({FALLBACK_APPLIED})
    forbids = frozenset({OBSERVED, LOWERED})
    Options = FallbackOptions

    model_wide = True

    def __init__(self, options=None, decision: Decision | None = None):
        super().__init__(options)
        self.decision = decision

    def check_model(self, passes, config, exclude):
        check_fallback(passes, config, exclude)

    def presweep(self, passes, skeleton, inputs, ckpt, exclude, batch_size, log=None, expert_scale_also=None):
        """Measure every layer and decide (module function `presweep`): (the pass with its decision, report)."""
        decided, report = presweep(passes, skeleton, inputs, ckpt, exclude, batch_size, log, expert_scale_also)
        return decided[fallback_index(decided)], report

    def restore(self, report):
        """The decided pass from its report (the Linears of its chosen units are the ones kept float)."""
        keep = [name for unit in report["chosen"] for name in unit["linears"]]
        return Fallback(self.options, Decision(keep=frozenset(keep), report=report))

    def run(self, gm, ctx):
        if self.decision is None:
            raise QCError("pass fallback needs the driver's model-wide pre-sweep (fallback.presweep) before it "
                          "runs on a layer")
        kept = []
        for site in linear_sites(gm):
            if ctx.prefix + site.name in self.decision.keep and meta.QUANT_SPEC in site.node.meta:
                _strip(site.node)
                kept.append(site.name)
        sens = self.decision.report.get("sensitivity_by_linear", {})
        return PassResult(gm, modified=bool(kept), stats={
            "kept_float": kept, "sensitivity": {n: sens.get(ctx.prefix + n) for n in kept}})


def _strip(node) -> None:
    node.meta.pop(meta.QUANT_SPEC, None)
    node.meta.pop(meta.WEIGHT_QPARAMS, None)


# ---- measurement --------------------------------------------------------------------------------------
def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over tokens of the per-token relative squared error. Several processes (distributed.py): the
    per-token values of every rank are gathered in global token order first, so the mean is the one a single
    process computes (exact)."""
    d = (y.float() - ref.float()).pow(2).sum(-1)
    r = ref.float().pow(2).sum(-1).clamp_min(1e-30)
    return float(distributed.gather_rows((d / r).reshape(-1)).mean())


def measure_layer(gm: torch.fx.GraphModule, ctx: LayerContext) -> tuple[list[tuple[tuple[str, ...], float]],
                                                                      torch.Tensor]:
    """([(unit, s_U)] for every unit whose Linears are all annotated, y_ref). `gm` is annotated, not lowered;
    it is not modified (copies are lowered) but for the rewrites pending in `ctx` (kv8 / fa3 before fallback),
    which are applied first: every measurement sees the attention as the compile quantizes it."""
    settle_pending(gm, ctx)
    units = layer_units([s.name for s in linear_sites(gm) if meta.QUANT_SPEC in s.node.meta])
    if not units:
        return [], ctx.run_layer(gm)
    ref_gm = copy.deepcopy(gm)
    for site in linear_sites(ref_gm):
        _strip(site.node)
    ref_gm.recompile()
    ref = ctx.run_layer(ref_gm)
    del ref_gm
    scratch = dataclasses.replace(ctx, artifact={}, records={})
    # one calibration forward for every unit: observers are pass-through, so each sees float inputs, as it
    # does when only its own unit is quantized
    calibrated = copy.deepcopy(gm)
    for name in ("observe", "calibrate"):
        calibrated = make_pass(name).run(calibrated, scratch).gm
    lower = make_pass("lower")
    out = []
    for unit in units:
        g = copy.deepcopy(calibrated)
        for site in linear_sites(g):
            if site.name not in unit:
                _strip(site.node)
        g = lower.run(g, dataclasses.replace(ctx, artifact={}, records={})).gm
        out.append((unit, _relative_error(ctx.run_layer(g), ref)))
        del g
    return out, ref


# ---- decision -------------------------------------------------------------------------------------------
def _knapsack(sizes: list[int], values: list[float]) -> list[list[int] | None]:
    """For every count c of Linears: the item indices of total size exactly c with the largest value (None when
    no subset has size c). 0/1 knapsack, exact; ties keep the earlier (higher-ranked) items."""
    cap = sum(sizes)
    best: list[float | None] = [0.0] + [None] * cap
    take = []  # take[i][c]: item i is used in the best solution of size c after items 0..i
    for size, value in zip(sizes, values):
        row = [False] * (cap + 1)
        for c in range(cap, size - 1, -1):
            prev = best[c - size]
            if prev is not None and (best[c] is None or prev + value > best[c]):
                best[c] = prev + value
                row[c] = True
        take.append(row)
    result = []
    for c in range(cap + 1):
        if best[c] is None:
            result.append(None)
            continue
        chosen, left = [], c
        for i in range(len(sizes) - 1, -1, -1):
            if take[i][left]:
                chosen.append(i)
                left -= sizes[i]
        result.append(sorted(chosen))
    return result


def decide(measured: list[tuple[int, tuple[str, ...], float]], options: FallbackOptions) -> Decision:
    """measured: [(layer, unit, s_U)] over the model. Returns the Linears to keep float and the report."""
    ranked = sorted(measured, key=lambda m: -m[2])  # stable: layer/graph order breaks ties
    sizes = [len(u) for _, u, _ in ranked]
    values = [s for _, _, s in ranked]
    total = sum(values)
    solutions = _knapsack(sizes, values)
    if options.level is not None:
        if options.level >= len(solutions) or solutions[options.level] is None:
            raise QCError(f"fallback:level={options.level}: no set of fallback units has exactly "
                          f"{options.level} Linears (q/k/v and gate/up fall back together; "
                          f"{sum(sizes)} Linears are quantized)")
        chosen = solutions[options.level]
    else:
        chosen = next(sol for sol in solutions if sol is not None and total - sum(values[i] for i in sol)
                      <= options.budget)
    chosen_set = set(chosen)
    kept = []
    units = []
    for rank, (layer, unit, s) in enumerate(ranked, start=1):
        names = [f"model.layers.{layer}.{n}" for n in unit]
        entry = {"rank": rank, "layer": layer, "linears": names, "sensitivity": s}
        if rank - 1 in chosen_set:
            kept += names
            units.append(entry)
    not_chosen = [values[i] for i in range(len(ranked)) if i not in chosen_set]
    removed = sum(values[i] for i in chosen)
    report = {
        "option": options.describe(), "metric": METRIC, "units_measured": len(ranked),
        "linears_quantized_before": sum(sizes), "linears_kept_float": len(kept),
        "error_before": total, "error_after": total - removed,
        "chosen": units,
        "cutoff": {"lowest_chosen": min((values[i] for i in chosen), default=None),
                   "highest_not_chosen": max(not_chosen, default=None)},
        "ranking_top": [{"rank": r, "layer": layer, "linears": [f"model.layers.{layer}.{n}" for n in u],
                         "sensitivity": s} for r, (layer, u, s) in enumerate(ranked[:12], start=1)],
        "sensitivity_by_linear": {f"model.layers.{layer}.{n}": s for layer, u, s in ranked for n in u},
    }
    return Decision(keep=frozenset(kept), report=report)


# ---- driver hooks -----------------------------------------------------------------------------------------
def fallback_index(passes) -> int | None:
    return next((i for i, p in enumerate(passes) if isinstance(p, Fallback)), None)


def check_fallback(passes, config: dict, exclude=()) -> None:
    """Before any work: no scheme pass after fallback; level reachable with the Linears the schemes quantize."""
    from .group_size import first_claim
    idx = fallback_index(passes)
    if idx is None:
        return
    later = [p.name for p in passes[idx + 1:] if getattr(p, "claims", None) is not None]
    if later:
        raise QCError(f"pass {later[0]} comes after fallback: put fallback after every scheme pass (it releases "
                      f"Linears the schemes claimed; a later scheme would claim them again)")
    level = passes[idx].options.level
    if level is None:
        return
    from .group_size import layer_linear_shapes
    sizes = []
    for i in range(int(config["num_hidden_layers"])):
        claimed = [n for n in layer_linear_shapes(config, i)
                   if first_claim(passes, f"model.layers.{i}.{n}", exclude) is not None]
        sizes += [len(unit) for unit in layer_units(claimed)]
    reachable = _knapsack(sizes, [0.0] * len(sizes)) if sizes else [[]]
    if level >= len(reachable) or reachable[level] is None:
        raise QCError(f"fallback:level={level}: the schemes quantize {sum(sizes)} decoder Linears and no set of "
                      f"fallback units (q/k/v and gate/up fall back together; a MoE layer's experts all together) "
                      f"has exactly {level}; choose level <= {sum(sizes)}")


def presweep(passes, skeleton, inputs: LayerInputs, ckpt, exclude, batch_size: int, log=None,
             expert_scale_also: dict | None = None):
    """Measure every layer (float inputs), decide, and return (pipeline with the decided pass, report dict)."""
    from .manager import PassManager
    idx = fallback_index(passes)
    t0 = time.perf_counter()
    before = PassManager(passes[:idx])
    measured = []
    bar = tqdm(range(ckpt.num_layers), desc="fallback pre-sweep", unit="layer", file=sys.stderr,
               disable=not knobs.progress_enabled())
    for i in bar:
        gm = skeleton.capture_layer(i, inputs)
        ctx = LayerContext(index=i, inputs=inputs, dtype=ckpt.dtype, exclude=tuple(exclude),
                           batch_size=batch_size, expert_scale_also=dict(expert_scale_also or {}))
        gm = before.run(gm, ctx)
        units, ref = measure_layer(gm, ctx)
        measured += [(i, unit, s) for unit, s in units]
        inputs = LayerInputs(hidden=ref, position_embeddings=inputs.position_embeddings)
        del gm, ctx
    decision = decide(measured, passes[idx].options)
    decision.report["seconds"] = round(time.perf_counter() - t0, 1)
    if log is not None:
        log(f"fallback {passes[idx].options.describe()}: keeping {len(decision.keep)} Linears float "
            f"(estimated error {decision.report['error_before']:.4g} -> {decision.report['error_after']:.4g})")
    return with_decision(passes, decision.keep, decision.report), decision.report


def with_decision(passes, keep, report: dict) -> list:
    """The pipeline with its fallback pass carrying a decision (from `presweep`, or restored by a resumed
    compile: resume.py): `keep` = full names of the Linears kept float."""
    idx = fallback_index(passes)
    new = list(passes)
    new[idx] = Fallback(passes[idx].options, Decision(keep=frozenset(keep), report=report))
    return new
