"""FX graphs as JSON: a serialization that loads without unpickling or running anything from the file.

    graph_to_json(graph) -> dict                      (writer; RuntimeError for a target it cannot name)
    module_from_json(doc, tensors, source, codegen)   (reader; QCError naming `source` for anything else)

Why: torch.export's `.pt2` loader unpickles, so a crafted file runs its payload on load. Here a graph is
plain JSON: a list of nodes, each `{"name", "op", "target", "args", "kwargs", "type"}`, and the tensors
come from safetensors files the caller reads (`tensors`: get_attr target -> tensor).

Node encoding:
- op: placeholder | get_attr | call_function | output (nothing else is accepted).
- name, placeholder target: Python identifiers that are no keyword, builtin, dunder or name of the
  generated code's own globals (`RESERVED`), unique; get_attr target: dotted such identifiers (after the first, a part may
  also be a decimal ModuleList index: MoE experts) that name a tensor in `tensors`; kwargs keys: parameter names of the op's schema.
- call_function target: a name from the allow-list, resolved to the object by lookup (never by import
  or eval): `aten.<op>.<overload>` for the ops in `ATEN_OPS` (pure tensor math and shape ops: what
  torch.export produces for the supported decoder layers, plus close kin), `qc.<op>.<overload>` (our
  op vocabulary, ir/qc_ops.py), and `PYTHON_FUNCTIONS` (operator.getitem, SymInt arithmetic).
  Overloads that mutate an input are refused.
- args / kwargs values: null, bool, int, finite float, str; `{"node": name}` (an earlier node);
  `{"tuple": [...]}`, `[...]`; `{"float": "inf"|"-inf"|"nan"}`; `{"dtype"|"layout"|"memory_format": name}`
  (looked up among torch's own objects of that type); `{"device": "cpu"|"npu:0"|...}`.
- type (optional, for readers such as ir/decode.py and tools/graph_text.py that need shapes):
  `{"dtype": name, "shape": [int | symbol]}` or a list of those; stored as `meta.TENSOR_TYPE`.
Only these objects reach the Python code torch.fx generates for the module (constants through `repr`,
targets as globals registered by fx), so nothing in the file can inject code. Node metadata other than
the type (stack traces with absolute paths of the Python install, module paths) is not written.
Limits: flat graphs (the caller supplies the calling convention through `codegen`); no call_module /
call_method nodes (the writer's caller removes torch.export's `_guards_fn` input checks first).
"""
from __future__ import annotations

import builtins
import keyword
import math
import operator
import re
from pathlib import Path

import torch

from ..errors import QCError
from . import meta
from . import qc_ops  # noqa: F401  the qc namespace resolves when a graph is read (kernels: a backend)

FORMAT = "qcompiler-fx-graph"
VERSION = 1

#: aten op packets a graph may call (every non-mutating overload of each).
ATEN_OPS = frozenset({
    # what torch.export produces for Llama / Qwen2 / Qwen3 decoder layers and our passes
    "_assert_tensor_metadata", "add", "cat", "linear", "mean", "mul", "neg", "pow", "reshape", "rsqrt",
    "scaled_dot_product_attention", "silu", "slice", "sym_size", "to", "transpose", "unsqueeze", "view",
    # close kin (other activations, casts, shape and reduction ops of the same architectures' variants)
    "_assert_scalar", "_softmax", "_to_copy", "_unsafe_view", "abs", "addmm", "alias", "amax", "amin",
    "arange", "baddbmm", "bmm", "ceil", "chunk", "clamp", "clamp_max", "clamp_min", "clone", "contiguous",
    "cos", "detach", "div", "dropout", "embedding", "eq", "exp", "expand", "expand_as", "flatten", "floor",
    "full", "full_like", "ge", "gelu", "gt", "index_select", "layer_norm", "le", "lift_fresh_copy", "log",
    "logical_and", "logical_not", "lt", "masked_fill", "matmul", "max", "maximum", "min", "minimum", "mm",
    "ne", "new_ones", "new_zeros", "ones", "ones_like", "permute", "reciprocal", "relu", "repeat",
    "repeat_interleave", "rms_norm", "round", "scalar_tensor", "select", "sigmoid", "sign", "sin", "softmax",
    "split", "split_with_sizes", "sqrt", "squeeze", "sub", "sum", "sym_constrain_range_for_size", "sym_numel",
    "sym_stride", "t", "tanh", "topk", "tril", "triu", "type_as", "unflatten", "view_as", "where", "zeros",
    "zeros_like",
})
#: op namespaces resolved through torch.ops: aten (restricted to ATEN_OPS) and our own vocabulary (ir/qc_ops.py).
OP_NAMESPACES = ("aten", "qc")
#: Python callables torch.export leaves in graphs (tuple indexing, SymInt arithmetic).
PYTHON_FUNCTIONS = {
    "operator.getitem": operator.getitem,
    "operator.add": operator.add, "operator.sub": operator.sub, "operator.mul": operator.mul,
    "operator.floordiv": operator.floordiv, "operator.truediv": operator.truediv, "operator.mod": operator.mod,
    "operator.neg": operator.neg, "operator.eq": operator.eq, "operator.ne": operator.ne,
    "operator.lt": operator.lt, "operator.le": operator.le, "operator.gt": operator.gt, "operator.ge": operator.ge,
    "torch.sym_max": torch.sym_max, "torch.sym_min": torch.sym_min, "torch.sym_float": torch.sym_float,
    "torch.sym_int": torch.sym_int, "torch.sym_not": torch.sym_not,
}
_PYTHON_NAMES = {id(f): name for name, f in PYTHON_FUNCTIONS.items()}

