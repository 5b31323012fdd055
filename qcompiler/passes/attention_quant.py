"""Shared machinery of the attention-quantization passes (kv8, fa3): match, calibrate, rewrite.

- `match_attention(gm, ctx, pass_name)`: the layer's one `aten.scaled_dot_product_attention` node, with
  its q/k/v inputs checked by dataflow: each must be computed (through reshapes, RoPE, earlier inserted
  quantize/dequantize nodes) from exactly one Linear, `*q_proj` / `*k_proj` / `*v_proj`, and the node
  must have no explicit mask. Anything else is a QCError naming the layer and what was found: a graph
  whose attention does not match is never silently skipped.
- `observe_absmax(gm, owner, attn, edges)`: `AbsMaxObserver` nodes on the given attention inputs. They
  see the calibrate pass's one calibration forward (calibration/forward.py): the pass queues a `PendingRewrite`
  whose `finish` reads them (`absmax_of`: per-head / per-channel absmax; several processes: the max over
  every rank's share, distributed.py) and replaces each by quantize/dequantize before anything downstream of it runs.
- `replace_with_qdq(...)`: `dequant(quant(x, scale), scale, dtype)` in place of one such observer, so on that
  attention input edge only (other readers of x keep the float value); the scale is a buffer of the graph
  named like its artifact tensor (`self_attn.k_proj.kv_cache_scale`), so the executable layer carries it.
"""
import operator
from collections import deque
from dataclasses import dataclass

import torch

from ..ir.model_dtype import engine_scale
from .. import distributed
from ..errors import QCError
from ..ir import meta
from ..ir.patterns import attention_nodes

# sdpa positional arguments: (query, key, value, attn_mask, dropout_p, is_causal)
Q, K, V = 0, 1, 2
EDGE_NAMES = {Q: "q_proj", K: "k_proj", V: "v_proj"}


@dataclass
class AttentionSite:
    node: torch.fx.Node
    prefix: str            # module path of the attention ("self_attn")
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


def _val(node):
    """The FakeTensor meta of `node`, or of the nearest first-argument ancestor that has one."""
    seen = 0
    while isinstance(node, torch.fx.Node) and seen < 16:
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            return v
        node = node.args[0] if node.args else None
        seen += 1
    return None


def _source_linears(node: torch.fx.Node) -> set[str]:
    """Names of the Linears whose outputs reach `node` without passing through another Linear."""
    found, todo, seen = set(), deque([node]), set()
    while todo:
        n = todo.popleft()
        if n in seen:
            continue
        seen.add(n)
        name = n.meta.get(meta.LINEAR_NAME) or n.meta.get(meta.LOWERED_FROM)
        if name is not None and n.op == "call_function" and n.target is not operator.getitem:
            found.add(name)
            continue
        todo.extend(n.all_input_nodes)
    return found


def match_attention(gm: torch.fx.GraphModule, ctx, pass_name: str) -> AttentionSite:
    where = f"{pass_name}: layer {ctx.index}"
    nodes = attention_nodes(gm)
    if len(nodes) != 1:
        raise QCError(f"{where}: expected one scaled_dot_product_attention node in the layer graph, found "
                      f"{len(nodes)} (only dense causal attention captured with sdpa is supported)")
    node = nodes[0]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if mask is not None:
        raise QCError(f"{where}: attention {node.name} has an explicit mask ({mask}); expected plain causal attention")
    prefix = None
    for index, proj in EDGE_NAMES.items():
        if len(node.args) <= index or not isinstance(node.args[index], torch.fx.Node):
            raise QCError(f"{where}: attention {node.name} has no {proj.split('_')[0]} input node")
        sources = _source_linears(node.args[index])
        if len(sources) != 1 or not next(iter(sources)).endswith(proj):
            raise QCError(f"{where}: the {proj.split('_')[0]} input of attention {node.name} is computed from "
                          f"Linears {sorted(sources) or 'none'}; expected exactly one *.{proj}")
        prefix = next(iter(sources)).rsplit(".", 1)[0]
    vals = [_val(node.args[i]) for i in (Q, K, V)]
    if any(v is None or v.dim() != 4 for v in vals):
        raise QCError(f"{where}: attention {node.name}: q/k/v shapes are unknown or not [B, heads, L, head_dim]")
    try:
        heads, kv_heads, head_dim = int(vals[0].shape[1]), int(vals[1].shape[1]), int(vals[1].shape[3])
    except (TypeError, ValueError):
        raise QCError(f"{where}: attention {node.name}: head counts are not static") from None
    return AttentionSite(node=node, prefix=prefix, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                         dtype=vals[1].dtype)


