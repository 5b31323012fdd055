"""Graph verifier, run by the pass manager after every pass that modified a graph.

Checks: the FX graph lints (topological order, defined inputs); every call_function target is an aten
or qc op overload or operator.getitem; every get_attr / call_module names an existing attribute /
submodule; the graph has exactly one output. Raises AssertionError-free `GraphInvalid` with the node.
"""
import operator

import torch


class GraphInvalid(Exception):
    pass


def _has_attr(gm: torch.nn.Module, target: str) -> bool:
    obj = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def verify(gm: torch.fx.GraphModule) -> None:
    try:
        gm.graph.lint()
    except Exception as e:
        raise GraphInvalid(f"graph lint failed: {e}") from e
    outputs = 0
    for node in gm.graph.nodes:
        if node.op == "call_function":
            ok = node.target is operator.getitem or isinstance(node.target, torch._ops.OpOverload)
            if not ok:
                raise GraphInvalid(f"node {node.name}: target {node.target} is not an op overload")
        elif node.op == "get_attr" and not _has_attr(gm, node.target):
            raise GraphInvalid(f"node {node.name}: get_attr {node.target} does not exist")
        elif node.op == "call_module":
            try:
                gm.get_submodule(node.target)
            except AttributeError:
                raise GraphInvalid(f"node {node.name}: submodule {node.target} does not exist") from None
        elif node.op == "output":
            outputs += 1
    if outputs != 1:
        raise GraphInvalid(f"graph has {outputs} output nodes, expected 1")
