"""The executable graph of a compiled OUT folder: its writer and its reader (one format, one module).

Layout of OUT/executable (FORMAT_VERSION 3):
    model.json                     format, version, dtype, sizes, eps, rope scaling, target, passes,
                                   `layer_programs` (program number of each decoder layer),
                                   `artifact_tensors` (per layer: the names of its tensors read from the
                                   artifact) and `head_artifact_tensors` ({head tensor: artifact name})
    head.safetensors               the head tensors the artifact does not hold (inv_freq)
    layers/program_K.json          one lowered layer graph per distinct structure (ir/graph_json.py) plus
                                   `tensors`: {name: {dtype, shape}} every layer running it must supply
    layers/layer_NNN.safetensors   layer NNN's tensors that the artifact does not hold byte for byte

The artifact is the OUT folder holding `executable/` (its `quant_model_weights*.safetensors`, located
through `quant_model_weights.safetensors.index.json` when sharded). A layer tensor `name` listed in
`artifact_tensors[NNN]` is the artifact's `model.layers.NNN.name`: the lowered graph reads exactly the
tensors the artifact stores (int8 weights, scales, biases, norms), so they are stored once, not twice
(a 72B model's OUT would otherwise hold every weight twice). A tensor the graph reads in another form
than the artifact stores is kept in the layer file. Version 2 (every tensor in the executable's own
files, no `artifact_tensors`) is read as well.

Trust: everything here is JSON or safetensors; loading unpickles nothing and imports nothing from OUT.
A graph calls only allow-listed ops and its names are checked before torch.fx generates the module's
code (ir/graph_json.py), so a crafted OUT can at worst compute garbage, never run code; anything
malformed is one QCError naming the file (an artifact shard named by the index must be a plain
`quant_model_weights*.safetensors` file of OUT). Version 1 (torch.export `.pt2` programs, which the torch
loader unpickles) is refused unread: "compiled by an older qcompiler: recompile".

Writer: `ExecutableWriter(OUT_TMP/executable)`, `add(gm, sample, in_artifact)` per decoder layer in order
(the graph is re-exported with torch.export, as the runtime always ran it, so the saved graph is
ATen-level and canonical; one program per distinct `signature`; `in_artifact` = {name: tensor} of what the
caller wrote to the artifact for this layer), `save_head(head, tied, in_artifact)`, `finish(info)`.
Reader: `read_info(folder)`, `load_head(folder, info)`, `read_layer_tensors(folder, info, i)`,
`ExecutableLayers(folder, info).get(i)` -> a GraphModule called
`layer(hidden [B, L, H], position_embeddings=(cos, sin) [1, L, D] each) -> hidden`;
`load_compiled_model(OUT)` -> model.LoadedModel (kind "executable") for eval / run; `compiled_target(OUT)`: the
--target model.json names, without loading anything (how runtime.load_model spots an ONNX compile).
No file holds an absolute path.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import QCError
from .safetensors_open import safe_open
from .ir import graph_json
from .model import Head, LoadedModel

EXECUTABLE_DIR = "executable"
FORMAT = "qcompiler-executable"
FORMAT_VERSION = 3
#: versions this reader reads (2: no tensors shared with the artifact)
READABLE_VERSIONS = (2, 3)
MODEL_FILE = "model.json"
HEAD_FILE = "head.safetensors"
LAYERS_DIR = "layers"
HEAD_TENSORS = ("embed_tokens.weight", "norm.weight", "inv_freq")
#: where the head tensors the artifact also holds are stored there
HEAD_ARTIFACT_NAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                       "lm_head.weight": "lm_head.weight"}
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
    """Saves lowered layer graphs: one program per distinct graph, each layer's tensors in its own file
    unless the artifact holds them (module docstring).

    Dense models lower most layers to the same graph (same code, same tensor names/shapes/dtypes), so a
    program is written once per distinct structure and `model.json` maps every layer to its program.
    """

    def __init__(self, folder: Path, state: dict | None = None):
        """`state`: a `state()` of a writer that stopped (resumable compiles, resume.py): continue after its
        last layer (its files are in `folder`; the caller validated them)."""
        self.folder = Path(folder)
        (self.folder / LAYERS_DIR).mkdir(parents=True, exist_ok=state is not None)
        self._signatures: dict[str, int] = {}
        self._layer_program: list[int] = []
        self._from_artifact: list[list[str]] = []
        self._head_from_artifact: dict[str, str] = {}
        if state is not None:
            self._signatures = {str(sig): int(k) for sig, k in state["signatures"]}
            self._layer_program = [int(k) for k in state["layer_programs"]]
            self._from_artifact = [[str(n) for n in names] for names in state["artifact_tensors"]]
            if (sorted(self._signatures.values()) != list(range(len(self._signatures)))
                    or len(self._from_artifact) != len(self._layer_program)
                    or not set(self._layer_program) <= set(self._signatures.values())):
                raise ValueError("inconsistent executable writer state")

    def state(self) -> dict:
        """JSON of the layers added so far (what `ExecutableWriter(folder, state)` continues from)."""
        return {"signatures": [[sig, k] for sig, k in self._signatures.items()],
                "layer_programs": list(self._layer_program), "artifact_tensors": [list(x) for x in self._from_artifact]}

    def written_files(self) -> list[str]:
        """Paths (relative to `folder`) of the files written for the layers added so far."""
        return ([f"{LAYERS_DIR}/{program_file(k)}" for k in range(len(self._signatures))]
                + [f"{LAYERS_DIR}/{layer_file(i)}" for i in range(len(self._layer_program))])

    @staticmethod
    def signature(gm) -> str:
        tensors = sorted((k, str(v.dtype), tuple(v.shape)) for k, v in gm.state_dict().items())
        return gm.code + repr(tensors)

    def add(self, gm: torch.fx.GraphModule, sample, in_artifact: dict[str, torch.Tensor] | None = None) -> None:
        """Layer number len(programs()): its tensors, and its program when its structure is new.

        `in_artifact`: {name inside the layer: tensor} the caller wrote to the artifact as
        `model.layers.<index>.<name>`; a graph tensor equal to it (dtype, shape, values) is read from there."""
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
        shared = sorted(n for n, t in state.items() if n in (in_artifact or {}) and _same(t, in_artifact[n]))
        own = {n: t for n, t in state.items() if n not in shared}
        self._from_artifact.append(shared)
        save_file(own, str(self.folder / LAYERS_DIR / layer_file(index)), metadata={"format": "pt"})

    def programs(self) -> list[int]:
        return list(self._layer_program)

    def save_head(self, head: Head, tied: bool, in_artifact: dict[str, str] | None = None) -> None:
        """The head; `in_artifact` = {head tensor (HEAD_ARTIFACT_NAMES key): artifact name} for those the
        caller wrote to the artifact from the same values: they are read from there."""
        tensors = {"embed_tokens.weight": head.embed_weight, "norm.weight": head.norm_weight,
                   "inv_freq": head.inv_freq}
        if not tied:
            tensors["lm_head.weight"] = head.lm_head_weight
        refs = {k: v for k, v in (in_artifact or {}).items() if k in tensors}
        self._head_from_artifact = dict(sorted(refs.items()))
        save_file({k: v.contiguous() for k, v in tensors.items() if k not in refs}, str(self.folder / HEAD_FILE),
                  metadata={"format": "pt"})

    def finish(self, info: dict) -> dict:
        """Write model.json: `info` plus format, version, layer_programs and the tensors read from the
        artifact; returns what was written."""
        info = {**info, "format": FORMAT, "version": FORMAT_VERSION, "layer_programs": self.programs(),
                "artifact_tensors": self._from_artifact, "head_artifact_tensors": self._head_from_artifact}
        _write_json(self.folder / MODEL_FILE, info)
        return info


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `b` (written to the artifact) holds exactly the bytes of `a` (bytes, not values: -0.0 is not
    0.0 here, and a NaN equals itself)."""
    b = b.detach()
    if a is b:
        return True
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


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
    if info["version"] >= 3:
        names = lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)  # noqa: E731
        need("artifact_tensors", lambda v: isinstance(v, list) and len(v) == info["num_layers"]
             and all(names(x) for x in v), "one list of tensor names per layer")
        need("head_artifact_tensors", lambda v: isinstance(v, dict) and all(
            HEAD_ARTIFACT_NAMES.get(k) == x for k, x in v.items()), f"a subset of {HEAD_ARTIFACT_NAMES}")
    return info


