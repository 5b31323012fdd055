"""w4a8d: int4 weights with dynamic per-token int8 activations (the artifact's "W4A8_DYNAMIC" type).

Weight int4 per-channel symmetric (codes in [-7, 7], absmax / 7, or `meta.WEIGHT_QPARAMS` from gptq/awq),
packed along n: int8 [n/2, k], rows 2i / 2i+1 in the low / high nibble. The artifact also carries
`scale_bias` ([n, 1] for q/k/v/gate/up, [n, 16] for o_proj/down_proj, reproduced as the spec writes it);
the kernel math does not read it, so it is not a graph buffer. Activation int8 per-token symmetric at run
time. Lowered to `qc.dynamic_quant` (one per shared input) and `qc.quant_matmul_pertoken` with packing 2
(int4 along n).
Options: match (regex on the full HF Linear name).
Requires: captured. Produces: annotated.
Limits: MindIE only for dense Linears (vLLM-Ascend runs W4A8 for MoE only); n must be even and
o_proj/down_proj need k % 16 == 0 (scale_bias layout).
"""
from ..ir.qspec import LinearQuantSpec, PerToken, TensorQuant
from .registry import register
from .scheme import SchemePass, weight_quant


@register
class W4A8Dynamic(SchemePass):
    name = "w4a8d"
    summary = "W4A8_DYNAMIC: int4 per-channel weights (packed), int8 per-token activations at run time"
    quant_type = "W4A8_DYNAMIC"

    def spec(self, group_size=0):
        return LinearQuantSpec(quant_type="W4A8_DYNAMIC", weight=weight_quant(4),
                               activation=TensorQuant(8, symmetric=True, granularity=PerToken(), dynamic=True),
                               pass_name=self.name)
