"""ir/graph_json.py: FX graphs to JSON and back, with an allow-list instead of pickle or code."""
import json
import operator

import pytest
import torch

from qcompiler.backends import ascend  # noqa: F401  registers torch.ops.qc.*
from qcompiler.errors import QCError
from qcompiler.ir import graph_json, meta


def _graph():
    """x -> qc.dynamic_quant -> getitem (tuple output), casts with dtype/device/layout, inf clamp, list args."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("lin.weight")
    q = g.call_function(torch.ops.qc.dynamic_quant.default, (x,))
    codes, scale = (g.call_function(operator.getitem, (q, i)) for i in (0, 1))
    scale = g.call_function(torch.ops.aten.unsqueeze.default, (scale, -1))
    back = g.call_function(torch.ops.aten.mul.Tensor, (g.call_function(torch.ops.aten.to.dtype, (codes, torch.float32)),
                                                       scale))
    g.call_function(torch.ops.aten._assert_tensor_metadata.default, (back,),
                    {"dtype": torch.float32, "device": torch.device("cpu"), "layout": torch.strided})
    y = g.call_function(torch.ops.aten.linear.default, (back, w))
    y = g.call_function(torch.ops.aten.clamp.default, (y, -float("inf"), 1e30))
    y = g.call_function(torch.ops.aten.view.default, (y, [2, -1]))
    g.output((y,))
    return g


def test_round_trip_computes_the_same():
    tensors = {"lin.weight": torch.randn(3, 4)}
    gm = torch.fx.GraphModule({"lin.weight": tensors["lin.weight"]}, _graph())
    doc = json.loads(json.dumps(graph_json.graph_to_json(gm.graph)))  # through text: only JSON survives
    loaded = graph_json.module_from_json(doc, tensors, "g.json")
    x = torch.randn(2, 5, 4)
    assert torch.equal(loaded(x)[0], gm(x)[0])
    assert [n.name for n in loaded.graph.nodes] == [n.name for n in gm.graph.nodes]
    assert {"float": "-inf"} in next(n for n in doc["nodes"] if n["target"] == "aten.clamp.default")["args"]


def test_loaded_module_generates_its_code_once_when_first_called(monkeypatch):
    """A loaded layer is rewritten before it runs (decode.py, layouts.py): its Python code is generated when it is
    first called, from the graph as it is then, not when built nor at each recompile() (startup: one code
    generation per layer instead of three). Fails with a plain GraphModule (one generation at build)."""
    tensors = {"lin.weight": torch.randn(3, 4)}
    gm = torch.fx.GraphModule({"lin.weight": tensors["lin.weight"]}, _graph())
    doc = json.loads(json.dumps(graph_json.graph_to_json(gm.graph)))
    made = []
    real = torch.fx.Graph.python_code
    monkeypatch.setattr(torch.fx.Graph, "python_code", lambda self, *a, **k: made.append(1) or real(self, *a, **k))
    loaded = graph_json.module_from_json(doc, tensors, "g.json")
    clamp = next(n for n in loaded.graph.nodes if n.target == torch.ops.aten.clamp.default)
    clamp.args = (clamp.args[0], -float("inf"), 0.0)  # a rewrite after loading, as prepare_layer does
    loaded.recompile()
    assert made == []
    x = torch.randn(2, 5, 4)
    got = loaded(x)[0]
    assert len(made) == 1 and torch.equal(got, gm(x)[0].clamp(max=0.0))
    loaded(x)
    assert len(made) == 1


def test_types_are_kept_as_tensor_type():
    class Layer(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x)
    ep = torch.export.export(Layer(4, 3), (torch.randn(2, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    gm = ep.module()
    for node in [n for n in gm.graph.nodes if n.op == "call_module"]:  # torch.export's input guards
        gm.graph.erase_node(node)
    doc = graph_json.graph_to_json(gm.graph)
    loaded = graph_json.module_from_json(doc, dict(gm.state_dict()), "g.json")
    x = next(n for n in loaded.graph.nodes if n.op == "placeholder")
    t = meta.tensor_type(x)
    assert t.dtype == torch.float32 and isinstance(t.shape[0], str) and t.shape[1] == 4
    assert all("type" in n for n in doc["nodes"] if n["op"] != "output")


@pytest.mark.parametrize("target", [torch.ops.aten.add_.Tensor, torch.ops.aten.from_file.default, print,
                                    lambda a: a])
def test_writer_refuses_what_the_reader_would_not_accept(target):
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(target, (x, x)))
    with pytest.raises(RuntimeError, match="allow-list"):
        graph_json.graph_to_json(g)


@pytest.mark.parametrize("name", ["import", "print", "__x", "self", "torch", "fx_pytree", "a b", "1a", "", 3])
def test_names_that_could_reach_code_are_refused(name):
    doc = {"format": graph_json.FORMAT, "version": graph_json.VERSION,
           "nodes": [{"name": name, "op": "placeholder", "target": "x"}, {"name": "output", "op": "output",
                                                                          "args": [{"node": name}]}]}
    with pytest.raises(QCError, match="g.json: node name"):
        graph_json.module_from_json(doc, {}, "g.json")


def test_every_aten_op_of_the_allow_list_exists_and_is_functional():
    """The allow-list names real ops, each with at least one overload that mutates nothing."""
    for name in sorted(graph_json.ATEN_OPS):
        packet = getattr(torch.ops.aten, name)
        functional = [o for o in packet.overloads() if not getattr(packet, o)._schema.is_mutable]
        assert functional, name


@pytest.mark.parametrize("targets", [["forward"], ["a", "a.b"], ["training"]])
def test_tensor_names_clashing_with_module_attributes_are_one_error(targets):
    nodes = [{"name": f"t{i}", "op": "get_attr", "target": t} for i, t in enumerate(targets)]
    doc = {"format": graph_json.FORMAT, "version": graph_json.VERSION,
           "nodes": nodes + [{"name": "output", "op": "output", "args": [{"tuple": [{"node": "t0"}]}]}]}
    with pytest.raises(QCError, match="g.json: cannot build the graph module"):
        graph_json.module_from_json(doc, {t: torch.zeros(1) for t in targets}, "g.json")
