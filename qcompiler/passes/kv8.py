"""kv8: int8 KV cache (the artifact's "C8"), as a rewrite of the layer graph's attention node.

The attention node is found by pattern on the captured graph (`attention_quant.match_attention`: one
`scaled_dot_product_attention` whose key/value inputs are computed from `*k_proj` / `*v_proj`); a layer
whose attention does not match is a QCError naming the layer. On the key input (K after RoPE) and the
value input of that node only, it inserts

    codes = qc.kv_quant(x, scale)              clamp(round(x / scale[c]), -128, 127), int8
    x'    = qc.kv_dequant(codes, scale, dtype) codes * scale[c]

with one symmetric scale per channel c of the k/v projection output ([num_kv_heads * head_dim], channel
c = head * head_dim + d), `scale = absmax / 127` over the layer's calibration data (all tokens of all
sequences; the inputs are the outputs of the already-quantized layers before), rounded to the model dtype
(both engines hold the C8 scales in it, so the graph quantizes with the value the NPU uses). This is the engines' math
(spec "KV cache int8"): the cache holds `codes`, attention reads `codes * scale`. The decode program
(ir/decode.py) stores `codes` in an int8 cache.

Artifact: `<attn>.k_proj.kv_cache_scale`, `.kv_cache_offset` (float32 zeros: symmetric, the only safe
offset) and the same for v_proj, typed "C8"; top-level `kv_cache_type` = `kv_quant_type` = "C8".
Requires: annotated (it runs after smooth/awq/gptq and the scheme pass, which change k/v; so K/V are
calibrated on the graph as it will be lowered, Linears still float). Produces: kv_quantized.
Cost: no forward of its own. The pass places absmax observers on K and V and queues the rewrite above
(`ctx.defer`); the calibrate pass's one calibration forward feeds them and applies it before anything after
the attention runs (calibration/forward.py), so the o_proj observer sees the int8 cache's values.
Limits: static per-channel scales (no per-token or per-head KV scales); K/V are calibrated with float
Linears (the layer's own weight quantization is not applied to them during calibration).
"""
import torch

from ..ir import qc_ops  # noqa: F401  defines torch.ops.qc.kv_quant / kv_dequant (kernels: the backend)
from ..calibration.forward import PendingRewrite
from .attention_quant import K, V, absmax_of, match_attention, observe_absmax, replace_with_qdq, scale_from_absmax
from .base import Pass, PassResult
from .properties import ANNOTATED, KV_QUANTIZED, LOWERED
from .registry import register

C8 = "C8"


@register
class KV8(Pass):
    name = "kv8"
    summary = "C8: int8 KV cache, per-channel symmetric K (after RoPE) and V, calibrated (absmax/127)"
    requires = frozenset({ANNOTATED})
    produces = frozenset({KV_QUANTIZED})
    forbids = frozenset({LOWERED})
    quant_type = C8

    def run(self, gm, ctx):
        site = match_attention(gm, ctx, self.name)
        # per channel of [B, KVH, L, D]: keep the head and head_dim axes
        observers = observe_absmax(gm, self.name, site.node, {K: (1, 3), V: (1, 3)})

        def finish(gm, ctx) -> dict:  # in the calibration forward, once K and V have seen every sequence
            amax = absmax_of(gm, ctx, observers)
            stats = {}
            for index, proj in ((K, "k_proj"), (V, "v_proj")):
                scale = scale_from_absmax(amax[index], ctx.dtype).reshape(site.kv_heads * site.head_dim).contiguous()
                name = f"{site.prefix}.{proj}"
                replace_with_qdq(gm, observers[index], f"{name}.kv_cache_scale", scale,
                                 torch.ops.qc.kv_quant.default, torch.ops.qc.kv_dequant.default, site.dtype)
                ctx.extra_tensors[f"{name}.kv_cache_scale"] = (scale, C8)
                ctx.extra_tensors[f"{name}.kv_cache_offset"] = (torch.zeros_like(scale), C8)
                stats[f"{proj}_absmax"] = round(float(amax[index].max()), 4)
            ctx.description["kv_cache_type"] = C8
            ctx.description["kv_quant_type"] = C8
            gm.recompile()
            return stats

        ctx.defer(PendingRewrite(self.name, list(observers.values()), finish))
        return PassResult(gm, modified=True)
