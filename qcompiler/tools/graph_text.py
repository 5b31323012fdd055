"""Readable text of a layer graph: one line per node, with quantization specs and tensor shapes.

Used by `--dump` and `qcompile inspect`. Format:
    %name = target(args)   : dtype[shape]   # spec / observer
"""
import torch

from ..ir import meta


def _fmt_arg(a) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    return repr(a)


def _target(node) -> str:
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        ns = getattr(getattr(node.target, "_schema", None), "name", "")
        return ns.replace("::", ".") if ns else name
    return str(node.target)


def _val(node) -> str:
    t = meta.tensor_type(node)
    if t is None:
        return ""
    return f"{str(t.dtype).replace('torch.', '')}[{', '.join(map(str, t.shape))}]"


def node_line(node: torch.fx.Node) -> str:
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
    val = _val(node)
    line = body + (f"   : {val}" if val else "")
    return line + (f"   # {'; '.join(notes)}" if notes else "")


def graph_text(gm: torch.fx.GraphModule, title: str = "") -> str:
    lines = [f"# {title}"] if title else []
    lines += [node_line(n) for n in gm.graph.nodes]
    params = [(k, v) for k, v in list(gm.named_parameters()) + list(gm.named_buffers())]
    if params:
        lines.append("")
        lines.append("# tensors")
        for k, v in params:
            lines.append(f"#   {k}: {str(v.dtype).replace('torch.', '')}{list(v.shape)}")
    return "\n".join(lines) + "\n"
