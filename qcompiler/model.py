"""A runnable model: `Head` + decoder-layer provider, bundled as `LoadedModel`; the float layers of a checkpoint.

A model is a `Head` (embedding, rotary tables, final norm, lm_head: plain float math written here, no
transformers modeling code) plus a layer provider that hands out decoder-layer callables
`f(hidden [B, L, H], position_embeddings=(cos, sin)) -> hidden`:
- `executable.ExecutableLayers`: the lowered graphs of a compiled OUT (the format, its writer and its reader live
  in executable.py), whose fused ops are `torch.ops.qc.*` (ir/qc_ops.py; kernels from qcompiler.backends.ascend);
- `CapturedFloatLayers` here: the float layers of a checkpoint, captured with torch.export exactly as the
  compiler does before any pass (so float and quantized numbers come from one code path); `load_float_model`;
- `DenseFloatLayers` here: the same graphs for dense Llama / Qwen2 / Qwen3 checkpoints, written from config.json
  by ir/dense_layer.py (no transformers import, no export: `qcompile run` of a float model starts in seconds).
`runtime.load_model` picks one for a folder (ONNX, executable graph or float). This module imports neither
executable.py nor a backend's loader, so both can build on it.
Nothing is run from a model folder or an OUT folder (trust.py): `trust_remote_code` is the user's
--trust-remote-code, which never executes code.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import QCError


@dataclass
class Head:
    """Everything outside the decoder layers, as float tensors in the model dtype."""
    embed_weight: torch.Tensor
    norm_weight: torch.Tensor
    lm_head_weight: torch.Tensor
    inv_freq: torch.Tensor        # float32 [head_dim/2], from the checkpoint's rotary embedding
    attention_scaling: float
    eps: float
    dtype: torch.dtype

    def embed(self, ids: torch.LongTensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_weight)

    def rope(self, seq_len: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [1, L, head_dim] for positions start..start+L-1, computed as transformers does."""
        pos = torch.arange(start, start + seq_len, dtype=torch.float32)[None]
        freqs = pos[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * self.attention_scaling).to(self.dtype),
                (emb.sin() * self.attention_scaling).to(self.dtype))

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """RMSNorm with the exact op order of transformers' LlamaRMSNorm / Qwen2RMSNorm."""
        h32 = h.to(torch.float32)
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.norm_weight * h32.to(h.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(self.final_norm(h), self.lm_head_weight)


def head_from_checkpoint(ckpt, rotary) -> Head:
    """The float head of a checkpoint; `rotary` is the transformers rotary module (for inv_freq/scaling)."""
    embed = ckpt.tensor("model.embed_tokens.weight")
    lm = embed if ckpt.tie_word_embeddings else ckpt.tensor("lm_head.weight")
    return Head(embed_weight=embed, norm_weight=ckpt.tensor("model.norm.weight"), lm_head_weight=lm,
                inv_freq=rotary.inv_freq.detach().float().clone(),
                attention_scaling=float(rotary.attention_scaling),
                eps=float(ckpt.config.get("rms_norm_eps", 1e-6)), dtype=ckpt.dtype)


#: tokens per forward when running a layer over many sequences: large batches amortize per-op overhead
#: on CPU; the cap bounds the biggest intermediate (tokens x intermediate_size floats).
BATCH_TOKENS = 16384


def auto_batch_size(seq_len: int) -> int:
    """Sequences per layer forward for sequences of `seq_len` tokens (BATCH_TOKENS tokens a batch)."""
    return max(1, BATCH_TOKENS // max(seq_len, 1))


def run_layer_batched(layer, hidden: torch.Tensor, position_embeddings, batch_size: int) -> torch.Tensor:
    """Apply one layer to every sequence of `hidden` [N, L, H], `batch_size` sequences at a time."""
    outs = []
    with torch.inference_mode():
        for start in range(0, hidden.shape[0], batch_size):
            outs.append(layer(hidden[start:start + batch_size], position_embeddings=position_embeddings))
    return torch.cat(outs)


class _FloatLayers:
    """Float decoder layers of a checkpoint: one graph template per distinct layer structure, copied and bound
    to each layer's own tensors (`bind_graph`). Subclasses say how a template is made and what a structure is."""

    def __init__(self, ckpt):
        self.ckpt = ckpt
        self.num_layers = ckpt.num_layers
        self._templates: dict = {}  # structure -> GraphModule template (never handed out: only copied)

    def _structure(self, index: int, tensors: dict) -> tuple:
        raise NotImplementedError

    def _template(self, index: int, sample) -> torch.fx.GraphModule:
        raise NotImplementedError

    def get(self, index: int, sample, prepared: bool = False, rows: int | None = None):  # rows: int8 layers only
        tensors = self.ckpt.tensors(f"model.layers.{index}.")
        key = self._structure(index, tensors)
        if key not in self._templates:
            self._templates[key] = self._template(index, sample)
        gm = bind_graph(self._templates[key], tensors)
        return _prepare(gm) if prepared else gm

    def decode(self, index: int, sample):
        """(decode step of float layer `index`, its CacheSpec): see ir/decode.py."""
        from .ir.decode import build_decode_graph
        step, spec = build_decode_graph(self.get(index, sample), self.ckpt.dtype)
        return _prepare(step), spec


def _tensor_signature(tensors: dict) -> tuple:
    return tuple(sorted((k, str(v.dtype), tuple(v.shape)) for k, v in tensors.items()))


class CapturedFloatLayers(_FloatLayers):
    """Float decoder layers of a checkpoint, captured like the compiler does (before any pass).

    torch.export runs once per distinct layer structure (module class, attention type from config
    `layer_types`, tensor names, shapes and dtypes): the first layer of a structure is captured, every other
    one gets a copy of that graph bound to its own weights (exporting it would trace the same code on tensors
    of the same shapes; tests/test_runtime.py checks the graphs and their outputs against a real capture).
    A dense model captures once instead of num_layers times (SmolLM2: 1 export instead of 30).
    """

    def __init__(self, skeleton):
        super().__init__(skeleton.ckpt)
        self.skeleton = skeleton

    def _structure(self, index: int, tensors: dict) -> tuple:
        types = getattr(self.skeleton.hf_config, "layer_types", None)
        return (type(self.skeleton.model.model.layers[index]).__qualname__,
                types[index] if isinstance(types, (list, tuple)) and index < len(types) else None,
                _tensor_signature(tensors))

    def _template(self, index: int, sample) -> torch.fx.GraphModule:
        return self.skeleton.capture_layer(index, sample)


class DenseFloatLayers(_FloatLayers):
    """Float decoder layers of a dense Llama / Qwen2 / Qwen3 checkpoint whose config ir/dense_layer.py
    understands: the graph torch.export would capture, written from the config (no transformers import, no
    export; tests/ir/test_dense_layer.py checks it against a real capture, graph and output bits)."""

    def __init__(self, ckpt, spec):
        super().__init__(ckpt)
        self.spec = spec

    def _structure(self, index: int, tensors: dict) -> tuple:
        return _tensor_signature(tensors)

    def _template(self, index: int, sample) -> torch.fx.GraphModule:
        from .ir.dense_layer import build_layer_template
        return build_layer_template(self.spec, self.ckpt.dtype)


def bind_graph(template: torch.fx.GraphModule, tensors: dict) -> torch.fx.GraphModule:
    """A new GraphModule running a copy of `template`'s graph on `tensors` ({attribute name: tensor}, as
    parameters); attributes `tensors` lacks (export's guard module, constants) are shared with `template`."""
    from .ir.capture import quiet_deepcopy
    from .ir.graph_json import lazy_graph_module
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(template.graph, {}))
    graph._codegen = quiet_deepcopy(template.graph._codegen)
    root: dict = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in tensors:
            root[node.target] = torch.nn.Parameter(tensors[node.target], requires_grad=False)
        elif node.op in ("get_attr", "call_module"):
            root[node.target] = template.get_submodule(node.target) if node.op == "call_module" else \
                _attribute(template, node.target)
    gm = lazy_graph_module(root, graph)  # code generated when first called (after prepare_layer's rewrite)
    gm.meta.update(template.meta)
    return gm


def _attribute(module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _prepare(gm):
    from .backends.ascend.layouts import prepare_layer
    return prepare_layer(gm)


@dataclass
class LoadedModel:
    head: Head
    layers: object            # executable.ExecutableLayers | CapturedFloatLayers | DenseFloatLayers
    tokenizer: object
    kind: str                 # "executable" | "float" | "onnx"
    info: dict
    forward: object = None    # whole-model runtimes (onnx): ids [B, L] -> logits; head/layers are None


def load_float_model(path: Path, dtype: str | None = None, trust_remote_code: bool = False,
                     capture: bool = False) -> LoadedModel:
    """The float model of the HF checkpoint folder `path` (no alias resolution: runtime.load_model does it), its
    layers as the compiler captures them. `dtype`: the compute dtype (default: the checkpoint's).
    A dense Llama / Qwen2 / Qwen3 whose config ir/dense_layer.py understands gets that graph written from
    its config (`DenseFloatLayers`: transformers is not imported, nothing is exported; same graph, same
    bits); any other checkpoint, or `capture=True`, is captured through transformers (`CapturedFloatLayers`)."""
    from .loading import dtype_name, load_tokenizer, open_checkpoint
    ckpt = open_checkpoint(path, dtype, trust_remote_code, dense=not capture)
    info = {"dtype": dtype_name(ckpt.dtype), "num_layers": ckpt.num_layers, "model_type": ckpt.model_type}
    if ckpt.dense_spec is not None:
        from types import SimpleNamespace

        from .ir.dense_layer import inv_freq
        rotary = SimpleNamespace(inv_freq=inv_freq(ckpt.dense_spec), attention_scaling=1.0)  # "default" RoPE
        head, layers = head_from_checkpoint(ckpt, rotary), DenseFloatLayers(ckpt, ckpt.dense_spec)
    else:
        from .ir.capture import HFSkeleton
        skeleton = HFSkeleton(ckpt)
        head, layers = head_from_checkpoint(ckpt, skeleton.rotary), CapturedFloatLayers(skeleton)
    return LoadedModel(head, layers, load_tokenizer(path, trust_remote_code), "float", info)
