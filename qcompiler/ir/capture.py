"""Capture: HF decoder layers -> FX GraphModules via torch.export (strict=False), one layer at a time.

Contract:
- `HFSkeleton(ckpt)` builds the transformers model on the meta device (no weights in memory), with
  only the embedding and the rotary embedding materialized: enough to run a real forward up to layer 0.
  `skeleton.embed_weight` is that embedding; `skeleton.release_embedding()` frees it (a compile holds it
  only until layer 0's inputs exist); whatever needs it later reads it again.
- `skeleton.layer0_inputs(input_ids)` runs that forward and takes layer 0's inputs with a forward
  pre-hook (the forward stops there): hidden states [B, L, H] and the rotary (cos, sin) [1, L, D].
- `with skeleton.float_model() as model:` the whole transformers model with every weight read through
  `Checkpoint.tensor` (the safetensors open_checkpoint validated; never `*.bin` or pickle), for
  self-sampled calibration; its layers, norm and lm_head return to the meta device afterwards.
- `skeleton.capture_layer(i, sample)` returns layer i as a GraphModule exported with a dynamic batch and
  sequence dimension, whose parameters are layer i's tensors from the safetensors files under their HF
  names relative to the layer (`self_attn.q_proj.weight`), with `LINEAR_NAME` set on every `aten.linear`
  node. Export runs once per layer structure: the first layer of a structure is materialized, exported
  (its eager copy released again) and kept as a weightless template (parameters on the meta device);
  every layer of that structure is a copy of the template holding its own tensors. Only the returned
  GraphModule holds layer i's weights. The structure (`structure_key`) is everything the exported graph
  depends on but the weights' values: the module classes, their scalar attributes (sliding window,
  eps, head_dim, layer type, ...), the parameters' names, shapes and dtypes, the sample's dtype and
  width. `layer_idx` is left out: in the supported architectures it only indexes a KV cache, which a
  captured layer has none of (use_cache=False); tests/ir/test_capture.py checks that a copy equals a
  fresh export, graph and numbers, for every architecture. (torch.export of a decoder layer takes about
  2 s; the copy 0.1 s: a third of a SmolLM2 compile's wall time was export.)
Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE): the skeleton's sparse MoE blocks are replaced by ir/moe.py's
SparseMoeBlock (per-expert Linears under the checkpoint's names, explicit routing) before anything is exported;
`annotate_linears` marks the router Linears meta.ROUTER (float, no quantization site).
Limits: causal attention without padding (the captured mask must be None); the captured graph computes
the layer for sequences of length >= 2 and for length 1 with no cache.
"""
import contextlib
import copy
import warnings
from dataclasses import dataclass

import torch
from torch.export import Dim

from ..errors import QCError
from . import meta
from .moe import is_router, replace_moe_blocks

STOP = "qc-stop-after-layer0-inputs"


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """Inputs of one decoder layer for a set of sequences."""
    hidden: torch.Tensor                                # [B, L, H] in the model dtype
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [1, L, head_dim]


