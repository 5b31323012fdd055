"""aten op nodes rewritten to torch's Python bindings (backends/ascend/direct_calls.py): each rewrite must compute
the overload it replaces, bit for bit (the same kernel: a graph of every mapped op on bf16 / float32 tensors,
before and after), and slices must be the same views. Tolerance: none."""
import operator

import pytest
import torch

from qcompiler.backends.ascend import direct_calls

A = torch.ops.aten


def _bits(t):
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t.view(torch.int32)


def _layer_like(x, w, cos):
    """A captured layer's kind of graph: every op an aten overload (as torch.export writes them)."""
    b, t = A.sym_size.int(x, 0), A.sym_size.int(x, 1)
    h = A.to.dtype(x, torch.float32)
    h = A.mul.Tensor(h, A.rsqrt.default(A.add.Tensor(A.mean.dim(A.pow.Tensor_Scalar(h, 2), [-1], True), 1e-6)))
    h = A.mul.Tensor(A.to.dtype(h, torch.bfloat16), w)
    q = A.transpose.int(A.view.default(h, [b, t, -1, 4]), 1, 2)
    rot = A.cat.default([A.neg.default(A.slice.Tensor(q, 3, 2, 2 ** 63 - 1)), A.slice.Tensor(q, 3, 0, 2)], -1)
    q = A.sub.Tensor(A.add.Tensor(A.mul.Tensor(q, A.unsqueeze.default(cos, 1)), rot), A.div.Tensor(q, 3))
    y = A.silu.default(A.reshape.default(A.transpose.int(q, 1, 2), [b, t, -1]))
    wide = A.contiguous.default(A.expand.default(w, [8, 8]))
    return A.sub.Tensor(A.linear.default(y, wide), 2.5), A.slice.Tensor(A.slice.Tensor(q, 1, 1), -1, 0, 4, 2)


def test_rewritten_graph_computes_the_same_bits():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 8, generator=g) * 5).to(torch.bfloat16)
    x[0, 0, 0] = -0.0
    w = torch.randn(8, generator=g).to(torch.bfloat16)
    cos = torch.randn(2, 3, 4, generator=g).to(torch.bfloat16)
    gm = torch.fx.symbolic_trace(_layer_like)
    before = gm(x, w, cos)
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    mapped = set(direct_calls._FUNCTIONS) | set(direct_calls._METHODS) | {A.slice.Tensor}
    assert ops == mapped, ops ^ mapped  # the graph exercises every rewrite
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    assert direct_calls.rewrite(gm) == calls
    gm.recompile()
    assert not any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
    after = gm(x, w, cos)
    assert all(a.shape == b.shape and a.stride() == b.stride() and torch.equal(_bits(a), _bits(b))
               for a, b in zip(before, after))


@pytest.mark.parametrize("args", [(0,), (1, 1), (1, -2), (2, 0, 3), (2, 1, 2 ** 63 - 1), (-1, 1, 100, 2),
                                  (1, None, 2), (0, -5, -1, 3)])
def test_slice_rewrite_is_the_same_view(args):
    x = torch.arange(4 * 5 * 6).view(4, 5, 6)
    graph = torch.fx.Graph()
    node = graph.call_function(A.slice.Tensor, (graph.placeholder("x"), *args))
    index = direct_calls._slice_index(node)
    assert index is not None
    want, got = A.slice.Tensor(x, *args), operator.getitem(x, index)
    assert got.shape == want.shape and got.stride() == want.stride()
    assert got.storage_offset() == want.storage_offset() and torch.equal(got, want)


def test_slice_with_a_negative_dim_other_than_last_keeps_its_op():
    graph = torch.fx.Graph()
    node = graph.call_function(A.slice.Tensor, (graph.placeholder("x"), -2, 0, 1))
    assert direct_calls._slice_index(node) is None