#: torch's own objects of each constant type, by name (looked up, never evaluated).
_CONSTANTS = {kind: {n: getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n, None), cls)}
              for kind, cls in (("dtype", torch.dtype), ("layout", torch.layout),
                                ("memory_format", torch.memory_format))}
_CONSTANT_NAMES = {kind: {v: n for n, v in table.items()} for kind, table in _CONSTANTS.items()}
_DEVICE = re.compile(r"^(cpu|meta|npu|cuda)(:\d{1,4})?$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")
_SYMBOL = re.compile(r"^[A-Za-z0-9_ +\-*/()]{1,64}$")
#: names the generated forward() itself uses (fx's globals and the module argument).
#: a decimal ModuleList index inside a dotted tensor name (torch.fx emits `getattr(m, "0")` for it)
_INDEX = re.compile(r"(0|[1-9][0-9]{0,8})\Z")
RESERVED = frozenset({"self", "torch", "fx_pytree", "pytree", "operator", "device", "inf", "nan", "NoneType",
                      "math", "builtins"})
_OPS = ("placeholder", "get_attr", "call_function", "output")
_NODE_KEYS = {"name", "op", "target", "args", "kwargs", "type"}


class _Bad(Exception):
    """A malformed graph file (turned into one QCError naming the file)."""


# ------------------------------------------------------------------------------------------------ writing

def target_name(target) -> str:
    """The file name of a call_function target; RuntimeError when the format cannot carry it (a new op in a
    pass: add it to ATEN_OPS if it is pure tensor math)."""
    if isinstance(target, torch._ops.OpOverload):
        ns, _, packet = target._schema.name.partition("::")
        name = f"{ns}.{packet}.{target._overloadname}"
        if ns in OP_NAMESPACES and (ns != "aten" or packet in ATEN_OPS) and not target._schema.is_mutable:
            return name
        raise RuntimeError(f"executable graph: op {name} is not on the allow-list of ir/graph_json.py "
                           f"(ATEN_OPS / OP_NAMESPACES); add it there if it is a pure tensor op")
    name = _PYTHON_NAMES.get(id(target))
    if name is None:
        raise RuntimeError(f"executable graph: call target {target!r} is not on the allow-list of "
                           f"ir/graph_json.py (PYTHON_FUNCTIONS)")
    return name


def _encode(value):
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, torch.device):
        return {"device": str(value)}
    for kind, names in _CONSTANT_NAMES.items():
        if value in names and isinstance(value, type(next(iter(names)))):
            return {kind: names[value]}
    raise RuntimeError(f"executable graph: cannot serialize argument {value!r} ({type(value).__name__})")


def _type_of(val):
    if isinstance(val, torch.Tensor):
        return {"dtype": _CONSTANT_NAMES["dtype"][val.dtype],
                "shape": [str(d) if isinstance(d, torch.SymInt) else int(d) for d in val.shape]}
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return [_type_of(v) for v in val]
    return None


def _checked(check, text, what):
    """The writer refuses what the reader would refuse (else a compile would write an unloadable OUT)."""
    try:
        return check(text, what)
    except _Bad as e:
        raise RuntimeError(f"executable graph: {e}") from None


