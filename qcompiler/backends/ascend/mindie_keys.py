"""config.json keys by which MindIE's atb loader types a mixture-of-experts model's Linears (one source of truth).

MindIE-LLM's atb loader (`examples/atb_models/atb_llm`; read at tags 3.0.0alpha1 65051dd1, 3.0.0.beta.1 5e896196,
3.0.0 de94ddb5 and master 0695772e, the same in all four) does not read a Linear's type from
quant_model_description.json: it reads every Linear with a type named in config.json, and the description only
tells it that a Linear (or one of a fused group) is FLOAT. For Qwen3-MoE and Qwen2-MoE (models/qwen3_moe/
router_qwen3_moe.py Qwen3moeRouter runs the qwen2_moe model code):
- attention q/k/v/o (models/qwen2/modeling_qwen2.py FlashQwenAttention.__init__, used by models/qwen2_moe/
  modeling_qwen2_moe.py FlashQwenLayer): config.json `attn_quantize` when present; else "w8a8" when "moe" is in
  model_type and `quantize` is "w8a8_dynamic" (msModelSlim's Qwen3-MoE mix, example/Qwen3-MOE/quant_qwen_moe_w8a8.py:
  attention static W8A8, MLP W8A8_DYNAMIC, `quantize` "w8a8_dynamic"); else `quantize`. The graph registers the
  attention weights by the same rule (models/qwen2_moe/flash_causal_qwen2_moe.py FlashQwen2moeForCausalLM.__init__).
- every other Linear (routed experts: utils/layers/linear/__init__.py TensorParallel{Column,Row}Linear.load_moe;
  the shared expert and dense-layer MLPs: utils/layers/__init__.py load_column_multi): `quantize`, which is
  config.json's key, or when absent the description's model_quant_type lowercased (models/base/router.py
  BaseRouter.config; "w8a8_mix" becomes "w8a8_pdmix" there, for `quantize` only).
- a FLOAT Linear is read as float under any key (utils/weights.py get_multi_weights_col / _row return a float
  weight as it is; utils/data/weight_wrapper.py register_linear_wrapper registers it by dtype).
- its Qwen MoE layer accepts no W4A8_DYNAMIC attention or experts: FlashQwenLayer.__init__ raises AssertionError
  ("self_attn.pack_type ... not supported", "mlp.pack_type ... not supported") for PackType.ALL_W4A8, which is not
  in its norm lists (utils/quantize/pack_type.py calc_w4a8_linear_pack_type gives it).
So without keys of ours, a W8A8_DYNAMIC attention of a MoE artifact would be read as static W8A8 (missing
deq_scale), and any attention type other than `quantize`'s with it. `moe_config_keys` gives the keys that make atb
read each Linear with its own type, or says why no keys can.

vLLM-Ascend reads each Linear's type from the description; of these keys it reads only `quantize` (after
`moe_quantize`) as the routed experts' type (v0.23.0 ascend_forward_context.py select_moe_comm_method, master
ascend_config.py), which is what `quantize` says here, and never `attn_quantize`. MindIE's torch backend reads
`quantize` only to detect W8A8SC (mindie_llm/runtime/utils/loader/default_model_loader.py).
"""
from __future__ import annotations

import re
from typing import Mapping

# the description's type strings (encode.py; literal here so that this module, like engines.py, imports no torch)
FLOAT, W4A8_DYNAMIC, W8A8_MIX = "FLOAT", "W4A8_DYNAMIC", "W8A8_MIX"
#: attention Linears atb reads with `attn_quantize` (names without ".weight")
ATTENTION_LINEAR = re.compile(r"(?:^|\.)self_attn\.[qkvo]_proj$")


def is_moe(linear_types: Mapping[str, str]) -> bool:
    """Whether the Linears {name (no ".weight"): quant type} include routed experts (ir/moe.py EXPERT_LINEAR)."""
    from ...ir.moe import EXPERT_LINEAR
    return any(EXPERT_LINEAR.search(n) for n in linear_types)


def _atb_name(quant_type: str) -> str:
    # the QuantType value atb's loader branches on (utils/quantize/quant_type.py); W8A8_MIX is read as "w8a8_pdmix"
    # (its "w8a8_mix" matches no branch of get_multi_weights_col, which would read the int8 weight as float)
    return "w8a8_pdmix" if quant_type == W8A8_MIX else quant_type.lower()


def moe_config_keys(linear_types: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """({"quantize": ..., "attn_quantize": ...}, problems) for a MoE artifact's Linears {name (no ".weight"): quant
    type}: `quantize` the one quantized type of the non-attention Linears (else of the attention ones), left out when
    nothing is quantized; `attn_quantize` the one quantized type of the attention Linears, left out when they are all
    FLOAT. `problems`: why atb cannot read each Linear with its own type ([] = it can): more than one quantized type
    under one key, or a W4A8_DYNAMIC attention. Where there are problems the keys are still a deterministic choice
    (the first type by name), for the engines that do not use them."""
    attn = sorted({t for n, t in linear_types.items() if t != FLOAT and ATTENTION_LINEAR.search(n)})
    rest = sorted({t for n, t in linear_types.items() if t != FLOAT and not ATTENTION_LINEAR.search(n)})
    problems = []
    if len(attn) > 1:
        problems.append(f"attention Linears of types {', '.join(attn)}: MindIE's atb loader reads them all with "
                        f"config.json's one attn_quantize")
    if len(rest) > 1:
        problems.append(f"MLP / expert Linears of types {', '.join(rest)}: MindIE's atb loader reads them all with "
                        f"config.json's one quantize")
    if W4A8_DYNAMIC in attn:
        problems.append("W4A8_DYNAMIC attention: MindIE's Qwen MoE layer (models/qwen2_moe/modeling_qwen2_moe.py "
                        "FlashQwenLayer.__init__) raises AssertionError for its pack type ALL_W4A8")
    keys = {}
    if rest or attn:
        keys["quantize"] = (rest or attn)[0].lower()
    if attn:
        keys["attn_quantize"] = _atb_name(attn[0])
    return keys, problems
