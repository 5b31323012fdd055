"""w4a8d: int4 weights with dynamic per-token int8 activations (the artifact's "W4A8_DYNAMIC" type).

Written in msModelSlim's two-stage per-group form (description version 1.0.0, top-level `group_size`), the only form an
engine loads for a dense Linear (backends/ascend/engines.py): int4 codes in [-7, 7] per group of `group` input channels
against the per-group scale S = absmax_group / 7 rounded to the model dtype (a routed expert's then to float16 too,
which vLLM-Ascend's fused-MoE method casts it through: backends/ascend/encode.EXPERT_SCALE_ALSO; or the codes and scales
of gptq/awq), stored packed along n (int8 [n/2, k], rows 2i / 2i+1 in the low / high nibble) with S split into
`weight_scale` [n, 1] and `weight_scale_second` [n, k/group] whose product, as the engines form it, is S bit for bit
(`encode.split_two_stage_scale`), zero offsets, and `scale_bias` ([n, 1]; [n, 16] for o_proj/down_proj; artifact only).
Activations int8 per-token symmetric at run time. Lowered to `qc.dynamic_quant` (one per shared input) and
`qc.quant_matmul_pergroup` (MindIE's A8W4 math: exact integer group sums, float32 group order).
Options: match (regex on the full HF Linear name), group (32, msModelSlim's LLaMA-3.1 W4A8_DYNAMIC recipe
`--group_size 32`; or 64, 128, 256). The artifact has one group size (passes/group_size.py).
Requires: captured. Produces: annotated.
Limits: no per-channel form (group 0 loads in no engine); a Linear with a bias (qwen2 q/k/v) is refused before any
work (neither engine adds it: engines.py); n must be a multiple of 8 and o_proj/down_proj need k % 16 == 0.
vLLM-Ascend loads the artifact but runs it weight-only (activations not quantized).
"""
from dataclasses import dataclass

from ..ir.qspec import LinearQuantSpec, PerToken, TensorQuant
from .group_size import GROUP_SIZES
from .registry import register
from .scheme import SchemeOptions, SchemePass, weight_quant

#: msModelSlim's LLaMA-3.1-8B/70B-Instruct W4A8_DYNAMIC commands (example/Llama/README.md): --group_size 32
DEFAULT_GROUP = 32


@dataclass(frozen=True)
class W4A8Options(SchemeOptions):
    """group: weight group size along k, one of 32 (default, msModelSlim's LLaMA-3.1 W4A8_DYNAMIC recipe), 64, 128,
    256. Per-channel (0) is not offered: no engine loads a dense per-channel W4A8_DYNAMIC Linear."""
    group: int = DEFAULT_GROUP

    def __post_init__(self):
        super().__post_init__()
        allowed = [g for g in GROUP_SIZES if g]
        if isinstance(self.group, bool) or self.group not in allowed:
            why = (" (per-channel W4A8_DYNAMIC loads in no engine for a dense Linear: vLLM-Ascend's dense scheme "
                   "divides by group_size, MindIE's needs weight_scale_second)" if self.group == 0 else "")
            raise ValueError(f"group must be one of {', '.join(map(str, allowed))}, got {self.group!r}{why}")


@register
class W4A8Dynamic(SchemePass):
    name = "w4a8d"
    summary = "W4A8_DYNAMIC: int4 two-stage per-group weights (group=32), int8 per-token activations at run time"
    quant_type = "W4A8_DYNAMIC"
    Options = W4A8Options

    def spec(self, group_size=DEFAULT_GROUP):
        return LinearQuantSpec(quant_type="W4A8_DYNAMIC", weight=weight_quant(4, group_size),
                               activation=TensorQuant(8, symmetric=True, granularity=PerToken(), dynamic=True),
                               pass_name=self.name)