def graph_to_json(graph: torch.fx.Graph) -> dict:
    """The JSON document of a flat graph (module docstring); RuntimeError for what the format cannot hold."""
    nodes = []
    for node in graph.nodes:
        if node.op not in _OPS:
            raise RuntimeError(f"executable graph: node {node.name} is a {node.op}; only {', '.join(_OPS)}")
        entry = {"name": _checked(_identifier, node.name, "node name"), "op": node.op}
        if node.op == "call_function":
            entry["target"] = target_name(node.target)
        elif node.op != "output":
            entry["target"] = _checked(_identifier if node.op == "placeholder" else _dotted, str(node.target),
                                       node.op)
        if node.args:
            entry["args"] = [_encode(a) for a in node.args]
        if node.kwargs:
            entry["kwargs"] = {k: _encode(v) for k, v in node.kwargs.items()}
        kind = _type_of(node.meta.get("val"))
        if kind is not None:
            entry["type"] = kind
        nodes.append(entry)
    return {"format": FORMAT, "version": VERSION, "nodes": nodes}


# ------------------------------------------------------------------------------------------------ reading

def _identifier(text, what: str) -> str:
    if (not isinstance(text, str) or not _IDENT.match(text) or keyword.iskeyword(text) or text.startswith("__")
            or text in RESERVED or hasattr(builtins, text)):
        raise _Bad(f"{what} {text!r} is not a plain identifier")
    return text


def _dotted(text, what: str) -> str:
    if not isinstance(text, str):
        raise _Bad(f"{what} {text!r} is not a string")
    parts = text.split(".")
    for i, part in enumerate(parts):
        if i and _INDEX.match(part):  # a ModuleList index (`mlp.experts.0.gate_proj.weight`): fx quotes it
            continue
        _identifier(part, what)
    return text


def resolve_target(name) -> object:
    """The callable an allow-listed target name stands for (module docstring); _Bad otherwise."""
    if not isinstance(name, str):
        raise _Bad(f"call target {name!r} is not a string")
    if name in PYTHON_FUNCTIONS:
        return PYTHON_FUNCTIONS[name]
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in OP_NAMESPACES or (parts[0] == "aten" and parts[1] not in ATEN_OPS):
        raise _Bad(f"call target {name!r} is not on the allow-list (aten ops of ir/graph_json.py ATEN_OPS, "
                   f"qc.* ops, {', '.join(PYTHON_FUNCTIONS)})")
    ns, packet_name, overload = parts
    if not (_IDENT.match(packet_name) and _IDENT.match(overload)) or "__" in packet_name + overload:
        raise _Bad(f"call target {name!r} is not an op name")  # attribute lookups below: plain names only
    try:
        packet = getattr(getattr(torch.ops, ns), packet_name)
    except (AttributeError, RuntimeError):
        raise _Bad(f"call target {name!r}: no such op") from None
    if not isinstance(packet, torch._ops.OpOverloadPacket) or overload not in packet.overloads():
        raise _Bad(f"call target {name!r}: no such op overload")
    op = getattr(packet, overload)
    if not isinstance(op, torch._ops.OpOverload) or op._schema.name != f"{ns}::{packet_name}":
        raise _Bad(f"call target {name!r}: no such op overload")
    if op._schema.is_mutable:
        raise _Bad(f"call target {name!r} mutates its inputs: not allowed")
    return op


def _decode(value, env: dict):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Bad(f"non-finite float {value!r} outside a {{'float': ...}} tag")
        return value
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise _Bad(f"argument {value!r} is not a value of the format")
    (kind, body), = value.items()
    if kind == "node":
        if body not in env:
            raise _Bad(f"argument refers to node {body!r}, which is not defined before it")
        return env[body]
    if kind == "tuple" and isinstance(body, list):
        return tuple(_decode(v, env) for v in body)
    if kind == "float" and body in ("inf", "-inf", "nan"):
        return float(body)
    if kind == "device" and isinstance(body, str) and _DEVICE.match(body):
        return torch.device(body)
    if kind in _CONSTANTS and isinstance(body, str) and body in _CONSTANTS[kind]:
        return _CONSTANTS[kind][body]
    raise _Bad(f"argument {value!r} is not a value of the format")


def _tensor_type(entry):
    if entry is None:
        return None
    if isinstance(entry, list):
        return tuple(_tensor_type(e) for e in entry)
    if (not isinstance(entry, dict) or set(entry) != {"dtype", "shape"} or entry["dtype"] not in _CONSTANTS["dtype"]
            or not isinstance(entry["shape"], list)):
        raise _Bad(f"node type {entry!r} is not {{'dtype': name, 'shape': [...]}}")
    for d in entry["shape"]:
        if not (isinstance(d, int) and not isinstance(d, bool) or isinstance(d, str) and _SYMBOL.match(d)):
            raise _Bad(f"node type {entry!r}: dimension {d!r} is not an int or a symbol")
    return meta.TensorType(_CONSTANTS["dtype"][entry["dtype"]], tuple(entry["shape"]))


