"""dtype and shape of every node of a layer graph, inserted and lowered nodes included (for readers: dumps).

Passes insert nodes (quantize, quant_matmul, kv_quant, ...) without a FakeTensor `val`; `infer_types(gm)`
re-runs the graph on fake tensors: the placeholders' own FakeTensors from capture (so dimensions stay the
symbols torch.export chose, e.g. `s47`) and the module's tensors as static fakes, through every op's fake
(meta) kernel (`qc.*` ops get theirs from ir/qc_ops.py). Nothing is computed on real data, no
observer records anything (observers are identities here), and the graph and its meta are left as they
are, so a dump never changes what the compile writes.
"""
import torch
import torch.fx
from torch._guards import detect_fake_mode

from . import meta


def _type(value) -> meta.TensorType | None:
    if not isinstance(value, torch.Tensor):
        return None
    return meta.TensorType(value.dtype, tuple(str(d) if isinstance(d, torch.SymInt) else int(d) for d in value.shape))


class _FakeRun(torch.fx.Interpreter):
    def __init__(self, gm, mode):
        super().__init__(gm)
        self.mode = mode
        self.types: dict[torch.fx.Node, meta.TensorType] = {}
        self._fakes: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        if n.op == "call_module" and meta.OBSERVER in n.meta:
            out = self.env[n.args[0]]  # an observer passes its input through
        elif n.op == "call_module" and n.target == "_guards_fn":
            out = None  # torch.export's Python check of input shapes: no value
        elif n.op == "get_attr":
            if n.target not in self._fakes:
                self._fakes[n.target] = self.mode.from_tensor(self.fetch_attr(n.target), static_shapes=True)
            out = self._fakes[n.target]
        else:
            out = super().run_node(n)
        found = _type(out)
        if found is not None:
            self.types[n] = found
        return out


def infer_types(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, meta.TensorType]:
    """{node: TensorType} for every node whose value is one tensor. Nodes that already carry a type keep it
    (`meta.tensor_type`); when the graph cannot be run on fakes (no placeholder FakeTensors, an op without a
    fake kernel), only those known types are returned."""
    known = {n: t for n in gm.graph.nodes if (t := meta.tensor_type(n)) is not None}
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(inputs) if inputs and all(isinstance(v, torch.Tensor) for v in inputs) else None
    if mode is None:
        return known
    run = _FakeRun(gm, mode)
    try:
        with mode:
            run.run(*inputs)
    except Exception:  # a diagnostic: partial types are better than none, and never fail the compile
        pass
    return {**run.types, **known}
