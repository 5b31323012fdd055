"""Example (README "Writing a pass"): a new outlier-migration pass is this one file plus one registry line.

`equalize:alpha=A` migrates activation outliers into the weights with SmoothQuant's formula at a fixed strength,
s_j = max|x_j|^A / max|W_:,j|^(1-A), for every producer -> consumers group the folding table finds
(ir/folding.py: norm -> q/k/v and gate/up, v -> o with grouped-query heads sharing one scale, up -> down): X / s
in the producer, W * s in the consumers, so the float layer computes the same function. Unlike `smooth` it never
searches alpha. Statistics: max |x| per input channel over the calibration set (calibration/linear_inputs.py).
It runs in the TRANSFORM phase, after the scheme passes annotated the Linears (decide, then transform): a group
no scheme quantizes is left alone.
"""
from dataclasses import dataclass

import torch

from qcompiler.calibration.linear_inputs import LayerRunner
from qcompiler.ir import meta
from qcompiler.ir.folding import find_fold_groups, fold, share_heads
from qcompiler.ir.patterns import get_tensor
from qcompiler.passes.base import Pass, PassResult, Phase
from qcompiler.passes.properties import ANNOTATED, CAPTURED, SMOOTHED, WEIGHTS_ROUNDED


@dataclass(frozen=True)
class EqualizeOptions:
    """alpha: migration strength in [0, 1] (0: nothing moves to the weights' side of the balance, 1: all)."""
    alpha: float = 0.5

    def __post_init__(self):
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


def equalize_scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [k] float32 = act^alpha / w^(1-alpha), 1 where either side is 0 (a dead channel moves nothing)."""
    s = act_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1.0 - alpha)
    return torch.where((act_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))


class Equalize(Pass):
    name = "equalize"
    summary = "fixed-strength SmoothQuant migration over the folding table (example pass)"
    requires = frozenset({CAPTURED})
    produces = frozenset({SMOOTHED})
    forbids = frozenset({ANNOTATED, WEIGHTS_ROUNDED})  # written before the scheme; codes chosen earlier would go stale
    phase = Phase.TRANSFORM
    migrates_outliers = True  # the `auto` policy then keeps no Linear float for static int8 activations
    Options = EqualizeOptions

    def run(self, gm, ctx):
        groups, skipped = find_fold_groups(gm)
        groups = [g for g in groups if any(meta.QUANT_SPEC in s.node.meta for s in g.sites)]
        if not groups:
            return PassResult(gm, modified=False, stats={"skipped": skipped})
        stats = LayerRunner(gm, ctx).collect([g.input for g in groups], hessian=False, abs_mean=False,
                                             extrema=True)
        scales = {}
        for g in groups:
            act = stats[g.input].absmax
            w = torch.stack([get_tensor(gm, s.weight.target).float().abs().amax(0) for s in g.sites]).amax(0)
            if g.kind == "attn_v" and g.heads:  # query heads of one kv head read the same v_proj rows: one scale for them
                act, w = share_heads(act, g.heads), share_heads(w, g.heads)
            s = equalize_scales(act, w, float(self.options.alpha))
            fold(gm, g, s)
            scales[g.sites[0].name] = round(float(s.max()), 4)
        return PassResult(gm, modified=True, stats={"max_scale": scales, "skipped": skipped})
