"""w8a16: weight-only int8 (the artifact's "W8A16" type).

Weight int8 symmetric, per-channel (default, `group=0`; both engines) or per-group along k (`group` in
32/64/128/256; MindIE only), from absmax or from `meta.WEIGHT_QPARAMS` (gptq/awq). Activations stay in the
model dtype; no calibration statistics are needed. Lowered to `qc.weight_quant_matmul`
(npu_weight_quant_batchmatmul: `x @ ((w + offset) * scale)^T`, offset stored as zeros).
Options: match (regex on the full HF Linear name), group (0 = per-channel; one group size per artifact:
it must divide every per-group Linear's k, checked before any work).
Requires: captured. Produces: annotated.
The scale is stored rounded to the model dtype (the engines hold it so and the NPU kernel applies it in it) and
the codes are computed against the rounded value, so bf16's 8-bit scale adds no systematic error.
"""
from dataclasses import dataclass

from ..ir.qspec import LinearQuantSpec
from .registry import register
from .scheme import GroupSchemeOptions, SchemePass, weight_quant


@dataclass(frozen=True)
class W8A16Options(GroupSchemeOptions):
    """group: 0 = per-channel (default); 32/64/128/256 = per-group along k."""
    group: int | None = 0


@register
class W8A16(SchemePass):
    name = "w8a16"
    summary = "W8A16: weight-only int8, per-channel or per-group (group=), float activations"
    quant_type = "W8A16"
    Options = W8A16Options

    def spec(self, group_size=0):
        return LinearQuantSpec(quant_type="W8A16", weight=weight_quant(8, group_size), activation=None,
                               pass_name=self.name)