def compiled_target(path: Path) -> str | None:
    """The `target` model.json of the compiled OUT folder `path` names (e.g. "onnx"), or None when there is no
    readable description (not ours to report here: read_info names a damaged file when the graph is loaded)."""
    info = Path(path) / EXECUTABLE_DIR / MODEL_FILE
    try:
        content = json.loads(info.read_text(encoding="utf-8")) if info.is_file() else None
    except (OSError, ValueError):
        return None
    return content.get("target") if isinstance(content, dict) else None


def _readable() -> str:
    return " and ".join(f"v{v}" for v in READABLE_VERSIONS)


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
    if version not in READABLE_VERSIONS:
        if isinstance(version, int) and not isinstance(version, bool) and version < min(READABLE_VERSIONS):
            raise QCError(f"{path}: compiled by an older qcompiler (executable format v{version}, this one reads "
                          f"{_readable()}): recompile")
        raise QCError(f"{path}: executable format v{version!r}, this qcompiler reads {_readable()}: use the "
                      "qcompiler that compiled it, or recompile")
    return _fields(info, path)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise QCError(f"{path} is missing: the executable graph is incomplete")
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise QCError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
    _check_finite(path, tensors)
    return tensors


def _check_finite(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """QCError naming the file and tensor when a floating tensor of OUT holds NaN or Inf: a compile never writes
    one (weights and activations are checked finite, scales too: encode.py), so the OUT was damaged; `eval` printed
    "perplexity nan" with exit 0 and `run` decoded garbage. (The float model's weights are refused the same way:
    loading.Checkpoint.tensor.)"""
    from .loading import all_finite
    for name, t in tensors.items():
        if t.is_floating_point() and not all_finite(t):
            raise QCError(f"{path}: tensor {name!r} holds NaN or Inf; a compiled OUT holds finite numbers only "
                          "(damaged: recompile)")


_SHARD_NAME = re.compile(r"^quant_model_weights[A-Za-z0-9_.-]*\.safetensors$")


class ArtifactTensors:
    """Tensors of the artifact beside an executable folder (OUT/executable -> OUT), read by name."""

    def __init__(self, folder: Path):
        self.out = Path(folder).parent
        self._map: dict[str, str] | None = None

    def _weight_map(self) -> dict[str, str]:
        from .backends.ascend.artifact import INDEX_FILE, WEIGHTS_FILE
        if self._map is not None:
            return self._map
        index = self.out / INDEX_FILE
        if index.is_file():
            try:
                wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise QCError(f"{index}: unreadable ({e}); expected the artifact's weight index: recompile") from None
            if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) and _SHARD_NAME.match(v)
                                                     for k, v in wmap.items()):
                raise QCError(f"{index}: 'weight_map' is not {{tensor: quant_model_weights*.safetensors}}: recompile")
            self._map = dict(wmap)
        else:
            path = self.out / WEIGHTS_FILE
            if not path.is_file():
                raise QCError(f"{path} is missing: the executable graph reads its tensors from the artifact")
            try:
                with safe_open(str(path), "pt") as f:
                    self._map = {k: WEIGHTS_FILE for k in f.keys()}
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise QCError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
        return self._map

    def get(self, names: dict[str, str], reader: Path) -> dict[str, torch.Tensor]:
        """{local name: tensor} for {local name: artifact name}; QCError naming `reader` and the artifact
        when one is missing."""
        if not names:
            return {}
        wmap = self._weight_map()
        by_file: dict[str, list[tuple[str, str]]] = {}
        for local, name in names.items():
            if name not in wmap:
                raise QCError(f"{reader}: tensor {name!r} of the artifact is missing from {self.out}: recompile")
            by_file.setdefault(wmap[name], []).append((local, name))
        out = {}
        for file_name, pairs in by_file.items():
            path = self.out / file_name
            try:
                with safe_open(str(path), "pt") as f:
                    read = {name: f.get_tensor(name) for _, name in pairs}
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                raise QCError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
            _check_finite(path, read)
            out.update({local: read[name] for local, name in pairs})
        return out


