"""The float decoder layer of a dense Llama / Qwen2 / Qwen3 checkpoint, built from config.json without transformers.

Why: `qcompile run` / `qcompile eval` of a float checkpoint used to import transformers' modeling stack and
torch.export one layer on every start (~3 s of a ~6 s start on SmolLM2). For the configurations this module
understands, `build_layer_template(spec, dtype)` writes the GraphModule torch.export produces for that layer
(ir/capture.py `HFSkeleton.capture_layer`: sdpa attention, no KV cache) node for node: the same aten ops with
the same arguments in the same order, the same pytree signature, `meta.LINEAR_NAME` on every Linear. Only
export's input-shape guard module (`_guards_fn`, code without a value: backends/ascend/layouts.py drops it
too) and the FakeTensor `val`s are left out; nodes carry `meta.TENSOR_TYPE` instead (what ir/decode.py reads).
tests/ir/test_dense_layer.py holds the contract: for every understood variant (llama with and without biases,
qwen2's q/k/v biases, qwen3's q/k norms, grouped and plain multi-head attention, float16), the built graph
equals a real capture (ops, arguments, signature), its outputs are bit-identical, the expected tensors equal
transformers' meta model's and the RoPE table equals transformers' rotary module's.

`describe(ckpt)` returns None for anything it does not understand -- another architecture (MoE), a config
key outside `KNOWN_KEYS`, a RoPE type other than "default", a sliding window that could apply, head_dim > 256
(transformers then repeats K/V instead of sdpa's enable_gqa), an activation other than silu, a missing key
whose default differs between config classes -- and the caller captures with transformers as before
(model.py `load_float_model`). What it covers is what transformers 5 builds for these config.json files
(modeling_llama / modeling_qwen2 / modeling_qwen3 `*DecoderLayer`, integrations/sdpa_attention.py); the
test fails when an installed transformers builds anything else.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import meta

#: config.json keys `describe` understands: those read below, and those that change neither the decoder
#: layer's graph, its tensors nor the head (ids, init, cache and bookkeeping keys). Any other key -> None.
KNOWN_KEYS = frozenset({
    "architectures", "model_type", "_name_or_path", "_model_name_or_path", "transformers_version", "torch_dtype",
    "dtype", "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "initializer_range", "use_cache",
    "max_position_embeddings", "vocab_size", "num_hidden_layers", "tie_word_embeddings", "hidden_size",
    "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "attention_bias", "mlp_bias", "attention_dropout", "pretraining_tp", "rope_parameters", "rope_theta",
    "rope_scaling", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
})
#: architecture -> model_type it must state (the class transformers builds for it)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
#: transformers' sdpa path passes enable_gqa only up to this head_dim (sdpa_attention.use_gqa_in_sdpa)
MAX_GQA_HEAD_DIM = 256
_INT64_MAX = 9223372036854775807  # export's open slice end


@dataclass(frozen=True)
class DenseLayerSpec:
    """Everything a dense layer's graph and tensors depend on but the weights' values."""
    model_type: str           # llama | qwen2 | qwen3
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool             # qwen3: RMSNorm over head_dim on q and k before RoPE
    rope_theta: float
    vocab: int


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _rope_theta(cfg: dict) -> float | None:
    """rope_theta for the "default" RoPE type, or None (another type, extra parameters, no explicit theta)."""
    params, scaling = cfg.get("rope_parameters"), cfg.get("rope_scaling")
    if scaling is not None and scaling != params:
        return None
    if params is not None:
        if not isinstance(params, dict) or set(params) - {"rope_theta", "rope_type"}:
            return None
        if params.get("rope_type", "default") != "default":
            return None
        theta = params.get("rope_theta", cfg.get("rope_theta"))
    else:
        theta = cfg.get("rope_theta")
    return _number(theta)


def describe(ckpt) -> DenseLayerSpec | None:
    """The layer spec of a loading.Checkpoint, or None when this module does not understand its config."""
    cfg = ckpt.config
    model_type = ARCHITECTURES.get(ckpt.architecture)
    if model_type is None or cfg.get("model_type") != model_type or set(cfg) - KNOWN_KEYS:
        return None
    if cfg.get("hidden_act") != "silu" or cfg.get("use_sliding_window"):
        return None
    types = cfg.get("layer_types")
    if types is not None and (not isinstance(types, list) or any(t != "full_attention" for t in types)):
        return None
    hidden, inter = _int(cfg.get("hidden_size")), _int(cfg.get("intermediate_size"))
    heads, kv_heads, vocab = (_int(cfg.get(k)) for k in ("num_attention_heads", "num_key_value_heads", "vocab_size"))
    eps, theta = _number(cfg.get("rms_norm_eps")), _rope_theta(cfg)
    if None in (hidden, inter, heads, kv_heads, vocab, eps, theta) or heads % kv_heads:
        return None
    head_dim = cfg.get("head_dim")
    if head_dim is None and model_type != "qwen3" and hidden % heads == 0:  # Qwen3Config defaults head_dim to 128
        head_dim = hidden // heads
    if _int(head_dim) is None or head_dim % 2 or (heads > kv_heads and head_dim > MAX_GQA_HEAD_DIM):
        return None
    for key in ("attention_bias", "mlp_bias"):
        if not isinstance(cfg.get(key, False), bool):
            return None
    if model_type == "qwen2":   # modeling_qwen2: q/k/v always have a bias, o and the MLP none
        qkv_bias, o_bias, mlp_bias = True, False, False
    else:                       # llama: attention_bias on q/k/v/o, mlp_bias on the MLP; qwen3: no mlp_bias
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False
    return DenseLayerSpec(model_type, hidden, inter, heads, kv_heads, head_dim, eps, qkv_bias, o_bias, mlp_bias,
                          model_type == "qwen3", theta, vocab)


def layer_tensors(spec: DenseLayerSpec) -> dict[str, list[int]]:
    """{name relative to the layer: shape} of one decoder layer, in the module's parameter order."""
    h, d = spec.hidden, spec.head_dim
    out: dict[str, list[int]] = {}
    for name, rows, cols, bias in (("q_proj", spec.heads * d, h, spec.qkv_bias), ("k_proj", spec.kv_heads * d, h,
                                   spec.qkv_bias), ("v_proj", spec.kv_heads * d, h, spec.qkv_bias),
                                   ("o_proj", h, spec.heads * d, spec.o_bias)):
        out[f"self_attn.{name}.weight"] = [rows, cols]
        if bias:
            out[f"self_attn.{name}.bias"] = [rows]
    if spec.qk_norm:
        out["self_attn.q_norm.weight"] = [d]
        out["self_attn.k_norm.weight"] = [d]
    for name, rows, cols in (("gate_proj", spec.intermediate, h), ("up_proj", spec.intermediate, h),
                             ("down_proj", h, spec.intermediate)):
        out[f"mlp.{name}.weight"] = [rows, cols]
        if spec.mlp_bias:
            out[f"mlp.{name}.bias"] = [rows]
    out["input_layernorm.weight"] = [h]
    out["post_attention_layernorm.weight"] = [h]
    return out


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def model_tensors(spec: DenseLayerSpec, num_layers: int) -> tuple[dict[str, list[int]], set[str]]:
    """({name: shape} of the whole model's state dict, the Linear module names): what checkpoint_checks.
    check_tensors compares the stored tensors with (transformers' meta model's state_dict and Linears)."""
    expected = {"model.embed_tokens.weight": [spec.vocab, spec.hidden]}
    linears = {"lm_head"}
    for i in range(num_layers):
        expected.update({f"model.layers.{i}.{k}": v for k, v in layer_tensors(spec).items()})
        linears.update(f"model.layers.{i}.{n}" for n in LINEARS)
    expected["model.norm.weight"] = [spec.hidden]
    expected["lm_head.weight"] = [spec.vocab, spec.hidden]
    return expected, linears