def hf_config(ckpt):
    """transformers' config of `ckpt` (a loading.Checkpoint) as every capture builds it: never custom code, sdpa
    attention (one scaled_dot_product_attention node per layer), no KV cache."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(str(ckpt.path), trust_remote_code=False)  # trust.py: never custom code
    cfg._attn_implementation = "sdpa"  # one scaled_dot_product_attention node per layer
    cfg.use_cache = False
    return cfg


class HFSkeleton:
    """The transformers model of a checkpoint on the meta device, materialized one piece at a time."""

    def __init__(self, ckpt):
        from transformers import AutoModelForCausalLM
        self.ckpt = ckpt
        self.hf_config = hf_config(ckpt)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.hf_config, dtype=ckpt.dtype, trust_remote_code=False)
        replace_moe_blocks(self.model)  # per-expert Linears under the checkpoint's names (ir/moe.py)
        self.model.eval()
        base = self.model.model
        # Rotary tables are computed at construction: rebuild on CPU (meta buffers hold no values).
        with torch.device("cpu"):
            base.rotary_emb = type(base.rotary_emb)(config=self.hf_config)
        self._load(base.embed_tokens, "model.embed_tokens.")
        self._templates: dict[tuple, torch.fx.GraphModule] = {}  # structure -> weightless exported layer

    @property
    def rotary(self):
        return self.model.model.rotary_emb

    @property
    def embed_weight(self) -> torch.Tensor:
        """The embedding matrix [vocab, hidden] in the compile dtype (read again if it was released)."""
        self._reload_embedding()
        return self.model.model.embed_tokens.weight.detach()

    def _reload_embedding(self) -> None:
        embed = self.model.model.embed_tokens
        if embed.weight.is_meta:
            self._load(embed, "model.embed_tokens.")

    def release_embedding(self) -> None:
        """Free the embedding (back to the meta device)."""
        self.model.model.embed_tokens.to("meta")

    def _weights(self, module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of `module`'s parameters and buffers (names relative to `prefix`)."""
        tensors = self.ckpt.tensors(prefix)
        expected = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
        missing = sorted(expected - set(tensors))
        if missing:
            raise QCError(f"{self.ckpt.path}: missing weights {prefix}{missing[0]} (and {len(missing) - 1} more)"
                          if len(missing) > 1 else f"{self.ckpt.path}: missing weight {prefix}{missing[0]}")
        return {k: v for k, v in tensors.items() if k in expected}

    def _load(self, module: torch.nn.Module, prefix: str):
        tensors = self._weights(module, prefix)
        module.to_empty(device="cpu")
        module.load_state_dict(tensors, strict=True, assign=True)

    @contextlib.contextmanager
    def float_model(self):
        """The whole float model (transformers modules, weights from the validated safetensors in the compile
        dtype, generation_config.json's EOS ids) for as long as the block runs: what
        `AutoModelForCausalLM.from_pretrained(folder, dtype=...)` would build, without its file lookup."""
        from transformers import GenerationConfig
        model, base = self.model, self.model.model
        parts = [(layer, f"model.layers.{i}.") for i, layer in enumerate(base.layers)] + [(base.norm, "model.norm.")]
        if not self.ckpt.tie_word_embeddings:
            parts.append((model.lm_head, "lm_head."))
        saved_generation = model.generation_config
        self._reload_embedding()
        try:
            for module, prefix in parts:
                self._load(module, prefix)
            if self.ckpt.tie_word_embeddings:
                model.lm_head.weight = base.embed_tokens.weight
            if (self.ckpt.path / "generation_config.json").is_file():  # JSON only, as from_pretrained reads it
                model.generation_config = GenerationConfig.from_pretrained(str(self.ckpt.path))
            yield model
        finally:
            model.generation_config = saved_generation
            for module, _ in parts:
                module.to("meta")
            weight = model.lm_head.weight
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)

    def layer0_inputs(self, input_ids: torch.LongTensor) -> LayerInputs:
        """Run the real forward up to layer 0 and capture its inputs with a pre-hook."""
        captured = {}

        def hook(_module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Stop(STOP)

        self._reload_embedding()
        handle = self.model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model.model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        kwargs = captured["kwargs"]
        hidden = captured["args"][0] if captured["args"] else kwargs["hidden_states"]
        if kwargs.get("attention_mask") is not None:
            raise QCError("this model builds an explicit attention mask (sliding window?); "
                          "only plain causal attention is supported")
        cos, sin = kwargs["position_embeddings"]
        return LayerInputs(hidden=hidden, position_embeddings=(cos[:1], sin[:1]))

    def capture_layer(self, index: int, sample: LayerInputs) -> torch.fx.GraphModule:
        """Decoder layer `index` as a GraphModule holding its weights (read now); see the module docstring."""
        layer = self.model.model.layers[index]
        prefix = f"model.layers.{index}."
        key = (structure_key(layer), str(sample.hidden.dtype), int(sample.hidden.shape[-1]),
               tuple((str(t.dtype), int(t.shape[-1])) for t in sample.position_embeddings))
        template = self._templates.get(key)
        if template is None:
            self._load(layer, prefix)
            try:
                gm = export_layer(layer, sample)
            finally:
                layer.to("meta")  # drop the eager weights; the GraphModule keeps its own references
            annotate_linears(gm)
            template = self._templates[key] = with_tensors(gm, {})
        return with_tensors(template, self._weights(layer, prefix))


def structure_key(module: torch.nn.Module) -> tuple:
    """Everything but the weights' values that an export of `module` depends on (module docstring): per
    submodule its class and scalar attributes (`layer_idx` left out), per tensor its name, shape, dtype."""
    parts = []
    for name, m in module.named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and k != "layer_idx"
                             and (v is None or isinstance(v, (bool, int, float, str)))))
        parts.append((name, type(m).__module__, type(m).__qualname__, attrs))
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        parts.append((name, tuple(t.shape), str(t.dtype)))
    return tuple(parts)


