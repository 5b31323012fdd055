"""The executable graph of a compiled OUT folder: its writer and its reader (one format, one module).

Layout of OUT/executable (FORMAT_VERSION 2):
    model.json                     format, version, dtype, sizes, eps, rope scaling, target, passes, and
                                   `layer_programs` (program number of each decoder layer)
    head.safetensors               embed_tokens.weight, norm.weight, lm_head.weight (if untied), inv_freq
    layers/program_K.json          one lowered layer graph per distinct structure (ir/graph_json.py) plus
                                   `tensors`: {name: {dtype, shape}} every layer running it must supply
    layers/layer_NNN.safetensors   layer NNN's tensors

Trust: everything here is JSON or safetensors; loading unpickles nothing and imports nothing from OUT.
A graph calls only allow-listed ops and its names are checked before torch.fx generates the module's
code (ir/graph_json.py), so a crafted OUT can at worst compute garbage, never run code; anything
malformed is one QCError naming the file. Version 1 (torch.export `.pt2` programs, which the torch
loader unpickles) is refused unread: "compiled by an older qcompiler: recompile".

Writer: `ExecutableWriter(OUT_TMP/executable)`, `add(gm, sample)` per decoder layer in order (the graph
is re-exported with torch.export, as the runtime always ran it, so the saved graph is ATen-level and
canonical; one program per distinct `signature`), `save_head(head, tied)`, `finish(info)`.
Reader: `read_info(folder)`, `load_head(folder, info)`, `ExecutableLayers(folder, info).get(i)` -> a
GraphModule called `layer(hidden [B, L, H], position_embeddings=(cos, sin) [1, L, D] each) -> hidden`.
No file holds an absolute path.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import QCError
from .ir import graph_json
from .runtime import Head

EXECUTABLE_DIR = "executable"
FORMAT = "qcompiler-executable"
FORMAT_VERSION = 2
MODEL_FILE = "model.json"
HEAD_FILE = "head.safetensors"
LAYERS_DIR = "layers"
HEAD_TENSORS = ("embed_tokens.weight", "norm.weight", "inv_freq")
#: model dtypes an executable graph may declare
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: the signature of every layer program: forward(hidden_states, position_embeddings=(cos, sin)) -> hidden
LAYER_ARGS = ("hidden_states", "position_embeddings")


def program_file(k: int) -> str:
    return f"program_{k}.json"


def layer_file(index: int) -> str:
    return f"layer_{index:03d}.safetensors"


def is_compiled(path: Path) -> bool:
    """Whether `path` is a compiled OUT folder (it has executable/model.json)."""
    return (Path(path) / EXECUTABLE_DIR / MODEL_FILE).is_file()


def _layer_codegen() -> torch.fx.graph.CodeGen:
    """The fixed calling convention of layer programs (never read from a file: fx writes its names into code)."""
    x = torch.empty(0)
    _, in_spec = pytree.tree_flatten(((x,), {"position_embeddings": (x, x)}))
    _, out_spec = pytree.tree_flatten(x)
    return torch.fx.graph._PyTreeCodeGen(torch.fx.graph._PyTreeInfo(list(LAYER_ARGS), in_spec, out_spec))


def _tensor_spec(t: torch.Tensor) -> dict:
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------ writer

class ExecutableWriter:
    """Saves lowered layer graphs: one program per distinct graph, each layer's tensors in its own file.

    Dense models lower most layers to the same graph (same code, same tensor names/shapes/dtypes), so a
    program is written once per distinct structure and `model.json` maps every layer to its program.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        (self.folder / LAYERS_DIR).mkdir(parents=True)
        self._signatures: dict[str, int] = {}
        self._layer_program: list[int] = []

    @staticmethod
    def signature(gm) -> str:
        tensors = sorted((k, str(v.dtype), tuple(v.shape)) for k, v in gm.state_dict().items())
        return gm.code + repr(tensors)

    def add(self, gm: torch.fx.GraphModule, sample) -> None:
        """Layer number len(programs()): its tensors, and its program when its structure is new."""
        from .ir.capture import export_program
        index = len(self._layer_program)
        state = {k: v.contiguous() for k, v in gm.state_dict().items()}
        sig = self.signature(gm)
        if sig not in self._signatures:
            k = self._signatures[sig] = len(self._signatures)
            program = export_program(gm, sample).module()
            doc = graph_json.graph_to_json(_without_export_guards(program).graph)
            read = {n["target"] for n in doc["nodes"] if n["op"] == "get_attr"}
            if not read <= set(state):
                raise RuntimeError(f"layer {index}: the exported program reads {sorted(read - set(state))[:3]}, "
                                   "which are not tensors of the layer")
            doc["tensors"] = {name: _tensor_spec(t) for name, t in sorted(state.items())}
            _write_json(self.folder / LAYERS_DIR / program_file(k), doc)
        self._layer_program.append(self._signatures[sig])
        save_file(state, str(self.folder / LAYERS_DIR / layer_file(index)), metadata={"format": "pt"})

    def programs(self) -> list[int]:
        return list(self._layer_program)

    def save_head(self, head: Head, tied: bool) -> None:
        tensors = {"embed_tokens.weight": head.embed_weight, "norm.weight": head.norm_weight,
                   "inv_freq": head.inv_freq}
        if not tied:
            tensors["lm_head.weight"] = head.lm_head_weight
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.folder / HEAD_FILE),
                  metadata={"format": "pt"})

    def finish(self, info: dict) -> dict:
        """Write model.json: `info` plus format, version and layer_programs; returns what was written."""
        info = {**info, "format": FORMAT, "version": FORMAT_VERSION, "layer_programs": self.programs()}
        _write_json(self.folder / MODEL_FILE, info)
        return info


