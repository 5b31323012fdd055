"""w8a8d: W8A8 with dynamic per-token activations (the artifact's "W8A8_DYNAMIC" type).

Weight int8 per-channel symmetric (absmax / 127 rounded to the model dtype, in which both engines hold it and
against which the codes are computed; or the codes and scales an earlier gptq/awq pass left in
`meta.WEIGHT_QPARAMS`); the Linear's bias is rounded to the model dtype too (both engines hold it so); activation int8 per-token symmetric, computed at run time by the kernel
(`s_t = max|x_row| / 127`), so no calibration statistics are needed and the calibrate pass does nothing
for these Linears. Lowered to `qc.dynamic_quant` (one per shared input: q/k/v, gate/up) and
`qc.quant_matmul_pertoken` (npu_dynamic_quant + npu_quant_matmul with pertoken_scale).
Options: match (regex on the full HF Linear name).
Requires: captured. Produces: annotated.
Limits: per-token scales follow each token's outliers, which is what keeps Qwen's down_proj usable, but the
per-token quantize costs one extra pass over the activation on the device.
"""
from ..ir.qspec import LinearQuantSpec, PerToken, TensorQuant
from .registry import register
from .scheme import SchemePass, weight_quant


@register
class W8A8Dynamic(SchemePass):
    name = "w8a8d"
    summary = "W8A8_DYNAMIC: int8 per-channel weights, int8 per-token activations computed at run time"
    quant_type = "W8A8_DYNAMIC"

    def spec(self, group_size=0):
        return LinearQuantSpec(quant_type="W8A8_DYNAMIC", weight=weight_quant(8),
                               activation=TensorQuant(8, symmetric=True, granularity=PerToken(), dynamic=True),
                               pass_name=self.name)