def with_tensors(gm: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """A copy of `gm` (graph, node meta, every other attribute) whose parameters and buffers named in
    `tensors` are those tensors (parameters without grad), and whose other parameters are on the meta
    device (no memory): `with_tensors(gm, {})` is a weightless template of `gm`."""
    memo = {}
    for name, t in gm.named_parameters():
        value = tensors[name] if name in tensors else torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(value.detach(), requires_grad=False)
    for name, t in gm.named_buffers():
        if name in tensors:
            memo[id(t)] = tensors[name]
    return quiet_deepcopy(gm, memo)


def quiet_deepcopy(obj, memo: dict | None = None):
    """copy.deepcopy(obj, memo) without the FutureWarning torch's own copy of a pytree spec raises (a deprecated
    `isinstance(treespec, LeafSpec)` check inside torch): a graph module or its code generator. Untouched, it
    reached the users of `eval` / `run` of a float model."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        return copy.deepcopy(obj, memo)


def export_layer(module: torch.nn.Module, sample: LayerInputs) -> torch.fx.GraphModule:
    """torch.export a layer-shaped module `f(hidden, position_embeddings=(cos, sin))` -> GraphModule."""
    gm = export_program(module, sample).module()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm


def export_program(module: torch.nn.Module, sample: LayerInputs) -> torch.export.ExportedProgram:
    """torch.export a layer-shaped module `f(hidden, position_embeddings=(cos, sin))`.

    Batch and sequence are dynamic, so one graph serves calibration, evaluation and generation. The
    sample must have batch >= 2 and sequence >= 2 (export specializes dimensions of size 0/1).
    """
    # Two copies of the first sequence: a batch of 1 would be specialized to a constant by export.
    hidden = sample.hidden[:1].expand(2, -1, -1).contiguous()
    if hidden.shape[1] < 2:
        raise QCError("capture needs a sample of at least 2 tokens")
    seq_len = hidden.shape[1]
    cos, sin = (t[:, :seq_len] for t in sample.position_embeddings)
    batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=1 << 20)
    with torch.no_grad():
        ep = torch.export.export(
            module, (hidden,), {"position_embeddings": (cos, sin)},
            dynamic_shapes={"hidden_states": {0: batch, 1: seq},
                            "position_embeddings": ({1: seq}, {1: seq})},
            strict=False)
    return ep


def linear_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The `aten.linear` nodes of a layer graph, in graph order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default]


def annotate_linears(gm: torch.fx.GraphModule) -> None:
    """Set meta.LINEAR_NAME on each aten.linear node from its weight's get_attr target, and meta.ROUTER on
    MoE routers (ir/moe.py: float, no quantization site)."""
    for node in linear_nodes(gm):
        weight = node.args[1]
        if weight.op != "get_attr" or not str(weight.target).endswith(".weight"):
            raise QCError(f"captured graph: linear {node.name} does not read a named weight")
        node.meta[meta.LINEAR_NAME] = str(weight.target)[: -len(".weight")]
        if is_router(node.meta[meta.LINEAR_NAME]):
            node.meta[meta.ROUTER] = True
