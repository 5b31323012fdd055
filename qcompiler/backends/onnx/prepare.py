"""Prepare a compiled executable graph for ONNX export: float32 layers and one whole-model module.

Contract:
- `float32_layer(module)` rewrites one decoder-layer GraphModule (a loaded executable program with its
  layer's tensors) in place so that it computes in float32: every bfloat16/float16 dtype argument of a
  node (casts, `_assert_tensor_metadata`, the `output_dtype` of `qc::*` ops) becomes float32 and every
  bfloat16/float16 parameter or buffer is converted by value (integer tensors, float32 scales and the
  int64-encoded `deq_scale` are left alone). ONNX Runtime's CPU provider has no bfloat16 MatMul or
  attention kernels, so the ONNX model computes in float32; see `lower.py` for the places where the
  exported ops still reproduce a model-dtype rounding of the NPU kernels.
- `WholeModel(head, layers)` is embedding -> rotary tables -> decoder layers -> final norm -> lm_head
  in float32, `forward(input_ids [B, L] int64) -> logits [B, L, V] float32`, positions 0..L-1 (no KV
  cache: the same contract as `qcompile run`, which recomputes the prefix).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_LOW = (torch.bfloat16, torch.float16)


def _f32(value):
    if isinstance(value, torch.dtype) and value in _LOW:
        return torch.float32
    if isinstance(value, (list, tuple)):
        return type(value)(_f32(v) for v in value)
    return value


def float32_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The layer computing in float32 (see the module docstring); returns `module`."""
    for gm in [m for m in module.modules() if isinstance(m, torch.fx.GraphModule)]:
        for node in gm.graph.nodes:
            node.args = _f32(node.args)
            node.kwargs = {k: _f32(v) for k, v in node.kwargs.items()}
        gm.recompile()
    with torch.no_grad():
        for _, p in list(module.named_parameters()):
            if p.dtype in _LOW:
                p.data = p.data.float()
        for mod in module.modules():
            for name, b in list(mod._buffers.items()):
                if b is not None and b.dtype in _LOW:
                    mod._buffers[name] = b.float()
    return module


class WholeModel(torch.nn.Module):
    """ids -> logits in float32, built from an executable graph's head and decoder layers."""

    def __init__(self, head, layers: list[torch.nn.Module], tied: bool):
        super().__init__()
        self.embed_weight = torch.nn.Parameter(head.embed_weight.float(), requires_grad=False)
        self.norm_weight = torch.nn.Parameter(head.norm_weight.float(), requires_grad=False)
        self.tied = tied
        if not tied:
            self.lm_head_weight = torch.nn.Parameter(head.lm_head_weight.float(), requires_grad=False)
        self.register_buffer("inv_freq", head.inv_freq.float().clone())
        self.attention_scaling = float(head.attention_scaling)
        self.eps = float(head.eps)
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = F.embedding(input_ids, self.embed_weight)
        # Head.rope in float32 (the executable graph casts the tables to the model dtype; here no cast).
        pos = torch.arange(input_ids.shape[1], dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        pe = (emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling)
        for layer in self.layers:
            h = layer(h, position_embeddings=pe)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.norm_weight * h
        return F.linear(h, self.embed_weight if self.tied else self.lm_head_weight)
