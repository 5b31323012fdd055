"""aten op nodes of a prepared layer called through torch's Python bindings (layouts.prepare_layer, issue 16).

A captured layer calls every tensor op as an `OpOverload` (`torch.ops.aten.mul.Tensor(a, b)`), whose Python
`__call__` costs 1-6 us more than the binding of the same op (`torch.mul(a, b)`: measured on this 2-core AVX2
host, one thread: view 7.3 vs 2.8 us, to.dtype 10.3 vs 3.8, cat 4.7 vs 2.2). A decode step of a 30-layer model
makes ~1,500 of them, which is most of what a small model's step costs beyond its GEMVs. The bindings dispatch
the very overload the node names (same schema, same arguments, so the same ATen kernel and the same bits):
`torch.mul(tensor, 2.0)` parses the number as the wrapped scalar `aten.mul.Tensor` gets from the graph, and
`x.to(dtype)` is `aten.to.dtype`. Only the overloads in `_FUNCTIONS` / `_METHODS` are rewritten, each to the
binding whose signature is that overload's; any other node keeps its op. tests/backends/ascend/test_layouts.py
compares prepared layers and decode steps with the op graph bit for bit.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

_A = torch.ops.aten

#: overload -> torch function taking the same positional and keyword arguments
_FUNCTIONS = {
    _A.add.Tensor: torch.add,
    _A.sub.Tensor: torch.sub,
    _A.mul.Tensor: torch.mul,
    _A.div.Tensor: torch.div,
    _A.neg.default: torch.neg,
    _A.pow.Tensor_Scalar: torch.pow,
    _A.rsqrt.default: torch.rsqrt,
    _A.mean.dim: torch.mean,
    _A.cat.default: torch.cat,
    _A.transpose.int: torch.transpose,
    _A.unsqueeze.default: torch.unsqueeze,
    _A.reshape.default: torch.reshape,
    _A.silu.default: F.silu,
    _A.linear.default: F.linear,
}
#: overload -> Tensor method taking the same arguments after self
_METHODS = {
    _A.view.default: "view",
    _A.to.dtype: "to",
    _A.sym_size.int: "size",
    _A.expand.default: "expand",
    _A.contiguous.default: "contiguous",
}
_MAX_END = 2 ** 63 - 1  # aten.slice's "to the end"


def _slice_index(node) -> tuple | None:
    """`x[index]` equal to `aten.slice.Tensor(x, dim=0, start=None, end=None, step=1)` (the same view: basic
    indexing, one slice on that dim, full slices on the dims before it), for int (or None) arguments and dim >= 0
    or -1; else None."""
    if node.kwargs or not 1 <= len(node.args) <= 5:
        return None
    _, dim, start, end, step = tuple(node.args) + (0, None, None, 1)[len(node.args) - 1:]
    if not all(v is None or isinstance(v, int) for v in (start, end)) or not isinstance(dim, int) or (
            not isinstance(step, int)) or not (dim >= 0 or dim == -1):
        return None
    part = slice(start, None if end == _MAX_END else end, step)
    return (Ellipsis, part) if dim == -1 else (slice(None),) * dim + (part,)


def rewrite(gm: torch.fx.GraphModule) -> int:
    """Rewrite `gm`'s nodes of the overloads above in place (call_function of the binding, call_method, or a
    slicing `getitem`); returns how many were rewritten. The caller recompiles."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.kwargs:  # every rewrite passes positional arguments only
            continue
        target = node.target
        if target in _FUNCTIONS:
            node.target = _FUNCTIONS[target]
        elif target in _METHODS:
            node.op, node.target = "call_method", _METHODS[target]
        elif target is _A.slice.Tensor and (index := _slice_index(node)) is not None:
            node.target, node.args = operator.getitem, (node.args[0], index)
        else:
            continue
        count += 1
    return count