class AbsMaxObserver(torch.nn.Module):
    """max |x| over every dim except `keep` (heads: (1,); channels: (1, 3)) of [B, N, L, D] inputs."""

    def __init__(self, keep: tuple[int, ...]):
        super().__init__()
        self.keep = keep
        self.amax = None

    def forward(self, x):
        dims = [d for d in range(x.dim()) if d not in self.keep]
        a = x.detach().abs().amax(dim=dims).float()  # |x| and max are exact in x's dtype: no float32 copy of x
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        return x


def observe_absmax(gm: torch.fx.GraphModule, owner: str, attn: torch.fx.Node,
                   edges: dict[int, tuple[int, ...]]) -> dict[int, torch.fx.Node]:
    """{edge index: observer node}: an `AbsMaxObserver` (keeping the given dims) on each given input edge of
    `attn`, reading what the edge read. The statistics come from the calibration forward (calibration/forward.py);
    the caller queues the rewrite that reads them (`ctx.defer`) and replaces each observer (`replace_with_qdq`)."""
    added = {}
    for i, keep in edges.items():
        name = f"qc_{owner}_absmax_{i}"
        gm.add_submodule(name, AbsMaxObserver(keep))
        src = attn.args[i]
        with gm.graph.inserting_before(attn):
            obs = gm.graph.call_module(name, (src,))
        obs.meta[meta.OBSERVER] = name  # an identity to readers of the graph (type propagation, dumps)
        if "val" in src.meta:
            obs.meta["val"] = src.meta["val"]
        _set_arg(attn, i, obs)
        added[i] = obs
    gm.recompile()
    return added


def absmax_of(gm: torch.fx.GraphModule, ctx, observers: dict[int, torch.fx.Node]) -> dict[int, torch.Tensor]:
    """{edge index: absmax} the observers saw, over every rank's share (several processes: exact max)."""
    result = {}
    for i, obs in observers.items():
        amax = gm.get_submodule(obs.target).amax
        if amax is None:
            raise QCError(f"layer {ctx.index}: no calibration data reached the attention")
        result[i] = distributed.all_max(amax)
    return result


def scale_from_absmax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Symmetric int8 scale absmax / 127 rounded to the model dtype, as float32 (both engines hold the C8 and FA
    scales in the model dtype: `encode.ENGINE_MODEL_DTYPE`); an all-zero channel/head gets 1 (any scale codes 0
    as 0). The kernels quantize against this rounded value, so it is what the cache codes mean."""
    a = amax.float()
    return engine_scale(torch.where(a > 0, a / 127, torch.ones_like(a)), dtype)


def _set_arg(node: torch.fx.Node, index: int, value) -> None:
    args = list(node.args)
    args[index] = value
    node.args = tuple(args)


def set_buffer(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Register `value` as a buffer at dotted `target`, creating empty container modules on the way."""
    mod = gm
    *path, attr = target.split(".")
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    mod._parameters.pop(attr, None)
    mod._buffers.pop(attr, None)
    mod.register_buffer(attr, value)


def replace_with_qdq(gm, obs: torch.fx.Node, scale_target: str, scale: torch.Tensor, quant_op, dequant_op,
                     dtype: torch.dtype) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Replace observer node `obs` (placed by `observe_absmax` on one attention input edge) by
    `dequant(quant(x, scale), scale, dtype)` of the value it observed, at its place: only that edge reads the
    result (other readers of x keep the float value). The scale becomes a buffer of the graph named like its
    artifact tensor. Returns (quant node, dequant node); the observer and its module are removed."""
    src = obs.args[0]
    set_buffer(gm, scale_target, scale)
    with gm.graph.inserting_before(obs.next):
        s = gm.graph.get_attr(scale_target)
        q = gm.graph.call_function(quant_op, (src, s))
        dq = gm.graph.call_function(dequant_op, (q, s, dtype))
    val = src.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dtype == dtype:
        dq.meta["val"] = val  # same shape and dtype as the float input it replaces
    obs.replace_all_uses_with(dq)
    target = obs.target
    gm.graph.erase_node(obs)
    delattr(gm, target)
    return q, dq