def inv_freq(spec: DenseLayerSpec) -> torch.Tensor:
    """The "default" RoPE inverse frequencies, float32 [head_dim / 2], as transformers computes them
    (modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters; Qwen2 / Qwen3 share it); the
    attention scaling of this type is 1.0."""
    dim = spec.head_dim
    return 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class _Builder:
    def __init__(self, dtype: torch.dtype):
        self.graph = torch.fx.Graph()
        self.dtype = dtype

    def node(self, target, args, kwargs=None, type_=None):
        n = self.graph.call_function(target, tuple(args), kwargs or {})
        if type_ is not None:
            n.meta[meta.TENSOR_TYPE] = meta.TensorType(*type_)
        return n

    def assert_meta(self, x, dtype):
        self.node(torch.ops.aten._assert_tensor_metadata.default, (x,),
                  {"dtype": dtype, "device": torch.device("cpu"), "layout": torch.strided})

    def rms_norm(self, x, weight, eps: float, shape: tuple):
        """transformers' LlamaRMSNorm / Qwen2RMSNorm / Qwen3RMSNorm as export records it."""
        aten, f32 = torch.ops.aten, torch.float32
        self.assert_meta(x, self.dtype)
        h = self.node(aten.to.dtype, (x, f32), type_=(f32, shape))
        p = self.node(aten.pow.Tensor_Scalar, (h, 2), type_=(f32, shape))
        m = self.node(aten.mean.dim, (p, [-1], True), type_=(f32, shape[:-1] + (1,)))
        a = self.node(aten.add.Tensor, (m, eps), type_=(f32, shape[:-1] + (1,)))
        r = self.node(aten.rsqrt.default, (a,), type_=(f32, shape[:-1] + (1,)))
        y = self.node(aten.mul.Tensor, (h, r), type_=(f32, shape))
        self.assert_meta(y, f32)
        y = self.node(aten.to.dtype, (y, self.dtype), type_=(self.dtype, shape))
        return self.node(aten.mul.Tensor, (weight, y), type_=(self.dtype, shape))

    def linear(self, x, params: dict, name: str, shape: tuple):
        args = (x, params[f"{name}.weight"]) + ((params[f"{name}.bias"],) if f"{name}.bias" in params else ())
        n = self.node(torch.ops.aten.linear.default, args, type_=(self.dtype, shape))
        n.meta[meta.LINEAR_NAME] = name
        return n

    def rope(self, x, cos, sin, shape: tuple):
        """transformers' apply_rotary_pos_emb on one of q / k: x * cos + rotate_half(x) * sin."""
        aten, half = torch.ops.aten, shape[-1] // 2
        a = self.node(aten.mul.Tensor, (x, cos), type_=(self.dtype, shape))
        lo = self.node(aten.slice.Tensor, (x, 3, 0, half), type_=(self.dtype, shape[:-1] + (half,)))
        hi = self.node(aten.slice.Tensor, (x, 3, half, _INT64_MAX), type_=(self.dtype, shape[:-1] + (half,)))
        neg = self.node(aten.neg.default, (hi,), type_=(self.dtype, shape[:-1] + (half,)))
        rot = self.node(aten.cat.default, ([neg, lo], -1), type_=(self.dtype, shape))
        b = self.node(aten.mul.Tensor, (rot, sin), type_=(self.dtype, shape))
        return self.node(aten.add.Tensor, (a, b), type_=(self.dtype, shape))


