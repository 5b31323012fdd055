"""w8a8: static W8A8 (the artifact's "W8A8" type).

Weight int8 per-channel symmetric; activation int8 per-tensor asymmetric with a static scale and offset
from calibration (min-max). Linears that read one input (q/k/v, gate/up) share one activation scale
and offset: the observer sits on their shared input edge, so they see the same statistics by
construction. lm_head and the embedding stay float (they are not in decoder-layer graphs).
Options: match (regex on the full HF Linear name; default every Linear not claimed by an earlier scheme),
act_observer=minmax|percentile|entropy|histogram (+ percentile=P), weight_observer=minmax|mse (passes/scheme.py).
Requires: captured. Produces: annotated. Limits: with the default min-max range, outliers in down_proj's
input hurt (`--exclude 'mlp\\.down_proj'`, a weight-only scheme on it, act_observer=percentile|entropy,
or the smoothing pass help).
"""
from ..ir.qspec import LinearQuantSpec, PerTensor, TensorQuant
from .registry import register
from .scheme import SchemePass, StaticSchemeOptions, weight_quant


@register
class W8A8(SchemePass):
    name = "w8a8"
    summary = "static W8A8: int8 per-channel weights, int8 per-tensor asymmetric activations (act_observer=)"
    quant_type = "W8A8"
    Options = StaticSchemeOptions

    def spec(self, group_size=0):
        return LinearQuantSpec(quant_type="W8A8", weight=weight_quant(8),
                               activation=TensorQuant(8, symmetric=False, granularity=PerTensor()),
                               pass_name=self.name)
