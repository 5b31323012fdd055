"""Which inference engines load an Ascend artifact: the engine support matrix (one source of truth).

Every fact below was read in the engines' own code (file + function in `source`) and, for vLLM-Ascend, checked
by running its loader on CPU (`../shared/tools/loader_check`, pinned releases 0.23.0 and 0.26.0rc1; the e2e
tests run it on every artifact they compile). MindIE means MindIE-LLM's atb_models loader
(`examples/atb_models/atb_llm`, read at MindIE-LLM 3.0.0 de94ddb5 and master 0695772e; the seed's MindIE Qwen
README is that repository's examples/atb_models/examples/models/qwen/README.md at 40fb0630, tag 3.0.0alpha1), run
with the service's ModelConfig `backendType` "atb" (mindie_llm/text_generator/adapter get_generator_backend). Its
newer torch runtime (`backendType` "torch", `mindie_llm/runtime/layers/quantization/ms_model_slim`) registers
fewer types (dense: W8A8, W8A8_DYNAMIC, W8A8_MIX, W8A8SC; MoE from 3.0.0.beta.1: W8A8_DYNAMIC and a
per-channel-only W4A8_DYNAMIC) and is not what this matrix describes, except in a note where it would load an
artifact of ours and silently compute something else (W4A8_DYNAMIC MoE). For MoE models the atb loader reads each
Linear's type from config.json keys, which the artifact writer sets (mindie_keys.py).

A *feature* is one way an artifact uses a quant type (`W4A8_DYNAMIC per-group`, `C8`, ...); a `Support` per
(feature, engine) says on which devices the engine loads it and computes what the executable graph computes.
- `ArtifactFeatures` describes an artifact: from a compile pipeline before any work (`engine_check.py` in the
  driver) or from a finished OUT folder (`features_of_artifact`).
- `refusals(engine, features)`: why an engine cannot load it ([] = it loads); `engines_loading(features)`.
- `matrix_markdown()`: the README table (a test keeps README.md equal to it).
- `expected_loader_exit(features, version)`: what `loader_check/vllm_ascend_load.py --engine VERSION` must
  return for the artifact: 0 (loads) or 3 (an engine limit listed here, or a release that loads the artifact
  only through a worker patch, which that tool does not apply: `Support.patched`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

VLLM_ASCEND = "vllm-ascend"
MINDIE = "mindie"
ENGINES = (VLLM_ASCEND, MINDIE)
ENGINE_CHOICES = ("any",) + ENGINES
ENGINE_NAMES = {VLLM_ASCEND: "vLLM-Ascend", MINDIE: "MindIE"}
DEVICES = ("910b", "310p")          # Atlas 800I A2 (--target ascend910b / onnx), Atlas 300I Duo (ascend310p)
BOTH = frozenset(DEVICES)
#: vLLM-Ascend releases the loader check pins, oldest first (`loader_check/vllm_ascend_load.py` ENGINES)
VLLM_ASCEND_VERSIONS = ("0.23.0", "0.26.0rc1")

_VA = "vllm-ascend 0.23.0/0.26.0rc1 vllm_ascend/quantization/"
_MI = "MindIE-LLM examples/atb_models/atb_llm/"
_VLLM = "vLLM vllm/model_executor/models/"   # vLLM-Ascend runs vLLM's model classes for llama / qwen2 / qwen3(_moe)
_ATB = "MindIE-LLM examples/atb_models/atb_framework/"
#: feature keys of config.json's MLP activation (hidden_act; transformers ACT2FN: "silu" and "swish" are both SiLU)
HIDDEN_ACT_SWISH = "hidden_act swish (config.json)"
HIDDEN_ACT_OTHER = "hidden_act other than silu (config.json)"
MOE_MINDIE_KEYS = "MoE Linear types beyond MindIE's config keys"


@dataclass(frozen=True)
class Support:
    """An engine's support of one feature: the devices it loads it on (empty: none), devices where that is not
    confirmed (allowed with a warning: the spec's "unsure" 310P types), a one-line note, the code it was read in,
    and (vLLM-Ascend) the first pinned release that loads it for llama / qwen2 when older pins do not (`since`).
    `patched`: model types the older pins already load through one of vLLM-Ascend's worker patches
    (vllm_ascend/patch/worker/*, imported by NPUWorker.__init__ -> vllm_ascend/utils.py adapt_patch), with
    `patch_note` the note for them. ../shared/tools/loader_check does not apply those patches (its README, "What
    runs for real, what is stubbed"), so for such a model and pin it reports "UNSUPPORTED BY ENGINE" (exit 3)
    although the engine loads the artifact: `expected_loader_exit` says 3 there, `refusals` says it loads."""
    devices: frozenset = BOTH
    note: str = ""
    source: str = ""
    since: str | None = None
    unsure: frozenset = frozenset()
    patched: frozenset = frozenset()
    patch_note: str = ""
    tp: object = None      # (ArtifactFeatures) -> the tensor-parallel sizes it loads at, as a note (or None)

    @property
    def loads(self) -> bool:
        return bool(self.devices)


NO = frozenset()
A2 = frozenset({"910b"})
P310 = frozenset({"310p"})

#: tensor-parallel sizes the MoE notes consider (Ascend servers hold 8 or 16 NPUs; msModelSlim's SUPPORT_TP_SIZES)
TP_SIZES = (1, 2, 4, 8, 16)
#: vLLM-Ascend's W4A16 fused-MoE method packs 8 int4 per int32 along the partition
#: (AscendW4A16FusedMoEMethod.pack_factor)
_W4A16_PACK = 8


def w4a16_moe_tp_sizes(moe_intermediate_size: int, group_size: int) -> list[int]:
    """The TP_SIZES at which vLLM-Ascend builds its W4A16 fused-MoE method for experts of `moe_intermediate_size`
    quantized with `group_size`: the experts' partition is moe_intermediate_size // tp (vLLM fused_moe/layer.py
    FusedMoE.__init__; 1 under --enable-expert-parallel, FusedMoEParallelConfig.make), and the method asserts it is a
    multiple of group_size and of the pack factor 8 (methods/w4a16.py AscendW4A16FusedMoEMethod.get_weight /
    get_dynamic_quant_param: "Expecting `intermediate_size_per_partition` .. can be divided by `group_size`")."""
    return [t for t in TP_SIZES if moe_intermediate_size % t == 0 and (moe_intermediate_size // t) % group_size == 0
            and (moe_intermediate_size // t) % _W4A16_PACK == 0]


def _tp_list(sizes) -> str:
    return ", ".join(map(str, sizes)) if sizes else "none"


def w4a16_moe_tp_note(f) -> str | None:
    """The W4A16 MoE note with this artifact's numbers: the tp sizes that build, and the largest smaller group size
    that builds at more of them (None when the sizes are not known)."""
    inter, group = f.moe_intermediate_size, f.moe_group_size
    if not inter or not group:
        return None
    sizes = w4a16_moe_tp_sizes(inter, group)
    note = (f"group_size {group} with moe_intermediate_size {inter}: its fused-MoE method builds at tensor "
            f"parallel {_tp_list(sizes)} only (of {_tp_list(TP_SIZES)}; moe_intermediate_size / tp must be a multiple "
            f"of group_size; --enable-expert-parallel does not split the experts: any tp)")
    wider = [(g, w4a16_moe_tp_sizes(inter, g)) for g in (128, 64, 32) if g < group]
    wider = [(g, s) for g, s in wider if len(s) > len(sizes)]
    if wider:
        g, s = wider[0]
        note += f"; group={g} builds at tensor parallel {_tp_list(s)}"
    return note


@dataclass(frozen=True)
class Feature:
    key: str          # what ArtifactFeatures.keys() yields
    scheme: str       # README: the compiler pass (or "-" when the compiler does not produce it)
    layer: str        # "dense" | "MoE" | "dense, MoE" (config.json facts such as hidden_act)
    support: dict     # engine -> Support


FEATURES = (
    Feature("W8A8", "`w8a8`", "dense", {
        VLLM_ASCEND: Support(BOTH, "", _VA + "methods/w8a8_static.py AscendW8A8LinearMethod; "
                             "vllm_ascend/_310p/quantization/methods/w8a8_static.py"),
        MINDIE: Support(BOTH, "", _MI + "utils/layers/linear/__init__.py get_linear (W8A8 -> W8A8LinearStatic); "
                        "utils/weights.py get_multi_weights_col")}),
    Feature("W8A8_DYNAMIC", "`w8a8d`", "dense", {
        VLLM_ASCEND: Support(BOTH, "", _VA + "methods/w8a8_dynamic.py AscendW8A8DynamicLinearMethod; _310p/.../"
                             "w8a8_dynamic.py"),
        MINDIE: Support(A2, "", _MI + "utils/layers/linear/__init__.py get_linear (W8A8LinearDynamic)",
                        unsure=P310)}),
    Feature("W8A8_MIX", "`w8a8mix`", "dense", {
        VLLM_ASCEND: Support(A2, "runs the per-token path except on a PD-disaggregated decode "
                             "instance (kv consumer), which runs the static path the executable graph runs",
                             _VA + "methods/w8a8_pdmix.py AscendW8A8PDMixLinearMethod.apply"),
        MINDIE: Support(A2, "", _MI + "utils/layers/linear/__init__.py get_linear (W8A8PDMixLinear)",
                        unsure=P310)}),
    Feature("W8A16", "`w8a16`", "dense", {
        VLLM_ASCEND: Support(A2, "per-channel only; no 310P scheme",
                             _VA + "methods/w8a16.py AscendW8A16LinearMethod.get_perchannel_param ([n, 1])"),
        MINDIE: Support(BOTH, "", _MI + "utils/layers/linear/__init__.py get_linear (W8A16LinearStatic)")}),
    Feature("W8A16 per-group", "`w8a16:group=G`", "dense", {
        VLLM_ASCEND: Support(NO, "its weight_scale parameter is [n, 1] (shape mismatch on load)",
                             _VA + "methods/w8a16.py get_perchannel_param"),
        MINDIE: Support(A2, "", _MI + "utils/weights.py get_multi_weights_col (W8A16 branch)", unsure=P310)}),
    Feature("W4A16", "`w4a16`", "dense", {
        VLLM_ASCEND: Support(NO, "registered for MoE experts only", _VA + 'methods/w4a16.py register_scheme('
                             '"W4A16", "moe")'),
        MINDIE: Support(A2, "", _MI + "utils/layers/linear/__init__.py get_linear (W4A16LinearStatic)",
                        unsure=P310)}),
    Feature("W4A8_DYNAMIC per-group", "`w4a8d` (group 32)", "dense", {
        VLLM_ASCEND: Support(A2, "loads; runs it weight-only (activations not quantized: "
                             "W4A16 math with weight_scale * weight_scale_second); deprecated in 0.26.0rc1",
                             _VA + "methods/w4a8.py AscendW4A8DynamicLinearMethod.get_pergroup_param / apply"),
        MINDIE: Support(A2, "int8 per-token x int4 per-group (aclnnQuantMatmulV5), the math of the executable "
                        "graph", _MI + "utils/quantize/w4a8.py W4A8LinearDynamic; utils/weights.py "
                        "get_multi_weights_col / get_multi_weights_row (W4A8_DYNAMIC branch)", unsure=P310)}),
    Feature("W4A8_DYNAMIC per-channel", "-", "dense", {
        VLLM_ASCEND: Support(NO, "the dense scheme is per-group only (divides by group_size, needs "
                             "weight_scale_second)", _VA + "methods/w4a8.py AscendW4A8DynamicLinearMethod."
                             "get_pergroup_param"),
        MINDIE: Support(NO, "with group_size 0 the dense Linear multiplies weight_scale by a missing "
                        "weight_scale_second", _MI + "utils/quantize/w4a8.py W4A8LinearDynamic.__init__")}),
    Feature("W4A8_DYNAMIC Linear bias", "-", "dense", {
        VLLM_ASCEND: Support(NO, "the Linear's bias is never added (apply ignores `bias`)",
                             _VA + "methods/w4a8.py AscendW4A8DynamicLinearMethod.apply"),
        MINDIE: Support(NO, "the Linear's bias is replaced by scale_bias (`qweight, scale, scale_second, bias = "
                        "weight`)", _MI + "utils/layers/linear/__init__.py get_linear (W4A8_DYNAMIC branch)")}),
    Feature("W8A8S", "`sparse,w8a8s` (ascend310p)", "dense", {
        VLLM_ASCEND: Support(P310, "310P only", "vllm_ascend/_310p/quantization/methods/w8a8s.py "
                             "AscendW8A8SLinearMethod310; w8a8_base.py get_perchannel_param"),
        MINDIE: Support(P310, "", _MI + "utils/layers/linear/__init__.py get_linear "
                        "([W8A8, W8A8S] -> W8A8LinearStatic)")}),
    Feature("W16A16S", "`sparse,w16a16s`", "dense", {
        VLLM_ASCEND: Support(NO, "no W16A16S scheme is registered", _VA + "methods (register_scheme: no W16A16S)"),
        MINDIE: Support(A2, "a FastLinear on the pruned float weight", _MI + "utils/layers/linear/__init__.py "
                        "get_linear (W16A16S -> FastLinear)", unsure=P310)}),
    Feature("C8", "`kv8`", "dense", {
        VLLM_ASCEND: Support(A2, "0.23.0 maps the scales only for qwen3 / glm4_moe / minimax_m2 "
                             "(patch/worker/patch_gqa_c8.py); llama/qwen2 need 0.26.0rc1 (its quant config's "
                             "get_cache_scale_mapper)", _VA + "methods/kv_c8.py "
                             "AscendC8KVCacheAttentionMethod; modelslim_config.py get_cache_scale_mapper",
                             since="0.26.0rc1", patched=frozenset({"qwen3"}),
                             patch_note="on qwen3 also 0.23.0 loads the scales: its worker patch "
                             "patch/worker/patch_gqa_c8.py re-binds Qwen3ForCausalLM.load_weights to route "
                             "{k,v}_proj.kv_cache_{scale,offset} to attn.{k,v}_cache_{scale,offset} "
                             "(quantization/modelslim_config.py AscendModelSlimConfig.get_cache_scale); "
                             "../shared/tools/loader_check --engine 0.23.0 reports them UNSUPPORTED BY ENGINE "
                             "because it does not apply vllm_ascend/patch/* (its README), not because the engine "
                             "cannot load them"),
        MINDIE: Support(A2, "", _MI + "utils/layers/attention/kv_cache.py KvCache.load", unsure=P310)}),
    Feature("FAQuant", "`fa3`", "dense", {
        VLLM_ASCEND: Support(NO, 'no "FAQuant" attention scheme (registers "FAKQuant" / "INT8_DYNAMIC", MLA)',
                             _VA + "methods/kv_c8.py register_scheme"),
        MINDIE: Support(A2, "", _MI + "models/base/modeling.py (FA3.load); utils/layers/attention/fa3.py FA3",
                        unsure=P310)}),
    # MoE experts (Qwen3-MoE / Qwen2-MoE routed experts, ir/moe.py; one scheme per layer's experts); "-" = not read.
    Feature("W8A8_DYNAMIC MoE", "`w8a8d`", "MoE", {
        VLLM_ASCEND: Support(BOTH, "", _VA + "methods/w8a8_dynamic.py AscendW8A8DynamicFusedMoEMethod"),
        MINDIE: Support(A2, "", _MI + "utils/layers/linear/__init__.py TensorParallelColumnLinear.load_moe / "
                        "TensorParallelRowLinear.load_moe (W8A8LinearDynamic on the expert stack); torch backend: "
                        "mindie_llm/runtime/layers/quantization/ms_model_slim/quantization_config.py "
                        "(W8A8PerTokenFusedMoEMethod)", unsure=P310)}),
    Feature("W8A8_MIX MoE", "-", "MoE", {
        VLLM_ASCEND: Support(A2, "", _VA + "methods/w8a8_pdmix.py AscendW8A8PDMixFusedMoeMethod"),
        MINDIE: Support(NO, "not read", "")}),
    Feature("W4A16 MoE", "`w4a16:match=mlp\\.experts` (group > 0)", "MoE", {
        VLLM_ASCEND: Support(A2, "LLM-Compressor's expert layout, which qcompile writes for W4A16 experts "
                             "(weight_packed int32 [n, k/8] offset-binary, weight_scale [n, k/g], weight_shape); "
                             "needs moe_intermediate_size / tp divisible by group_size",
                             _VA + "methods/w4a16.py AscendW4A16FusedMoEMethod (docstring, get_weight, "
                             "get_dynamic_quant_param, process_weights_after_loading)", tp=w4a16_moe_tp_note),
        MINDIE: Support(NO, "not read", "")}),
    Feature("W4A8_DYNAMIC MoE", "`w4a8d:match=mlp\\.experts`", "MoE", {
        # Read, and measured with vLLM's real FusedMoE.weight_loader on CPU (every parameter NaN-filled, then the
        # artifact loaded through the loader check's model tree): at tp 2 every w2_weight_scale / w2_weight_offset
        # entry is still NaN, every other expert parameter is filled. AscendFusedMoEMethod.create_weights
        # (quantization/method_adapters.py) marks weight_scale / weight_offset GROUP when group_size > 0, so vLLM's
        # FusedMoE.weight_loader (0.23.0 fused_moe/layer.py, 0.26.0 fused_moe/routed_experts.py) sends down_proj's
        # [H, 1] first-stage scale to _load_w2, which narrows its input dim to 1 // tp = 0 columns: nothing is copied.
        VLLM_ASCEND: Support(A2, "serve it with the experts unsplit (tensor parallel 1, or "
                             "--enable-expert-parallel): at tensor parallel >= 2 without expert parallelism vLLM's "
                             "FusedMoE weight_loader loads no column of down_proj's [H, 1] weight_scale (marked a "
                             "group scale, it is split along its 1 column: 1 // tp = 0 per rank), so w2_weight_scale "
                             "keeps torch.empty memory, which process_scale multiplies into every down_proj group "
                             "scale",
                             _VA + "methods/w4a8.py AscendW4A8DynamicFusedMoEMethod (msModelSlim 1.0.0 "
                             "per-group: get_weight_modelslim, get_dynamic_quant_param_modelslim, "
                             "process_weights_after_loading_modelslim -> process_scale); method_adapters.py "
                             "AscendFusedMoEMethod.create_weights (per_group_param: weight_scale, weight_offset); vLLM "
                             "fused_moe/layer.py FusedMoE.weight_loader -> _load_model_weight_or_group_weight_scale -> "
                             "_load_w2"),
        # atb: qwen3_moe runs modeling_qwen2_moe (models/qwen3_moe/router_qwen3_moe.py Qwen3moeRouter). load_moe would
        # stack the experts' per-group tensors (weights.py reads weight_scale_second when group_size != 0), but
        # QwenMoe's pack type for W4A8_DYNAMIC experts is PackType.ALL_W4A8 (utils/quantize/pack_type.py
        # calc_w4a8_linear_pack_type; ALL_W4A8_ANTI with an anti-outlier norm), which FlashQwenLayer.__init__'s
        # post_attention_layernorm choice does not list: AssertionError at load, MindIE-LLM 3.0.0alpha1, 3.0.0.beta.1,
        # 3.0.0 and master alike. The torch backend would load the same tensors without error (shapes [n, 1] /
        # [n/2, k] match) and never read weight_scale_second.
        MINDIE: Support(NO, "the atb loader's Qwen MoE layer raises AssertionError ('mlp.pack_type: PackType.ALL_W4A8 "
                        "not supported'); MindIE's torch backend (backendType torch, MindIE-LLM 3.0.0.beta.1+: "
                        "mindie_llm/runtime/layers/quantization/ms_model_slim/w4a8.py W4A8PerTokenFusedMoEMethod) is "
                        "per-channel only and never reads weight_scale_second (runtime/utils/loader/"
                        "default_model_loader.py loads FusedMoE.weight_list), so it would multiply by weight_scale "
                        "alone", _MI + "models/qwen2_moe/modeling_qwen2_moe.py FlashQwenLayer.__init__ "
                        "(post_attention_layernorm by mlp.pack_type), QwenMoe.__init__; utils/quantize/pack_type.py "
                        "calc_w4a8_linear_pack_type")}),
    Feature("MoE experts on qwen2_moe", "`w8a8d`, `w4a8d:match=mlp\\.experts` (Qwen2-MoE)", "MoE", {
        VLLM_ASCEND: Support(NO, "quantized routed experts of qwen2_moe: packed_modules_model_mapping has no qwen2_moe "
                             "entry, so the quant config looks up `<layer>.mlp.experts.weight` (KeyError)",
                             _VA + "modelslim_config.py packed_modules_model_mapping, is_layer_skipped_ascend"),
        # MindIE reads per-expert mlp.experts.{e}.gate_proj/up_proj/down_proj (pack type from expert 0), the shared
        # expert as a dense MLP, the router and shared_expert_gate as float Linears
        MINDIE: Support(A2, "", _MI + "models/qwen2_moe/modeling_qwen2_moe.py QwenMoe.__init__ (load_moe), QwenMLP, "
                        "QwenSharedExpertGate", unsure=P310)}),
    # MindIE's atb loader types a MoE model's Linears by two config.json keys (mindie_keys.py, which the artifact
    # writer follows): one type for attention, one for everything else; FLOAT is read as float under either.
    Feature(MOE_MINDIE_KEYS, "-", "MoE", {
        VLLM_ASCEND: Support(BOTH, "", "reads each Linear's type from quant_model_description.json ("
                             + _VA + "modelslim_config.py AscendModelSlimConfig)"),
        MINDIE: Support(NO, "its atb loader reads every attention Linear with config.json's attn_quantize and every "
                        "other Linear with quantize (one quant type each), and its Qwen MoE layer takes no "
                        "W4A8_DYNAMIC attention", _MI + "models/qwen2/modeling_qwen2.py FlashQwenAttention.__init__; "
                        "utils/layers/__init__.py load_column_multi; utils/layers/linear/__init__.py load_moe; "
                        "models/qwen2_moe/modeling_qwen2_moe.py FlashQwenLayer.__init__")}),
    # config.json's MLP activation: the engines' MLPs are SwiGLU. Not a quant type: every artifact of such a checkpoint
    # has it, float ones too; the executable graph computes what hidden_act says (the captured transformers MLP).
    Feature(HIDDEN_ACT_SWISH, "-", "dense, MoE", {
        VLLM_ASCEND: Support(NO, "vLLM's MLPs compare hidden_act with the string \"silu\" and raise ValueError "
                             "(\"Only silu is supported for now\") although swish is the same function",
                             _VLLM + "llama.py LlamaMLP.__init__; qwen2.py Qwen2MLP.__init__ (qwen3.py's Qwen3MLP); "
                             "qwen3_moe.py Qwen3MoeMLP.__init__; qwen2_moe.py Qwen2MoeMLP.__init__"),
        MINDIE: Support(BOTH, "computes SwiGLU / Swish (= silu) whatever hidden_act says",
                        _ATB + "models/base/layer/decoder_layer.cpp DecoderLayer::SetMlpParam; "
                        "operations/fusion/moe/moe_mlp.cpp")}),
    Feature(HIDDEN_ACT_OTHER, "-", "dense, MoE", {
        VLLM_ASCEND: Support(NO, "vLLM's MLPs raise ValueError (\"Only silu is supported for now\"); routed experts "
                             "(FusedMoE built without `activation`, default silu) compute silu whatever it says",
                             _VLLM + "llama.py LlamaMLP.__init__; qwen2.py Qwen2MLP.__init__ (qwen3.py's Qwen3MLP); "
                             "qwen3_moe.py Qwen3MoeMLP.__init__, Qwen3MoeSparseMoeBlock; qwen2_moe.py "
                             "Qwen2MoeMLP.__init__"),
        MINDIE: Support(NO, "computes SwiGLU / Swish (silu) whatever hidden_act says",
                        _ATB + "models/base/layer/decoder_layer.cpp DecoderLayer::SetMlpParam; "
                        "operations/fusion/moe/moe_mlp.cpp")}),
)
FEATURE_BY_KEY = {f.key: f for f in FEATURES}


@dataclass(frozen=True)
class ArtifactFeatures:
    """What decides which engines load an artifact. linear_types: quant types of the decoder Linears (FLOAT
    left out); grouped_types: those quantized per group (weight scale [n, k/g]; W4A8_DYNAMIC: two-stage);
    biased_types: quant types of Linears that carry a float bias; kv_cache / fa_quant: C8 / FAQuant present;
    device: "910b" or "310p"; model_type, hidden_act: config.json's; mindie_key_problems: `mindie_key_problems`."""
    linear_types: frozenset = frozenset()
    grouped_types: frozenset = frozenset()
    biased_types: frozenset = frozenset()
    kv_cache: bool = False
    fa_quant: bool = False
    device: str = "910b"
    model_type: str = "llama"
    extra: tuple = field(default=())       # further feature keys (tests)
    moe_types: frozenset = frozenset()     # quant types of routed-expert Linears (FLOAT left out): "<type> MoE"
    hidden_act: str = "silu"               # config.json's MLP activation (transformers' default for these models)
    mindie_key_problems: tuple = ()        # MoE: why MindIE's config keys cannot type each Linear (mindie_keys.py)
    moe_intermediate_size: int = 0         # the routed experts' intermediate size (config.json; 0: no such experts)
    moe_group_size: int = 0                # the routed experts' weight group size (0: per-channel, or no experts)

    def keys(self) -> list[str]:
        """The FEATURES keys this artifact uses."""
        keys = []
        for t in sorted(self.linear_types):
            if t == "W4A8_DYNAMIC":
                keys.append(f"W4A8_DYNAMIC {'per-group' if t in self.grouped_types else 'per-channel'}")
            elif t == "W8A16" and t in self.grouped_types:
                keys.append("W8A16 per-group")
            else:
                keys.append(t)
        if "W4A8_DYNAMIC" in self.biased_types:
            keys.append("W4A8_DYNAMIC Linear bias")
        keys += [f"{t} MoE" for t in sorted(self.moe_types)]
        if self.moe_types and self.model_type == "qwen2_moe":
            keys.append("MoE experts on qwen2_moe")
        if self.mindie_key_problems:
            keys.append(MOE_MINDIE_KEYS)
        if self.kv_cache:
            keys.append("C8")
        if self.fa_quant:
            keys.append("FAQuant")
        if self.hidden_act == "swish":
            keys.append(HIDDEN_ACT_SWISH)
        elif self.hidden_act != "silu":
            keys.append(HIDDEN_ACT_OTHER)
        return keys + list(self.extra)


def _version_index(version: str) -> int:
    if version not in VLLM_ASCEND_VERSIONS:
        raise ValueError(f"unknown vLLM-Ascend version {version!r}; known: {', '.join(VLLM_ASCEND_VERSIONS)}")
    return VLLM_ASCEND_VERSIONS.index(version)


def refusals(engine: str, features: ArtifactFeatures, version: str | None = None) -> list[str]:
    """Why `engine` cannot load the artifact (one line each; [] = it loads). `version`: a pinned vLLM-Ascend
    release (default: the newest); only vLLM-Ascend facts depend on it."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    why = []
    for key in features.keys():
        feature = FEATURE_BY_KEY.get(key)
        if feature is None:
            why.append(f"{key}: not in the engine support matrix")
            continue
        s = feature.support[engine]
        if features.device not in s.devices | s.unsure:
            where = "" if not s.loads else f" on {features.device.upper()} (only {', '.join(sorted(s.devices))})"
            why.append(f"{key}{where}: {s.note or 'not supported'}" + (f" [{s.source}]" if s.source else ""))
        elif (engine == VLLM_ASCEND and s.since and version is not None and features.model_type not in s.patched
              and _version_index(version) < _version_index(s.since)):
            why.append(f"{key} on {features.model_type}: vLLM-Ascend {version} does not load it ({s.note}) "
                       f"[{s.source}]")
    return why


def engines_loading(features: ArtifactFeatures) -> list[str]:
    """The engines (newest vLLM-Ascend) that load the artifact."""
    return [e for e in ENGINES if not refusals(e, features)]


def notes(engine: str, features: ArtifactFeatures) -> list[str]:
    """Notes on how `engine` runs what it loads (versions, numerics that differ from the executable graph,
    devices where support is not confirmed)."""
    out = []
    for key in features.keys():
        s = FEATURE_BY_KEY[key].support[engine] if key in FEATURE_BY_KEY else None
        if s is None or features.device not in s.devices | s.unsure:
            continue
        if features.device in s.unsure:
            out.append(f"{key} on {features.device.upper()}: not confirmed in the engine's code; verify on the device")
        if engine == VLLM_ASCEND and features.model_type in s.patched:
            out.append(f"{key}: {s.patch_note}")
        elif s.note:
            out.append(f"{key}: {s.note}")
        tp = s.tp(features) if s.tp is not None else None
        if tp:
            out.append(f"{key}: {tp}")
    return out


def expected_loader_exit(features: ArtifactFeatures, version: str) -> int:
    """Exit status `loader_check/vllm_ascend_load.py --engine VERSION` must give: 0 when this matrix says that
    vLLM-Ascend release loads the artifact, 3 (documented engine limit) when it does not, and 3 as well where the
    release loads it only through a worker patch the tool does not apply (`Support.patched`: C8 on qwen3 with
    0.23.0, where the tool's own limit rule reports the scales UNSUPPORTED BY ENGINE)."""
    if refusals(VLLM_ASCEND, features, version):
        return 3
    for key in features.keys():
        s = FEATURE_BY_KEY[key].support[VLLM_ASCEND]
        if s.since and features.model_type in s.patched and _version_index(version) < _version_index(s.since):
            return 3
    return 0


def _scale_columns(out: Path) -> dict[str, int]:
    """{tensor name ending in .weight_scale: its number of columns} from the safetensors headers of `out`."""
    from qcompiler.safetensors_open import safe_open
    cols = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if k.endswith(".weight_scale"):
                    shape = h.get_slice(k).get_shape()
                    cols[k] = shape[1] if len(shape) == 2 else 1
    return cols


def features_of_artifact(out: Path) -> ArtifactFeatures:
    """ArtifactFeatures of a finished artifact folder (its description, config.json, the weight scales' shapes and,
    for the device, the qcompile report's target)."""
    out = Path(out)
    desc = json.loads((out / "quant_model_description.json").read_text())
    config = json.loads((out / "config.json").read_text())
    from ...ir.moe import EXPERT_LINEAR
    every = {k[:-len(".weight")]: v for k, v in desc.items() if isinstance(v, str) and k.endswith("_proj.weight")}
    linear = {k: v for k, v in every.items() if not EXPERT_LINEAR.search(k)}
    moe = frozenset(v for k, v in every.items() if EXPERT_LINEAR.search(k) and v != "FLOAT")
    types = frozenset(v for v in linear.values() if v != "FLOAT")
    biased = frozenset(t for name, t in linear.items() if t != "FLOAT" and f"{name}.bias" in desc)
    cols = _scale_columns(out)
    grouped = frozenset(t for name, t in linear.items() if t != "FLOAT" and (
        f"{name}.weight_scale_second" in desc or cols.get(f"{name}.weight_scale", 1) > 1))
    moe_group = int(desc.get("group_size") or 0) if moe & {"W4A16", "W4A8_DYNAMIC"} else 0
    text = config.get("text_config") or config
    moe_inter = int(text.get("moe_intermediate_size") or 0) if moe else 0
    device = "910b"
    report = out / "qcompile_report.json"
    if report.is_file() and json.loads(report.read_text()).get("target") == "ascend310p":
        device = "310p"
    elif types & {"W8A8S", "W8A8SC"}:
        device = "310p"
    return ArtifactFeatures(linear_types=types, grouped_types=grouped, biased_types=biased,
                            kv_cache=desc.get("kv_cache_type") == "C8", fa_quant=bool(desc.get("fa_quant_type")),
                            device=device, model_type=str(config.get("model_type", "llama")), moe_types=moe,
                            hidden_act=str(config.get("hidden_act", "silu")), moe_intermediate_size=moe_inter,
                            moe_group_size=moe_group, mindie_key_problems=mindie_key_problems(every))


def mindie_key_problems(linear_types: dict) -> tuple:
    """For ArtifactFeatures: why MindIE's atb loader cannot read each Linear {name: quant type} of a MoE artifact
    with its own type (mindie_keys.moe_config_keys); () for a dense one."""
    from .mindie_keys import is_moe, moe_config_keys
    return tuple(moe_config_keys(linear_types)[1]) if is_moe(linear_types) else ()


def _cell(s: Support) -> str:
    if not s.loads:
        return "-" if s.note == "not read" else "no" + (f": {s.note}" if s.note else "")
    where = "" if s.devices == BOTH else f" ({', '.join(d.upper() for d in sorted(s.devices))}" + (
        f"; {', '.join(d.upper() for d in sorted(s.unsure))} unconfirmed)" if s.unsure else ")")
    since = f" from {s.since}" if s.since else ""
    if s.since and s.patched:
        since += f" ({' / '.join(sorted(s.patched))}: {VLLM_ASCEND_VERSIONS[0]} too, by a worker patch)"
    return f"yes{where}{since}" + (f": {s.note}" if s.note else "")


def matrix_markdown() -> str:
    """The README's engine support table, generated from FEATURES."""
    lines = ["| feature | compiler pass | layers | vLLM-Ascend | MindIE (atb) |", "|---|---|---|---|---|"]
    for f in FEATURES:
        lines.append(f"| {f.key} | {f.scheme} | {f.layer} | {_cell(f.support[VLLM_ASCEND])} | "
                     f"{_cell(f.support[MINDIE])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(matrix_markdown(), end="")
