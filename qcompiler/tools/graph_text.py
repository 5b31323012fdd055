"""Readable text of a layer graph: one line per node, with quantization specs and tensor shapes.

Used by `--dump` and `qcompile inspect`. Format:
    # title
    # header lines (the caller's: pass stats, tensor summary, ...)
    %name = target(args)   : dtype[shape]   # spec / observer
Every node shows its dtype and shape, nodes a pass inserted too (ir/type_prop.py). torch.export's
bookkeeping is left out (EXPORT_NOISE: its input-shape guard, `_assert_tensor_metadata`, and `sym_size`
nodes, whose uses print as the dimension's symbol, e.g. `s47`, or `%x.shape[0]`).
"""
import torch

from ..ir import meta
from ..ir.type_prop import infer_types

#: torch.export bookkeeping that computes nothing of the layer (targets by name)
EXPORT_NOISE = frozenset({"_guards_fn", "aten._assert_tensor_metadata", "aten._assert_scalar",
                          "aten.sym_size", "aten.sym_constrain_range_for_size"})


def _target(node) -> str:
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        ns = getattr(getattr(node.target, "_schema", None), "name", "")
        return ns.replace("::", ".") if ns else name
    return str(node.target)


def is_export_noise(node: torch.fx.Node) -> bool:
    return node.op in ("call_function", "call_module") and _target(node) in EXPORT_NOISE


def _size_ref(node: torch.fx.Node) -> str:
    """How a use of a hidden `sym_size` node prints: its symbol, else `%x.shape[d]`."""
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt):
        return str(val)
    if len(node.args) >= 2 and isinstance(node.args[0], torch.fx.Node):
        return f"%{node.args[0].name}.shape[{node.args[1]}]"
    return f"%{node.name}"


def _fmt_arg(a) -> str:
    if isinstance(a, torch.fx.Node):
        return _size_ref(a) if is_export_noise(a) else f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    return repr(a)


def _fmt_type(t: meta.TensorType | None) -> str:
    if t is None:
        return ""
    return f"{str(t.dtype).replace('torch.', '')}[{', '.join(map(str, t.shape))}]"


def node_line(node: torch.fx.Node, types: dict | None = None) -> str:
    if node.op == "placeholder":
        body = f"%{node.name} = input"
    elif node.op == "output":
        body = f"return {_fmt_arg(node.args[0])}"
    elif node.op == "get_attr":
        body = f"%{node.name} = param {node.target}"
    else:
        args = [_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()]
        body = f"%{node.name} = {_target(node)}({', '.join(args)})"
    notes = []
    if meta.LINEAR_NAME in node.meta:
        notes.append(node.meta[meta.LINEAR_NAME])
    if meta.QUANT_SPEC in node.meta:
        notes.append(node.meta[meta.QUANT_SPEC].describe())
    if meta.OBSERVER in node.meta:
        notes.append(f"observer {node.meta[meta.OBSERVER]}")
    if meta.LOWERED_FROM in node.meta:
        notes.append(f"lowered from {node.meta[meta.LOWERED_FROM]}")
    val = _fmt_type(types.get(node) if types is not None else meta.tensor_type(node))
    line = body + (f"   : {val}" if val else "")
    return line + (f"   # {'; '.join(notes)}" if notes else "")


def graph_text(gm: torch.fx.GraphModule, title: str = "", header: list[str] = ()) -> str:
    """The graph as text: `title` and `header` lines (written as `# ...` comments) first, then one line per
    node (export noise left out), then the module's tensors."""
    lines = [f"# {title}"] if title else []
    lines += [f"# {h}" if h else "#" for h in header]
    types = infer_types(gm)
    lines += [node_line(n, types) for n in gm.graph.nodes if not is_export_noise(n)]
    params = [(k, v) for k, v in list(gm.named_parameters()) + list(gm.named_buffers())]
    if params:
        lines.append("")
        lines.append("# tensors")
        for k, v in params:
            lines.append(f"#   {k}: {str(v.dtype).replace('torch.', '')}{list(v.shape)}")
    return "\n".join(lines) + "\n"
