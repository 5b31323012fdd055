"""fa3: FA3 attention quantization (the artifact's "FAQuant"): per-head symmetric int8 Q, K and V.

Finds the layer's attention node by pattern (`attention_quant.match_attention`; a non-matching layer is a
QCError naming it) and inserts on its query, key and value inputs (Q and K after RoPE)

    codes = qc.fa_quant(x, scale)              clamp(round(x / scale[h]), -128, 127), int8
    x'    = qc.fa_dequant(codes, scale, dtype) codes * scale[h]

with one symmetric scale per head h, `scale = absmax / 127` of that head over the layer's calibration
data, rounded to the model dtype (MindIE holds the FA scales in it: atb_llm/utils/weights.py). On the NPU the attention kernel consumes the int8 Q/K/V and applies the scales inside; here the
dequantized values feed the float attention, which is the same math up to the kernel's accumulation.

Artifact (spec "Attention (FA3) quant"): `<attn>.fa_q.scale` [num_heads, 1], `<attn>.fa_k.scale` and
`<attn>.fa_v.scale` [num_kv_heads, 1] float32, matching `.offset` int8 zeros, typed "FAQuant"; top-level
`fa_quant_type` = "FAQuant". Targets: ascend910b (MindIE, with W8A8 for LLaMA-class models per the spec).
Requires: annotated (after smooth/awq/gptq and the scheme pass). Produces: fa_quantized.
Cost: no forward of its own: like kv8, its absmax observers ride the calibrate pass's calibration forward,
which applies the rewrite above before anything after the attention runs (calibration/forward.py).
Limits: static per-head scales; combined with kv8 the key/value edges carry both rewrites (in pipeline
order), which the spec neither describes nor forbids.
"""
import torch

from ..ir import qc_ops  # noqa: F401  defines torch.ops.qc.fa_quant / fa_dequant (kernels: the backend)
from ..calibration.forward import PendingRewrite
from .attention_quant import K, Q, V, absmax_of, match_attention, observe_absmax, replace_with_qdq, scale_from_absmax
from .base import Pass, PassResult
from .properties import ANNOTATED, FA_QUANTIZED, LOWERED
from .registry import register

FAQUANT = "FAQuant"


@register
class FA3(Pass):
    name = "fa3"
    summary = "FAQuant: per-head symmetric int8 Q, K, V before attention, calibrated (absmax/127)"
    requires = frozenset({ANNOTATED})
    produces = frozenset({FA_QUANTIZED})
    forbids = frozenset({LOWERED})
    quant_type = FAQUANT

    def run(self, gm, ctx):
        site = match_attention(gm, ctx, self.name)
        observers = observe_absmax(gm, self.name, site.node, {Q: (1,), K: (1,), V: (1,)})

        def finish(gm, ctx) -> dict:  # in the calibration forward, once Q, K and V have seen every sequence
            amax = absmax_of(gm, ctx, observers)
            stats = {}
            for index, short, heads in ((Q, "q", site.heads), (K, "k", site.kv_heads), (V, "v", site.kv_heads)):
                scale = scale_from_absmax(amax[index], ctx.dtype).reshape(heads, 1).contiguous()
                name = f"{site.prefix}.fa_{short}"
                replace_with_qdq(gm, observers[index], f"{name}.scale", scale, torch.ops.qc.fa_quant.default,
                                 torch.ops.qc.fa_dequant.default, site.dtype)
                ctx.extra_tensors[f"{name}.scale"] = (scale, FAQUANT)
                ctx.extra_tensors[f"{name}.offset"] = (torch.zeros(heads, 1, dtype=torch.int8), FAQUANT)
                stats[f"{short}_absmax"] = round(float(amax[index].max()), 4)
            ctx.description["fa_quant_type"] = FAQUANT
            gm.recompile()
            return stats

        ctx.defer(PendingRewrite(self.name, list(observers.values()), finish))
        return PassResult(gm, modified=True)