def load_head(folder: Path, info: dict) -> Head:
    """The float head (embedding, final norm, lm_head, rotary inv_freq) of an executable graph."""
    path = Path(folder) / HEAD_FILE
    t = _load_safetensors(path)
    refs = info.get("head_artifact_tensors", {})
    clash = sorted(set(refs) & set(t))
    if clash:
        raise QCError(f"{path}: {clash[0]!r} is stored here and read from the artifact too: damaged, recompile")
    t.update(ArtifactTensors(folder).get(refs, path))
    need = HEAD_TENSORS + (() if info["tie_word_embeddings"] else ("lm_head.weight",))
    missing = [n for n in need if n not in t]
    if missing:
        raise QCError(f"{path}: tensor {missing[0]!r} is missing")
    return Head(embed_weight=t["embed_tokens.weight"], norm_weight=t["norm.weight"],
                lm_head_weight=t.get("lm_head.weight", t["embed_tokens.weight"]), inv_freq=t["inv_freq"],
                attention_scaling=float(info["attention_scaling"]), eps=float(info["rms_norm_eps"]),
                dtype=DTYPES[info["dtype"]])


def read_layer_tensors(folder: Path, info: dict, index: int, artifact: ArtifactTensors | None = None
                       ) -> dict[str, torch.Tensor]:
    """Every tensor of decoder layer `index`: its own file's plus those read from the artifact."""
    path = Path(folder) / LAYERS_DIR / layer_file(index)
    tensors = _load_safetensors(path)
    shared = info.get("artifact_tensors", [[]] * int(info["num_layers"]))[index]
    clash = sorted(set(shared) & set(tensors))
    if clash:
        raise QCError(f"{path}: {clash[0]!r} is stored here and read from the artifact too: damaged, recompile")
    artifact = artifact or ArtifactTensors(folder)
    tensors.update(artifact.get({n: f"model.layers.{index}.{n}" for n in shared}, path))
    return tensors