def build_layer_template(spec: DenseLayerSpec, dtype: torch.dtype) -> torch.fx.GraphModule:
    """The layer's GraphModule (module docstring) with every tensor on the meta device: a template for
    model.bind_graph, which gives each layer its own tensors."""
    import torch.utils._pytree as pytree
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
    aten, B, L = torch.ops.aten, "batch", "seq"
    d, H = spec.head_dim, spec.hidden
    b = _Builder(dtype)
    g = b.graph
    shapes = layer_tensors(spec)
    params = {}
    for name in shapes:
        params[name] = g.get_attr(name)
    x = g.placeholder("hidden_states")
    x.meta[meta.TENSOR_TYPE] = meta.TensorType(dtype, (B, L, H))
    cos, sin = g.placeholder("position_embeddings_0"), g.placeholder("position_embeddings_1")
    for n in (cos, sin):
        n.meta[meta.TENSOR_TYPE] = meta.TensorType(dtype, (1, L, d))
    bsz = b.node(aten.sym_size.int, (x, 0))
    seq = b.node(aten.sym_size.int, (sin, 1))
    h = b.rms_norm(x, params["input_layernorm.weight"], spec.eps, (B, L, H))

    def heads_of(proj: str, n_heads: int, norm: str | None):
        y = b.linear(h, params, f"self_attn.{proj}", (B, L, n_heads * d))
        y = b.node(aten.view.default, (y, [bsz, seq, -1, d]), type_=(dtype, (B, L, n_heads, d)))
        if norm is not None:
            y = b.rms_norm(y, params[f"self_attn.{norm}.weight"], spec.eps, (B, L, n_heads, d))
        return b.node(aten.transpose.int, (y, 1, 2), type_=(dtype, (B, n_heads, L, d)))
    q = heads_of("q_proj", spec.heads, "q_norm" if spec.qk_norm else None)
    k = heads_of("k_proj", spec.kv_heads, "k_norm" if spec.qk_norm else None)
    v = heads_of("v_proj", spec.kv_heads, None)
    c = b.node(aten.unsqueeze.default, (cos, 1), type_=(dtype, (1, 1, L, d)))
    s = b.node(aten.unsqueeze.default, (sin, 1), type_=(dtype, (1, 1, L, d)))
    q = b.rope(q, c, s, (B, spec.heads, L, d))
    k = b.rope(k, c, s, (B, spec.kv_heads, L, d))
    sdpa_kwargs = {"scale": d ** -0.5}
    if spec.heads > spec.kv_heads:  # integrations/sdpa_attention.py: num_key_value_groups > 1, no mask
        sdpa_kwargs["enable_gqa"] = True
    a = b.node(aten.scaled_dot_product_attention.default, (q, k, v, None, 0.0, True), sdpa_kwargs,
               type_=(dtype, (B, spec.heads, L, d)))
    a = b.node(aten.reshape.default, (a, [bsz, -1, seq, d]), type_=(dtype, (B, spec.heads, L, d)))
    a = b.node(aten.transpose.int, (a, 1, 2), type_=(dtype, (B, L, spec.heads, d)))
    a = b.node(aten.reshape.default, (a, [bsz, seq, -1]), type_=(dtype, (B, L, spec.heads * d)))
    o = b.linear(a, params, "self_attn.o_proj", (B, L, H))
    x1 = b.node(aten.add.Tensor, (x, o), type_=(dtype, (B, L, H)))
    h = b.rms_norm(x1, params["post_attention_layernorm.weight"], spec.eps, (B, L, H))
    gate = b.linear(h, params, "mlp.gate_proj", (B, L, spec.intermediate))
    act = b.node(aten.silu.default, (gate,), type_=(dtype, (B, L, spec.intermediate)))
    up = b.linear(h, params, "mlp.up_proj", (B, L, spec.intermediate))
    prod = b.node(aten.mul.Tensor, (act, up), type_=(dtype, (B, L, spec.intermediate)))
    down = b.linear(prod, params, "mlp.down_proj", (B, L, H))
    out = b.node(aten.add.Tensor, (x1, down), type_=(dtype, (B, L, H)))
    g.output((out,))
    leaf = torch.empty(0)
    in_spec = pytree.tree_flatten(((leaf,), {"position_embeddings": (leaf, leaf)}))[1]
    g._codegen = _PyTreeCodeGen(_PyTreeInfo(["hidden_states", "position_embeddings"], in_spec,
                                            pytree.tree_flatten(leaf)[1]))
    root = torch.nn.Module()
    for name, shape in shapes.items():
        *path, leafname = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leafname, torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"),
                                                            requires_grad=False))
    return torch.fx.GraphModule(root, g)