def _build_graph(doc, tensors: dict) -> torch.fx.Graph:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _Bad(f"not a {FORMAT} document")
    if doc.get("version") != VERSION:
        raise _Bad(f"{FORMAT} version {doc.get('version')!r}, expected {VERSION}")
    entries = doc.get("nodes")
    if not isinstance(entries, list) or not entries:
        raise _Bad("'nodes' is not a non-empty list")
    graph, env = torch.fx.Graph(), {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not set(entry) <= _NODE_KEYS or entry.get("op") not in _OPS:
            raise _Bad(f"node {i} is not {{'name', 'op' ({'|'.join(_OPS)}), 'target', 'args', 'kwargs', 'type'}}")
        op, name = entry["op"], _identifier(entry.get("name"), "node name")
        if name in env:
            raise _Bad(f"node name {name!r} is used twice")
        if (op == "output") != (i == len(entries) - 1):
            raise _Bad("the output node must be the last node, and only it")
        args = entry.get("args", [])
        kwargs = entry.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise _Bad(f"node {name}: args must be a list and kwargs an object")
        args = tuple(_decode(a, env) for a in args)
        kwargs = {k: _decode(v, env) for k, v in kwargs.items()}
        if op != "call_function" and kwargs:
            raise _Bad(f"node {name}: a {op} takes no keyword arguments")
        if op == "placeholder":
            if args or kwargs:
                raise _Bad(f"placeholder {name} has arguments")
            target = _identifier(entry.get("target"), "placeholder")
        elif op == "get_attr":
            target = _dotted(entry.get("target"), "tensor name")
            if target not in tensors:
                raise _Bad(f"node {name} reads tensor {target!r}, which the layer's tensors do not hold")
            if args or kwargs:
                raise _Bad(f"get_attr {name} has arguments")
        elif op == "call_function":
            target = resolve_target(entry.get("target"))
            names = {a.name for a in target._schema.arguments} if isinstance(target, torch._ops.OpOverload) else ()
            unknown = sorted(k for k in kwargs if k not in names)
            if unknown:  # keyword names go into the generated code: only the op's own parameter names
                raise _Bad(f"node {name}: {entry['target']} has no keyword argument {unknown[0]!r}")
        else:
            if len(args) != 1 or kwargs or "target" in entry:
                raise _Bad("the output node takes exactly one argument")
            graph.output(args[0])
            continue
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise _Bad(f"node name {name!r} collides with a name torch.fx reserves")
        node_type = _tensor_type(entry.get("type"))
        if node_type is not None:
            node.meta[meta.TENSOR_TYPE] = node_type
        env[name] = node
    graph.lint()
    return graph


def lazy_graph_module(root, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """`torch.fx.GraphModule(root, graph)` that generates and compiles its Python code when first called (or its
    `code` read), not when built nor at each `recompile()`: torch.fx's `_LazyGraphModule` (what inductor uses for
    its intermediate graphs). A loaded layer is rewritten before it runs (ir/decode.py, backends/ascend/layouts.py),
    and each eager code generation of its ~300 nodes was ~1/3 of building it (`qcompile run`: three per layer,
    one of which runs); the code that runs is generated from the same final graph either way. A plain GraphModule
    where this torch has no `_LazyGraphModule`."""
    return _GRAPH_MODULE(root, graph)


try:
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GRAPH_MODULE
except ImportError:  # pragma: no cover - a torch without it: eager code generation, same results
    _GRAPH_MODULE = torch.fx.GraphModule


def module_from_json(doc, tensors: dict[str, torch.Tensor], source: Path,
                     codegen: torch.fx.graph.CodeGen | None = None) -> torch.fx.GraphModule:
    """A GraphModule of the graph in `doc` whose get_attr tensors are `tensors` (registered as buffers).
    `codegen` (e.g. a fixed pytree signature) replaces the flat default calling convention.
    QCError naming `source` for anything the format does not allow (module docstring)."""
    try:
        graph = _build_graph(doc, tensors)
    except _Bad as e:
        raise QCError(f"{source}: {e}; the executable graph file is damaged or was not written by qcompile "
                      f"(recompile)") from None
    except RecursionError:
        raise QCError(f"{source}: arguments nested too deeply; not an executable graph written by qcompile") from None
    if codegen is not None:
        graph._codegen = codegen
    used = {n.target for n in graph.nodes if n.op == "get_attr"}
    try:
        return lazy_graph_module({k: v for k, v in tensors.items() if k in used}, graph)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError, SyntaxError) as e:
        # e.g. a tensor named like a Module attribute (`forward`), or one path a prefix of another
        raise QCError(f"{source}: cannot build the graph module ({type(e).__name__}: {e}); the executable "
                      f"graph file is damaged or was not written by qcompile (recompile)") from None
