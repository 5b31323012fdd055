"""Graph queries shared by passes: Linears, their shared inputs, the attention node.

Everything is found on the captured graph (node targets and weight names), never on eager modules.
"""
from collections import defaultdict
from dataclasses import dataclass

import torch

from . import meta
from .capture import linear_nodes


@dataclass
class LinearSite:
    node: torch.fx.Node          # the aten.linear node
    name: str                    # path inside the layer: "self_attn.q_proj"
    input: torch.fx.Node         # activation input
    weight: torch.fx.Node        # get_attr of the weight
    bias: torch.fx.Node | None   # get_attr of the bias, or None


def linear_sites(gm: torch.fx.GraphModule) -> list[LinearSite]:
    """The Linears passes may transform, in graph order: every `aten.linear` but MoE routers (meta.ROUTER)."""
    sites = []
    for node in linear_nodes(gm):
        if node.meta.get(meta.ROUTER):
            continue
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        sites.append(LinearSite(node=node, name=node.meta[meta.LINEAR_NAME], input=node.args[0],
                                weight=node.args[1], bias=bias))
    return sites


def shared_input_groups(sites: list[LinearSite]) -> list[list[LinearSite]]:
    """Linears grouped by the node they read (q/k/v read one norm output, gate/up another), in graph order."""
    groups: dict[torch.fx.Node, list[LinearSite]] = defaultdict(list)
    for s in sites:
        groups[s.input].append(s)
    return list(groups.values())


def attention_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    target = torch.ops.aten.scaled_dot_product_attention.default
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def get_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    """The parameter or buffer a get_attr target names."""
    mod_path, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(mod_path) if mod_path else gm, attr)


def set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Store `value` as a buffer at `target` (replacing a parameter or buffer of that name)."""
    mod_path, _, attr = target.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    mod._parameters.pop(attr, None)
    mod._buffers.pop(attr, None)
    mod.register_buffer(attr, value)


def replace_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor, create: bool = False) -> None:
    """Rebind the parameter (or buffer) `target` to `value`, cast to its dtype, same shape (ValueError otherwise);
    it keeps its kind and its place among the module's tensors. Never written in place: captured weights may be
    backed by the checkpoint's files. `create`: a `target` that does not exist yet becomes a new parameter of
    `value`'s dtype. The one setter of float transforms (lowering's `set_tensor` stores tensors of any shape)."""
    mod_path, _, attr = target.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    if create and attr not in mod._parameters and attr not in mod._buffers:
        mod.register_parameter(attr, torch.nn.Parameter(value.detach().contiguous(), requires_grad=False))
        return
    old = get_tensor(gm, target)
    if tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"{target}: new shape {list(value.shape)} != {list(old.shape)}")
    value = value.detach().to(old.dtype).contiguous()
    if attr in mod._parameters:
        mod._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def prune_unused_tensors(gm: torch.fx.GraphModule) -> None:
    """Drop dead nodes, then parameters/buffers that no get_attr node reads any more."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k, _ in gm.named_parameters()] + [k for k, _ in gm.named_buffers()]:
        if name not in used:
            mod_path, _, attr = name.rpartition(".")
            mod = gm.get_submodule(mod_path) if mod_path else gm
            mod._parameters.pop(attr, None)
            mod._buffers.pop(attr, None)
