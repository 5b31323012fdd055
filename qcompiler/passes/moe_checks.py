"""Which passes a mixture-of-experts model's graph computes faithfully, decided from config.json before any work.

`check_expert_passes(passes, config, exclude)` raises QCError (one line, before any work) on a MoE model for a
pass in STATISTICS_PASSES, and for a scheme that would quantize an expert Linear with static (calibrated)
activation ranges, weight-only other than per-group W4A16 (why: ir/moe.py, Limits). Dense models pass unchecked.
"""
from ..errors import QCError
from ..ir.moe import EXPERT_LINEAR, is_moe_layer
from .group_size import first_claim, model_linear_shapes

#: passes that gather statistics from (or transform) Linears through their calibration inputs without routing them
#: per expert: on a MoE model the dense dispatch gives every expert every token, and smoothing the post-attention
#: norm would also have to scale the router, so these are refused for MoE models (ir/moe.py docstring, Limits; gptq
#: routes its statistics per expert)
STATISTICS_PASSES = ("smooth", "awq", "sparse")


def check_expert_passes(passes, config: dict, exclude=()) -> None:
    """QCError (before any work) for what a MoE model's graph cannot compute faithfully: a STATISTICS_PASSES pass,
    or a scheme with static (calibrated) activation ranges claiming an expert Linear."""
    if not any(is_moe_layer(config, i) for i in range(int(config["num_hidden_layers"]))):
        return
    for p in passes:
        if p.name in STATISTICS_PASSES:
            raise QCError(f"pass {p.name} is not supported on mixture-of-experts models ({config.get('model_type')}): "
                          "its statistics would see every token at every expert and the router is not adjusted; "
                          "supported there: w8a8d, w4a8d, w4a16 on experts, gptq (per-expert routed tokens), "
                          "fallback, any scheme on attention, kv8")
    for name in model_linear_shapes(config):
        owner = first_claim(passes, name, exclude)
        if owner is None or EXPERT_LINEAR.search(name) is None:
            continue
        act = owner.spec(0).activation
        if act is None and owner.quant_type != "W4A16":
            raise QCError(f"pass {owner.name} would quantize expert Linear {name} weight-only ({owner.quant_type}): "
                          "no engine registers a fused-MoE method for it (vLLM-Ascend 0.23.0 methods: W8A8_DYNAMIC, "
                          "W4A8_DYNAMIC, W4A16, W8A8_MIX MoE; backends/ascend/engines.py); use w8a8d, w4a8d or w4a16 "
                          f"on experts (e.g. --passes '{owner.name}:match=self_attn,w4a16')")
        if act is None:
            if getattr(owner.options, "group", None) == 0:
                raise QCError(f"pass {owner.name} would quantize expert Linear {name} with W4A16 per-channel "
                              "(group=0): vLLM-Ascend's W4A16 fused-MoE method is per-group only (it divides by the "
                              "description's group_size: methods/w4a16.py get_dynamic_quant_param); use group=32, 64 "
                              "or 128 on experts")
            continue
        if not act.dynamic:
            raise QCError(f"pass {owner.name} would quantize expert Linear {name} with static (calibrated) activation "
                          "ranges, which qcompile does not calibrate per expert yet; use w8a8d or w4a8d on experts "
                          f"(e.g. --passes '{owner.name}:match=self_attn,w8a8d')")
