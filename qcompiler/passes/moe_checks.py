"""Which passes a mixture-of-experts model's graph computes faithfully, decided from config.json before any work.

`check_expert_passes(passes, config, exclude)` raises QCError (one line, before any work) on a MoE model for a
pass in STATISTICS_PASSES, and for a scheme that would quantize an expert Linear weight-only or with static
(calibrated) activation ranges (why: ir/moe.py, Limits). Dense models pass unchecked.
"""
from ..errors import QCError
from ..ir.moe import EXPERT_LINEAR, is_moe_layer
from .group_size import first_claim, model_linear_shapes

#: passes that gather statistics from (or transform) Linears through their calibration inputs: on a MoE model the
#: dense dispatch gives every expert every token, and smoothing the post-attention norm would also have to scale
#: the router, so these are refused for MoE models (ir/moe.py docstring, Limits)
STATISTICS_PASSES = ("smooth", "awq", "gptq", "sparse", "fallback")


def check_expert_passes(passes, config: dict, exclude=()) -> None:
    """QCError (before any work) for what a MoE model's graph cannot compute faithfully: a STATISTICS_PASSES pass,
    or a scheme with static (calibrated) activation ranges claiming an expert Linear."""
    if not any(is_moe_layer(config, i) for i in range(int(config["num_hidden_layers"]))):
        return
    for p in passes:
        if p.name in STATISTICS_PASSES:
            raise QCError(f"pass {p.name} is not supported on mixture-of-experts models ({config.get('model_type')}): "
                          "its statistics would see every token at every expert and the router is not adjusted; "
                          "supported there: w8a8d, w4a8d on experts (dynamic activations), any scheme on attention, kv8")
    for name in model_linear_shapes(config):
        owner = first_claim(passes, name, exclude)
        if owner is None or EXPERT_LINEAR.search(name) is None:
            continue
        act = owner.spec(0).activation
        if act is None:
            raise QCError(f"pass {owner.name} would quantize expert Linear {name} weight-only ({owner.quant_type}): "
                          "no engine loads a weight-only fused-MoE layout qcompile writes (vLLM-Ascend's W4A16 MoE "
                          "method reads LLM-Compressor's weight_packed layout: backends/ascend/engines.py); use w8a8d "
                          f"or w4a8d on experts (e.g. --passes '{owner.name}:match=self_attn,w4a8d')")
        if not act.dynamic:
            raise QCError(f"pass {owner.name} would quantize expert Linear {name} with static (calibrated) activation "
                          "ranges, which qcompile does not calibrate per expert yet; use w8a8d or w4a8d on experts "
                          f"(e.g. --passes '{owner.name}:match=self_attn,w8a8d')")
