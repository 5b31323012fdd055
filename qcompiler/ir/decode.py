"""Decode graph: a layer graph rewritten to read and extend a KV cache (token-by-token generation).

`build_decode_graph(gm, dtype)` copies a (captured or lowered) decoder-layer graph and replaces its one
`aten.scaled_dot_product_attention` node by `qc.cached_attention` (ir/qc_ops.py):

    forward(hidden [B, L, H], cos [1, L, D], sin [1, L, D], k_cache [B, KVH, S, D], v_cache [B, KVH, S, D],
            cache_pos: int64 scalar tensor) -> (hidden_out, k_new [B, KVH, L, D], v_new [B, KVH, L, D])

The L new tokens sit at absolute positions cache_pos..cache_pos+L-1 (cos/sin must be those positions'
tables); `k_cache[:, :, :cache_pos]` holds the earlier tokens. The program does not write the cache: it
returns the new rows in storage form and the caller stores them at [cache_pos, cache_pos + L) (static
buffers, no mutation inside the graph). Storage form: when kv8 put
`qc.kv_dequant(qc.kv_quant(k, s), s)` on an attention input, the cache holds the int8 codes and the
attention dequantizes them (`CacheSpec` says int8); otherwise the model dtype. Everything else in the
layer (Linears, RoPE, fa3's quantize/dequantize of Q/K/V) is kept as is, so a cached step computes what
the recomputing graph computes for those tokens.
Where it runs: at load time, on the layer programs of OUT/executable (executable.ExecutableLayers.decode) or
on freshly captured float layers, so every compiled OUT has a decode step without a second exported
program. (Re-exporting the rewritten graph with torch.export was tried: the export of a short sample pins
the sequence length through a stride guard of the `_to_copy` decomposition, e.g. `16*seq < 256`, so one
program could not serve both a long prefill and 1-token steps.)
Limits: one causal attention without explicit mask per layer (what capture produces); the new
placeholders drop the captured graph's pytree signature (the decode step takes flat arguments).
"""
from dataclasses import asdict, dataclass

import torch

from . import qc_ops  # noqa: F401  defines torch.ops.qc.cached_attention, kv_dequant
from ..errors import QCError
from . import graph_json, meta

KV_DEQUANT = torch.ops.qc.kv_dequant.default


@dataclass(frozen=True)
class CacheSpec:
    """One layer's cache buffers: [B, kv_heads, S, head_dim] of k_dtype / v_dtype (names as torch dtypes)."""
    kv_heads: int
    head_dim: int
    k_dtype: str
    v_dtype: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "CacheSpec":
        return cls(int(d["kv_heads"]), int(d["head_dim"]), str(d["k_dtype"]), str(d["v_dtype"]))

    def buffers(self, batch: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        return (torch.zeros(shape, dtype=getattr(torch, self.k_dtype)),
                torch.zeros(shape, dtype=getattr(torch, self.v_dtype)))


def _shape_of(node) -> tuple | None:
    """Shape of `node`'s value (or of its nearest first-argument ancestor's): captured or loaded graphs."""
    for _ in range(16):
        if not isinstance(node, torch.fx.Node):
            return None
        t = meta.tensor_type(node)
        if t is not None:
            return t.shape
        node = node.args[0] if node.args else None
    return None


def _storage(node: torch.fx.Node, dtype: torch.dtype):
    """(node whose value goes into the cache, its kv scale node or None, the cache dtype name)."""
    if node.op == "call_function" and node.target == KV_DEQUANT:
        return node.args[0], node.args[1], "int8"
    return node, None, str(dtype).replace("torch.", "")


def build_decode_graph(gm: torch.fx.GraphModule, dtype: torch.dtype) -> tuple[torch.fx.GraphModule, CacheSpec]:
    graph = torch.fx.Graph()
    env: dict = {}
    outputs = graph.graph_copy(gm.graph, env)
    outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    if len(outs) != 1:
        raise QCError(f"decode graph: the layer graph has {len(outs)} outputs, expected 1 (the hidden state)")
    target = torch.ops.aten.scaled_dot_product_attention.default
    nodes = [n for n in graph.nodes if n.op == "call_function" and n.target == target]
    if len(nodes) != 1:
        raise QCError(f"decode graph: expected one scaled_dot_product_attention node, found {len(nodes)}")
    attn = nodes[0]
    args = list(attn.args) + [None, 0.0, False][len(attn.args) - 3:]
    mask, dropout, causal = args[3], args[4], attn.kwargs.get("is_causal", args[5])
    if mask is not None or dropout or not causal:
        raise QCError(f"decode graph: attention {attn.name} is not plain causal attention "
                      f"(mask {mask}, dropout {dropout}, is_causal {causal})")
    q, k, v = args[:3]
    k_store, k_scale, k_dtype = _storage(k, dtype)
    v_store, v_scale, v_dtype = _storage(v, dtype)
    shape = _shape_of(k_store)
    if shape is None or len(shape) != 4 or not all(isinstance(shape[d], int) for d in (1, 3)):
        raise QCError(f"decode graph: the key input of {attn.name} has no known [B, KVH, L, D] shape")
    spec = CacheSpec(int(shape[1]), int(shape[3]), k_dtype, v_dtype)
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]  # new inputs after the layer's own
    added = []
    for name in ("k_cache", "v_cache", "cache_pos"):
        with graph.inserting_after(last):
            last = graph.placeholder(name)
        added.append(last)
    k_cache, v_cache, pos = added
    with graph.inserting_before(attn):
        new = graph.call_function(torch.ops.qc.cached_attention.default,
                                  (q, k_store, v_store, k_cache, v_cache, pos, k_scale, v_scale,
                                   attn.kwargs.get("scale"), dtype))
    attn.replace_all_uses_with(new)
    graph.erase_node(attn)
    for old in (k, v):
        if old.op == "call_function" and old.target == KV_DEQUANT and not old.users:
            graph.erase_node(old)
    graph.output((outs[0], k_store, v_store))
    graph.lint()
    dgm = graph_json.lazy_graph_module(gm, graph)  # its code is generated once, after prepare_layer
    return dgm, spec

