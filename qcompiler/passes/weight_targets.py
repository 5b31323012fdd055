"""How each Linear's weight will be quantized, read from its spec, for the passes that choose codes (gptq, awq).

gptq and awq choose integer codes and scales themselves (`meta.WEIGHT_QPARAMS`), so they must quantize
exactly as the Linear's scheme will: same bits, same granularity (per channel or per group of `group` input
channels), same symmetric absmax scales as the encoder.

`weight_targets(gm, ctx, me)` -> `{linear name inside the layer: WeightTarget}` for every Linear whose node
carries a `meta.QUANT_SPEC`: the scheme passes annotate before any float transform runs (passes/base.py
Phase), so bits and group are the spec's (`spec.weight.bits`, its PerGroup size or 0 per-channel). A Linear
without a spec stays float and is absent. A spec whose weight observer chooses the codes itself (w8a8s's
fraction/sigma, `qspec.OutlierSplit`) cannot take codes from `me`: QCError naming both passes.
Quantization helpers (`quantize`, `dequantize`, `column_scale`, `fake_quant`) are the encoder's math
(`ir.model_dtype.quantize_weight`: symmetric, codes in [-qmax, qmax], zero group -> scale 1.0); `quantize` rounds the
scale to the target's model dtype first (what the engines hold; for a routed expert then to the dtypes of
`ctx.expert_scale_also`, the engines' fused-MoE casts), so the codes a pass chooses are computed against the scale
that runs (`fake_quant`, the searches' cheap stand-in, does not).
`single_thread()` runs a block on one torch thread (see its docstring).
"""
import contextlib
from dataclasses import dataclass

import torch

from ..ir.model_dtype import quantize_weight
from ..errors import QCError
from ..ir import meta
from ..ir import qnumerics as qn
from ..ir.moe import EXPERT_LINEAR
from ..ir.patterns import linear_sites
from ..ir.qspec import OutlierSplit, PerGroup


@dataclass(frozen=True)
class WeightTarget:
    bits: int           # 2..8 (ir/qnumerics.py)
    group: int          # 0: per-channel, else scales per `group` input channels
    scheme: str         # the scheme pass that will quantize the Linear
    quant_type: str
    dtype: torch.dtype | None = None   # model dtype the scales are rounded to (None: not rounded)
    also: tuple = ()                   # dtypes the scales are then rounded to (a routed expert: ctx.expert_scale_also)

    @property
    def qmax(self) -> int:
        return qn.qmax(self.bits)

    def describe(self) -> str:
        return f"int{self.bits} {'per-group(' + str(self.group) + ')' if self.group else 'per-channel'}"


def weight_targets(gm: torch.fx.GraphModule, ctx, me) -> dict[str, WeightTarget]:
    """{layer-relative Linear name: WeightTarget} for the Linears whose spec quantizes the weight (`me`: the
    pass asking, named in errors)."""
    targets = {}
    for site in linear_sites(gm):
        spec = site.node.meta.get(meta.QUANT_SPEC)
        if spec is None:
            continue
        w = spec.weight
        if isinstance(w.observer, OutlierSplit):
            raise QCError(f"{spec.pass_name}:fraction/sigma choose {ctx.prefix}{site.name}'s codes, but {me.name} "
                          f"would choose them too; drop one of them")
        group = w.granularity.size if isinstance(w.granularity, PerGroup) else 0
        also = ctx.expert_scale_also.get(spec.quant_type, ()) if EXPERT_LINEAR.search(site.name) else ()
        targets[site.name] = WeightTarget(bits=w.bits, group=int(group), scheme=spec.pass_name,
                                          quant_type=spec.quant_type, dtype=ctx.dtype, also=tuple(also))
    return targets


def quantize(w: torch.Tensor, t: WeightTarget, scale: torch.Tensor | None = None):
    """(int8 codes [n, k], float32 scale [n, G]) exactly as the encoder computes them (scale rounded to t.dtype,
    then to t.also)."""
    return quantize_weight(w, t.bits, t.group, scale, model_dtype=t.dtype, also=t.also)


def column_scale(scale: torch.Tensor, k: int) -> torch.Tensor:
    """Scale [n, G] expanded to one value per weight element [n, k]."""
    return scale.repeat_interleave(k // scale.shape[1], dim=1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, elements: int | None = None) -> torch.Tensor:
    """float32 q * scale [n, k] from codes q [n, k] and a per-channel or per-group scale [n, G] ([n] taken as
    [n, 1]). Made in row chunks (`qn.row_slices`, `elements` per chunk), each group's scale broadcast over its
    columns (the same products as `q.float() * column_scale(scale, k)`), so the only full-size tensor is the
    result (a float32 copy of the codes and the expanded scale were two more: 0.5 GiB each for a 7B gate/up pair).
    No rows (n = 0) gives an empty float32 [0, k]."""
    n, k = q.shape
    if n == 0:  # reshape(0, -1) below is ambiguous
        return torch.empty(0, k)
    scale = scale.reshape(n, -1)
    g = scale.shape[1]
    out = torch.empty(n, k)
    for r in qn.row_slices(n, k, elements):
        torch.mul(q[r].reshape(-1, g, k // g).float(), scale[r].float().unsqueeze(-1),
                  out=out[r].view(-1, g, k // g))
    return out


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