_SPEC_DTYPE = re.compile(r"^[a-z0-9_]+$")


class ExecutableLayers:
    """Decoder layers of a compiled OUT folder, rebuilt from their JSON programs on demand."""

    def __init__(self, folder: Path, info: dict):
        from .backends import ascend  # noqa: F401  registers torch.ops.qc.* before graphs are resolved
        self.folder, self.info = Path(folder), info
        self.num_layers = int(info["num_layers"])
        self.programs = list(info["layer_programs"])
        self._docs: dict[int, dict] = {}
        self._artifact = ArtifactTensors(self.folder)

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

    def get(self, index: int, sample=None, prepared: bool = False, rows: int | None = None) -> torch.fx.GraphModule:
        """Layer `index`: its program rebuilt with this layer's tensors (a fresh module every call); with
        `prepared`, in the form that runs (backends/ascend/layouts.py: weight layouts prepared once; `rows`: the
        token rows it will run in all, when known, `prepare_layer`)."""
        k = self.programs[index]
        doc, path = self._program(k)
        tensors_path = self.folder / LAYERS_DIR / layer_file(index)
        tensors = read_layer_tensors(self.folder, self.info, index, self._artifact)
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
            gm = prepare_layer(gm, rows=rows)
        return gm

    def decode(self, index: int, sample=None):
        """(decode step of layer `index`, its CacheSpec): the program rewritten to read/extend a KV cache
        (ir/decode.py; derived at load time, so every compiled OUT has one)."""
        from .ir.decode import build_decode_graph
        from .backends.ascend.layouts import prepare_layer
        step, spec = build_decode_graph(self.get(index, sample), DTYPES[self.info["dtype"]])
        return prepare_layer(step, merge=True), spec


def load_compiled_model(path: Path, dtype: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """The executable graph of the compiled OUT folder `path` (is_compiled(path)) with OUT's tokenizer.
    `dtype` must be None or the dtype it was compiled for (QCError otherwise); `trust_remote_code`: trust.py."""
    from .loading import load_tokenizer
    folder = Path(path) / EXECUTABLE_DIR
    info = read_info(folder)
    if dtype and dtype != info["dtype"]:
        raise QCError(f"{path} was compiled for {info['dtype']}; --dtype {dtype} cannot change that")
    return LoadedModel(load_head(folder, info), ExecutableLayers(folder, info),
                       load_tokenizer(path, trust_remote_code), "executable", info)
