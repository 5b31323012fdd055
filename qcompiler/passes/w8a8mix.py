"""w8a8mix: prefill-dynamic / decode-static W8A8 ("PD-mix", the artifact's "W8A8_MIX" type).

The artifact holds both sets of parameters: the static W8A8 tensors (input_scale / input_offset from
min-max calibration, deq_scale, quant_bias) and the per-channel weight_scale / weight_offset the per-token
path needs. The engine runs per-token dynamic activations on prefill instances and the static path on
decode instances. The executable graph runs the STATIC path (`qc.quantize` + `qc.quant_matmul`, exactly
the decode kernels), so `qcompile eval` measures what decode instances compute; the prefill path's
numerics are those of the w8a8d pass on the same weights.
Weight int8 per-channel symmetric (or `meta.WEIGHT_QPARAMS` from gptq/awq); activation int8 per-tensor
asymmetric, shared by Linears reading one input (q/k/v, gate/up), as in w8a8.
Options: match (regex on the full HF Linear name), act_observer=minmax|percentile|entropy|histogram (+ percentile=P),
weight_observer=minmax|mse (passes/scheme.py).
Requires: captured. Produces: annotated.
"""
from ..ir.qspec import LinearQuantSpec, PerTensor, TensorQuant
from .registry import register
from .scheme import SchemePass, StaticSchemeOptions, weight_quant


@register
class W8A8Mix(SchemePass):
    name = "w8a8mix"
    summary = "W8A8_MIX: int8 per-channel weights, static (decode) + per-token (prefill) activations; runs static"
    quant_type = "W8A8_MIX"
    Options = StaticSchemeOptions

    def spec(self, group_size=0):
        return LinearQuantSpec(quant_type="W8A8_MIX", weight=weight_quant(8),
                               activation=TensorQuant(8, symmetric=False, granularity=PerTensor()),
                               pass_name=self.name)
