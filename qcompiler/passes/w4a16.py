"""w4a16: weight-only int4 (the artifact's "W4A16" type; MindIE only).

Weight int4 symmetric (codes in [-7, 7]), per-group along k (default) or per-channel (`group=0`), from
absmax or from `meta.WEIGHT_QPARAMS` (gptq/awq). Stored packed as the spec's version 1.0.0 says: per-group
two output rows per byte, int8 [n/2, k]; per-channel two input columns per byte, int8 [n, k/2] (a group equal
to k gives a per-channel [n, 1] scale and is packed and read as per-channel). Activations stay float; no
calibration statistics are needed. Lowered to `qc.weight_quant_matmul` with the packed weight.
Options: match (regex on the full HF Linear name), group (None = default: 128 when it divides every Linear
this pass quantizes, else 64 (SmolLM2-135M: hidden 576), else an error; 0 = per-channel; 32/64/128/256).
The artifact has one group size, decided from config.json before any work (passes/group_size.py).
Requires: captured. Produces: annotated.
"""
from ..ir.qspec import LinearQuantSpec
from .registry import register
from .scheme import GroupSchemeOptions, SchemePass, weight_quant


@register
class W4A16(SchemePass):
    name = "w4a16"
    summary = "W4A16: weight-only int4 per-group (group=, default 128 or 64) packed, float activations"
    quant_type = "W4A16"
    Options = GroupSchemeOptions

    def spec(self, group_size=0):
        return LinearQuantSpec(quant_type="W4A16", weight=weight_quant(4, group_size), activation=None,
                               pass_name=self.name)