def _without_export_guards(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop the `_guards_fn` call torch.export's `.module()` adds (a Python check of input shapes: it is
    code, not graph, and the layer's ops check their own shapes)."""
    for node in list(module.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            module.graph.erase_node(node)
    return module


# ------------------------------------------------------------------------------------------------ reader

def _fields(info: dict, path: Path) -> dict:
    """model.json's fields, type-checked (they select files and dtypes)."""
    def need(key, check, expected):
        if key not in info or not check(info[key]):
            raise QCError(f"{path}: '{key}' is {info.get(key)!r}, expected {expected}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    need("dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}")
    need("num_layers", lambda v: is_int(v) and 0 < v < 100000, "a positive integer")
    need("layer_programs", lambda v: isinstance(v, list) and len(v) == info["num_layers"]
         and all(is_int(k) and 0 <= k < len(v) for k in v), "one program number per layer")
    for key in ("rms_norm_eps", "attention_scaling"):
        need(key, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
    need("tie_word_embeddings", lambda v: isinstance(v, bool), "true or false")
    return info


def read_info(folder: Path) -> dict:
    """executable/model.json of a compiled OUT, checked; QCError naming the file otherwise (an OUT of an
    older format is "compiled by an older qcompiler: recompile")."""
    path = Path(folder) / MODEL_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QCError(f"{path}: unreadable ({e}); expected the executable graph's description") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise QCError(f"{path}: not a {FORMAT} description")
    version = info.get("version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version < FORMAT_VERSION:
            raise QCError(f"{path}: compiled by an older qcompiler (executable format v{version}, this one reads "
                          f"v{FORMAT_VERSION}): recompile")
        raise QCError(f"{path}: executable format v{version!r}, this qcompiler reads v{FORMAT_VERSION}: use the "
                      "qcompiler that compiled it, or recompile")
    return _fields(info, path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise QCError(f"{path} is missing: the executable graph is incomplete")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise QCError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def load_head(folder: Path, info: dict) -> Head:
    """The float head (embedding, final norm, lm_head, rotary inv_freq) of an executable graph."""
    path = Path(folder) / HEAD_FILE
    t = _load_safetensors(path)
    need = HEAD_TENSORS + (() if info["tie_word_embeddings"] else ("lm_head.weight",))
    missing = [n for n in need if n not in t]
    if missing:
        raise QCError(f"{path}: tensor {missing[0]!r} is missing")
    return Head(embed_weight=t["embed_tokens.weight"], norm_weight=t["norm.weight"],
                lm_head_weight=t.get("lm_head.weight", t["embed_tokens.weight"]), inv_freq=t["inv_freq"],
                attention_scaling=float(info["attention_scaling"]), eps=float(info["rms_norm_eps"]),
                dtype=DTYPES[info["dtype"]])


_SPEC_DTYPE = re.compile(r"^[a-z0-9_]+$")


class ExecutableLayers:
    """Decoder layers of a compiled OUT folder, rebuilt from their JSON programs on demand."""

    def __init__(self, folder: Path, info: dict):
        from .backends import ascend  # noqa: F401  registers torch.ops.qc.* before graphs are resolved
        self.folder, self.info = Path(folder), info
        self.num_layers = int(info["num_layers"])
        self.programs = list(info["layer_programs"])
        self._docs: dict[int, dict] = {}

    def _program(self, k: int) -> tuple[dict, Path]:
        path = self.folder / LAYERS_DIR / program_file(k)
        if k not in self._docs:
            if not path.is_file():
                if (self.folder / LAYERS_DIR / f"program_{k}.pt2").exists():
                    raise QCError(f"{path.parent}: compiled by an older qcompiler (.pt2 programs): recompile")
                raise QCError(f"{path} is missing: the executable graph is incomplete")
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise QCError(f"{path}: unreadable ({e}); the executable graph file is damaged: recompile") from None
            spec = doc.get("tensors") if isinstance(doc, dict) else None
            if not isinstance(spec, dict) or not all(
                    isinstance(v, dict) and _SPEC_DTYPE.match(str(v.get("dtype"))) and isinstance(v.get("shape"), list)
                    for v in spec.values()):
                raise QCError(f"{path}: 'tensors' is not {{name: {{dtype, shape}}}}; the executable graph file is "
                              "damaged: recompile")
            self._docs[k] = doc
        return self._docs[k], path

    def get(self, index: int, sample=None, prepared: bool = False) -> torch.fx.GraphModule:
        """Layer `index`: its program rebuilt with this layer's tensors (a fresh module every call); with
        `prepared`, in the form that runs (backends/ascend/layouts.py: weight layouts prepared once)."""
        k = self.programs[index]
        doc, path = self._program(k)
        tensors_path = self.folder / LAYERS_DIR / layer_file(index)
        tensors = _load_safetensors(tensors_path)
        got = {name: _tensor_spec(t) for name, t in tensors.items()}
        if got != doc["tensors"]:
            wrong = sorted(set(got) ^ set(doc["tensors"])) or sorted(
                n for n in got if got[n] != doc["tensors"][n])
            raise QCError(f"{tensors_path}: tensors do not match {path.name} (first difference: {wrong[0]!r})")
        gm = graph_json.module_from_json(doc, tensors, path, codegen=_layer_codegen())
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        if len(inputs) != 3 or not isinstance(output, (tuple, list)) or len(output) != 1:
            raise QCError(f"{path}: a layer program takes (hidden_states, cos, sin) and returns one tensor; this "
                          f"one takes {len(inputs)} inputs: damaged or not written by qcompile (recompile)")
        if prepared:
            from .backends.ascend.layouts import prepare_layer
            gm = prepare_layer(gm)
        return gm

    def decode(self, index: int, sample=None):
        """(decode step of layer `index`, its CacheSpec): the program rewritten to read/extend a KV cache
        (ir/decode.py; derived at load time, so every compiled OUT has one)."""
        from .ir.decode import build_decode_graph
        from .backends.ascend.layouts import prepare_layer
        step, spec = build_decode_graph(self.get(index, sample), DTYPES[self.info["dtype"]])
        return prepare_layer(step), spec
