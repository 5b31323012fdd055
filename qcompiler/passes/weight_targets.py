"""What weight quantization the scheme after a weight-rounding pass (gptq, awq) will apply, per Linear.

gptq and awq choose integer codes and scales themselves (`meta.WEIGHT_QPARAMS`), so they must quantize
exactly as the scheme pass that follows them in the pipeline will: same bits, same granularity (per
channel or per group of `group` input channels), same symmetric absmax scales as the encoder.

`weight_targets(gm, ctx, me)` -> `{linear name inside the layer: WeightTarget}` for every Linear some
later scheme pass will claim: claims are simulated with the rule scheme passes apply at run time
(`group_size.first_claim`: --exclude keeps it float, else the first later scheme pass whose `match`
selects it). bits and group come from that pass's spec (its `options.group`, resolved by the driver; a
pass left with `group=None`, e.g. in a test, resolves it over this layer as `SchemePass.run` does).
Quantization helpers (`quantize`, `dequantize`, `column_scale`, `fake_quant`) are the encoder's math
(`encode.quantize_weight`: symmetric, codes in [-qmax, qmax], zero group -> scale 1.0); `quantize` rounds the
scale to the target's model dtype first (what the engines hold), so the codes a pass chooses are computed
against the scale that runs (`fake_quant`, the searches' cheap stand-in, does not).
`single_thread()` runs a block on one torch thread (see its docstring).
"""
import contextlib
from dataclasses import dataclass

import torch

from ..ir.model_dtype import quantize_weight
from ..ir.patterns import get_tensor, linear_sites
from .group_size import default_group_size, first_claim

#: weight bits of the artifact quant types (fallback when a scheme has no usable spec)
WEIGHT_BITS = {"W8A8": 8, "W8A8_DYNAMIC": 8, "W8A8_MIX": 8, "W8A16": 8, "W8A8S": 8,
               "W4A16": 4, "W4A8_DYNAMIC": 4}


@dataclass(frozen=True)
class WeightTarget:
    bits: int           # 8 or 4
    group: int          # 0: per-channel, else scales per `group` input channels
    scheme: str         # the scheme pass that will quantize the Linear
    quant_type: str
    dtype: torch.dtype | None = None   # model dtype the scales are rounded to (None: not rounded)

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 7

    def describe(self) -> str:
        return f"int{self.bits} {'per-group(' + str(self.group) + ')' if self.group else 'per-channel'}"


def later_schemes(ctx, me) -> list:
    """Scheme passes (with a quant_type) after `me` in ctx.pipeline (the whole pipeline if `me` is absent)."""
    pipeline = list(ctx.pipeline)
    index = next((i for i, p in enumerate(pipeline) if p is me), None)
    after = pipeline[index + 1:] if index is not None else pipeline
    return [p for p in after if getattr(p, "quant_type", None)]


def _spec_weight(p, group: int):
    try:
        return p.spec(group).weight
    except NotImplementedError:
        return None


def weight_targets(gm: torch.fx.GraphModule, ctx, me) -> dict[str, WeightTarget]:
    """{layer-relative Linear name: WeightTarget} for the Linears a later scheme pass will quantize."""
    schemes = later_schemes(ctx, me)
    sites = linear_sites(gm)
    owner = {s.name: first_claim(schemes, ctx.prefix + s.name, ctx.exclude) for s in sites}
    targets = {}
    for p in {id(p): p for p in owner.values() if p is not None}.values():
        mine = [s for s in sites if owner[s.name] is p]
        group = getattr(p.options, "group", 0)
        if group is None:   # not resolved by the driver: the rule SchemePass.run applies to this layer
            group = default_group_size({ctx.prefix + s.name: get_tensor(gm, s.weight.target).shape[1]
                                        for s in mine})
        w = _spec_weight(p, group)
        bits = w.bits if w is not None else WEIGHT_BITS[p.quant_type]
        size = getattr(getattr(w, "granularity", None), "size", None) if w is not None else None
        group = int(size) if size else (0 if w is not None else int(group or 0))
        for s in mine:
            targets[s.name] = WeightTarget(bits=bits, group=group, scheme=p.name, quant_type=p.quant_type,
                                           dtype=ctx.dtype)
    return targets


def quantize(w: torch.Tensor, t: WeightTarget, scale: torch.Tensor | None = None):
    """(int8 codes [n, k], float32 scale [n, G]) exactly as the encoder computes them (scale rounded to t.dtype)."""
    return quantize_weight(w, t.bits, t.group, scale, model_dtype=t.dtype)


def column_scale(scale: torch.Tensor, k: int) -> torch.Tensor:
    """Scale [n, G] expanded to one value per weight element [n, k]."""
    return scale.repeat_interleave(k // scale.shape[1], dim=1)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 q * scale with per-channel or per-group scale."""
    return q.float() * column_scale(scale, q.shape[1])


def fake_quant(w: torch.Tensor, t: WeightTarget, scale: torch.Tensor | None = None):
    """(dequantized float32 weight [n, k], scale [n, G]): `dequantize(*quantize(w, t, scale))` in fewer
    passes over the weight (no int8 codes, no checks), for searches that quantize many candidates."""
    n, k = w.shape
    groups = w.reshape(n, k // (t.group or k), -1)
    if scale is None:
        scale = groups.abs().amax(-1) / t.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    s3 = scale.unsqueeze(-1)
    return (torch.round(groups / s3).clamp_(-t.qmax, t.qmax) * s3).reshape(n, k), scale


@contextlib.contextmanager
def single_thread():
    """Run a pass's own math on one torch thread. GPTQ's column loop and the AWQ searches are thousands
    of small or medium ops that intra-op threading mostly synchronises; on this busy 2-core machine two
    threads made them 2-3x slower (GPTQ's column loop and float64 Cholesky inverse 10-20x). Layer
    forwards and the Gram matrices keep the default thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
