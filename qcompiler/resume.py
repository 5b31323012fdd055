"""Resumable compiles: the state a compile commits after every decoder layer, its validation and reuse.

Contract
- After layer i (0-based) is complete, the driver calls `StateSaver.commit(i + 1, ...)`: into the staging
  folder's `.resume/` it writes layer i+1's inputs (`inputs-NNNNN.safetensors`: hidden [B, L, H] and the
  rotary cos / sin [1, L, D]) and then, as the single commit point, `manifest.json` (written to a temporary
  name, fsynced, `os.replace`d, folder fsynced). The manifest holds the compile's `fingerprint`, the
  artifact writer's and the executable writer's states (backends/ascend/artifact.py, executable.py), what
  the report needs of the layers done (per-layer entries, description keys set by passes, the fallback
  decision, the calibration source) and, for every file the state reuses, its size and sha256 (closed
  weight shards, executable layer files and programs, the inputs file; the open shard's spill file by
  the sha256 of each committed byte range, so each commit hashes only what the layer added). Every file
  is fsynced before the manifest names it. Whatever the folder holds beyond the manifest (files of a
  layer that was not committed, bytes of the spill past its recorded end) is garbage a resume deletes.
- `load(folder, fingerprint, num_layers)` (before the folder is adopted, so a refusal leaves it as it
  was): QCError (exit 2) when the manifest is missing or malformed, when the fingerprint differs (the
  message names every component that changed), or when any file is missing, a symlink, of another size
  or another sha256 ("damaged"). Returns `Restored`; `sweep(folder, restored)` then deletes the garbage.
- `fingerprint(opts, ckpt, calibration)`: {component: digest or value} of what decides the artifact: the
  compile options that change it (passes, target, dtype, exclude, policy, engine, batch size, shard
  size, calibration shape), the checkpoint (config.json, index, tokenizer files by content; every
  safetensors file by size, header and 64 evenly spaced 64 KiB samples of its data: a weight edited
  between the samples goes unnoticed, a whole-file hash would cost minutes on a 70B checkpoint), the
  calibration windows (`calibration_digest`), qcompiler's version and source code and torch's version
  (a different compiler could write other bytes).
- `describe(folder)` -> (layers done, layers) of a staging folder holding a state (outdir.py reports
  it), or None.
The manifest carries the sha256 of its own content (`checksum`).
Trust: state files are JSON and safetensors only (nothing is unpickled); paths in the manifest must lie
inside the folder (no `..`, no absolute path, no symlink).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import QCError
from .safetensors_open import safe_open
from .ir.capture import LayerInputs

STATE_DIR = ".resume"
MANIFEST = "manifest.json"
FORMAT = "qcompiler-resume-state"
VERSION = 1
_CHUNK = 8 * 2**20
#: the CompileOptions fields that change the artifact, executable graph or report, by the name users know
OPTION_FIELDS = {"passes": "--passes", "target": "--target", "dtype": "--dtype", "exclude": "--exclude",
                 "policy": "--policy", "engine": "--engine", "batch_size": "--batch-size",
                 "part_file_size": "part_file_size", "source": "the option source (qcompile quant)",
                 "notes": "the option notes (qcompile quant)"}


# ------------------------------------------------------------------------------------------ fingerprint

def _sha256_file(path: Path, start: int = 0, end: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = None if end is None else end - start
        while left is None or left > 0:
            block = f.read(_CHUNK if left is None else min(_CHUNK, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


#: a safetensors file's data enters the checkpoint digest by this many evenly spaced samples of _SAMPLE bytes
#: (4 MiB a file: hashing a 140 GB checkpoint whole would add minutes to every compile)
_SAMPLES, _SAMPLE = 64, 64 * 2**10


def _checkpoint_digest(folder: Path) -> str:
    """sha256 over the model folder's top-level files: safetensors by name, size, header and _SAMPLES
    evenly spaced samples of their data; others (config, index, tokenizer, ...) by content when under 64 MiB."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).iterdir()):
        if not p.is_file():
            continue
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        if p.name.endswith(".safetensors"):
            with open(p, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                h.update(head + f.read(min(n, 100 * 2**20)))
                start = 8 + n
                step = max((size - start) // _SAMPLES, 1)
                for at in range(start, size, step):
                    f.seek(at)
                    h.update(f.read(_SAMPLE))
        elif size < 64 * 2**20:
            h.update(bytes.fromhex(_sha256_file(p)))
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """qcompiler's version, its source files and torch's version (read once a process: the code it runs)."""
    from . import __version__
    h = hashlib.sha256(f"{__version__}\0torch {torch.__version__}\0".encode())
    root = Path(__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def calibration_digest(windows: torch.Tensor | None, shape: tuple[int, int]) -> str:
    """The calibration component of the fingerprint: the token windows' sha256, or, for calibration sampled
    from the model (windows None here: a function of the checkpoint and the shape, seed 0), the shape."""
    if windows is None:
        return f"sampled from the model, seed 0, {shape[0]} x {shape[1]}"
    w = windows.contiguous()
    h = hashlib.sha256(f"{w.dtype} {list(w.shape)}\0".encode())
    h.update(w.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(opts, ckpt, calibration: str) -> dict[str, str]:
    """{component: value or digest} (module docstring); two compiles with equal fingerprints write the same bytes."""
    def plain(v):
        return json.loads(json.dumps(v, default=str, sort_keys=True))
    comps = {name: json.dumps(plain(getattr(opts, field)), sort_keys=True) for field, name in OPTION_FIELDS.items()}
    comps["--calib-samples / --seq-len"] = json.dumps(list(opts.calib_shape()))
    comps["the model checkpoint"] = _checkpoint_digest(ckpt.path)
    comps["the calibration windows"] = calibration
    comps["the qcompiler version or code"] = _code_digest()
    return comps


# ---------------------------------------------------------------------------------------------- writing

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


class StateSaver:
    """Commits the per-layer state of one compile into `tmp/.resume` (module docstring)."""

    def __init__(self, tmp: Path, fingerprint: dict[str, str], num_layers: int, restored: "Restored | None" = None):
        self.tmp = Path(tmp)
        self.fingerprint = dict(fingerprint)
        self.num_layers = num_layers
        (self.tmp / STATE_DIR).mkdir(exist_ok=True)
        self._hashed: dict[str, dict] = dict(restored.files) if restored else {}  # immutable files: size, sha256
        self._ranges: dict[str, list] = {restored.spill["path"]: restored.spill["ranges"]} \
            if restored and restored.spill else {}
        self._inputs: str | None = restored.inputs_file if restored else None

    def _hash(self, rel: str) -> dict:
        if rel not in self._hashed:
            path = self.tmp / rel
            _fsync_path(path)
            self._hashed[rel] = {"size": path.stat().st_size, "sha256": _sha256_file(path)}
        return self._hashed[rel]

    def commit(self, done: int, inputs: LayerInputs, writer, executable, record: dict) -> None:
        """Layers 0..done-1 are complete and `inputs` are layer `done`'s inputs: commit (module docstring)."""
        from .executable import EXECUTABLE_DIR
        rel_inputs = f"{STATE_DIR}/inputs-{done:05d}.safetensors"
        cos, sin = inputs.position_embeddings
        staged = self.tmp / (rel_inputs + ".tmp")
        save_file({"hidden": inputs.hidden.contiguous(), "cos": cos.contiguous(), "sin": sin.contiguous()},
                  str(staged), metadata={"format": "pt"})
        _fsync_path(staged)
        os.replace(staged, self.tmp / rel_inputs)
        self._hashed.pop(rel_inputs, None)
        artifact = writer.state()  # syncs the open spill
        rels = [rel_inputs] + writer.part_files() + [f"{EXECUTABLE_DIR}/{f}" for f in executable.written_files()]
        files = {rel: self._hash(rel) for rel in rels}
        spill = None
        if artifact["open"] is not None:
            rel = artifact["open"]["spill"]
            ranges = self._ranges.get(rel, [])
            start = ranges[-1][1] if ranges else 0
            end = artifact["open"]["end"]
            if end > start:
                ranges = ranges + [[start, end, _sha256_file(self.tmp / rel, start, end)]]
            self._ranges = {rel: ranges}
            spill = {"path": rel, "ranges": ranges}
        manifest = {"format": FORMAT, "version": VERSION, "layers_done": done, "num_layers": self.num_layers,
                    "fingerprint": self.fingerprint, "inputs": rel_inputs, "files": files, "spill": spill,
                    "artifact": artifact, "executable": executable.state(), "record": record}
        manifest["checksum"] = _checksum(manifest)
        _atomic_bytes(self.tmp / STATE_DIR / MANIFEST,
                      json.dumps(manifest, indent=1, allow_nan=False).encode())
        # committed: what only the previous state needed goes
        writer.release_retired()
        if self._inputs and self._inputs != rel_inputs:
            (self.tmp / self._inputs).unlink(missing_ok=True)
            self._hashed.pop(self._inputs, None)
        self._inputs = rel_inputs

    def discard(self) -> None:
        """The compile is complete: delete the state (the folder is no longer resumable)."""
        shutil.rmtree(self.tmp / STATE_DIR, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reading

@dataclass
class Restored:
    """A validated state: layers 0..done-1 are complete, `inputs` are layer done's."""
    folder: Path
    done: int
    num_layers: int
    inputs: LayerInputs
    inputs_file: str
    files: dict[str, dict]
    spill: dict | None
    artifact: dict
    executable: dict
    record: dict
    fingerprint: dict[str, str]


def has_state(folder: Path) -> bool:
    return (Path(folder) / STATE_DIR).is_dir()


def _checksum(manifest: dict) -> str:
    """sha256 of the manifest without its `checksum` (a bit flipped inside a value is found, too)."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _read_manifest(folder: Path):
    path = Path(folder) / STATE_DIR / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable ({e.__class__.__name__})"
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        return None, f"{path} is not a {FORMAT} v{VERSION} manifest"
    if m.get("checksum") != _checksum(m):
        return None, f"{path} does not match its checksum"
    return m, None


def describe(folder: Path) -> tuple[int, int] | None:
    """(layers done, layers) of the state in `folder`, or None (no state, or not readable)."""
    m, _ = _read_manifest(folder)
    try:
        return (int(m["layers_done"]), int(m["num_layers"])) if m else None
    except (KeyError, TypeError, ValueError):
        return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _names(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _pairs(v, second) -> bool:
    return isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                       and second(p[1]) for p in v)


def _schema_problem(m: dict, num_layers: int) -> str | None:
    """What is malformed in a manifest (None: every field has the type the restore reads)."""
    done = m.get("layers_done")
    if not (_is_int(done) and 0 < done <= num_layers and m.get("num_layers") == num_layers):
        return f"layers_done {done!r} / num_layers {m.get('num_layers')!r} (the model has {num_layers} layers)"
    files = m.get("files")
    if not (isinstance(files, dict) and all(isinstance(v, dict) and _is_int(v.get("size"))
                                            and isinstance(v.get("sha256"), str) for v in files.values())):
        return "files"
    if not (isinstance(m.get("inputs"), str) and m["inputs"] in files):
        return "inputs"
    art = m.get("artifact")
    if not (isinstance(art, dict) and _is_int(art.get("max_shard_bytes")) and _pairs(art.get("types"), lambda v: isinstance(v, str))
            and _pairs(art.get("sizes"), _is_int) and _pairs(art.get("shards"), _names)
            and all(f in files for f, _ in art["shards"])):
        return "artifact"
    spill, open_ = m.get("spill"), art.get("open")
    if (open_ is None) != (spill is None):
        return "spill"
    if open_ is not None:
        entries_ok = isinstance(open_.get("entries"), list) and all(
            isinstance(e, list) and len(e) == 4 and isinstance(e[0], str) and isinstance(e[1], str)
            and isinstance(getattr(torch, e[1], None), torch.dtype) and isinstance(e[2], list)
            and all(_is_int(d) for d in e[2]) and _is_int(e[3]) for e in open_["entries"])
        ranges = spill.get("ranges") if isinstance(spill, dict) else None
        if not (entries_ok and isinstance(open_.get("spill"), str) and open_["spill"] == spill.get("path")
                and _is_int(open_.get("end")) and isinstance(ranges, list)
                and all(isinstance(r, list) and len(r) == 3 and _is_int(r[0]) and _is_int(r[1])
                        and isinstance(r[2], str) for r in ranges)
                and sum(r[1] - r[0] for r in ranges) == open_["end"]):
            return "artifact.open / spill"
    ex = m.get("executable")
    if not (isinstance(ex, dict) and _pairs(ex.get("signatures"), _is_int)
            and isinstance(ex.get("layer_programs"), list) and len(ex["layer_programs"]) == done
            and all(_is_int(k) for k in ex["layer_programs"])
            and isinstance(ex.get("artifact_tensors"), list) and len(ex["artifact_tensors"]) == done
            and all(_names(x) for x in ex["artifact_tensors"])):
        return "executable"
    rec = m.get("record")
    if not (isinstance(rec, dict) and isinstance(rec.get("layers"), list) and len(rec["layers"]) == done):
        return "record"
    return None


def _inside(folder: Path, rel: str) -> Path | None:
    """folder/rel when rel is a plain relative path below folder with no symlink on the way, else None."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or any(p in ("..", ".", "") for p in parts):
        return None
    path = Path(folder)
    for p in parts:
        path = path / p
        if path.is_symlink():
            return None
    return path


def load(folder: Path, expected: dict[str, str], num_layers: int) -> Restored:
    """The validated state of `folder` (module docstring); QCError (exit 2) naming what is wrong."""
    folder = Path(folder)
    damaged = (f"--resume: the interrupted compile in {folder} is damaged ({{}}); remove that folder and "
               "compile again without --resume")
    m, why = _read_manifest(folder)
    if m is None:
        raise QCError(damaged.format(why))
    got = m.get("fingerprint")
    if not isinstance(got, dict):
        raise QCError(damaged.format("no fingerprint"))
    changed = [k for k in expected if got.get(k) != expected[k]] + [k for k in got if k not in expected]
    if changed:
        raise QCError(f"--resume: the interrupted compile in {folder} differs from this one in "
                      f"{', '.join(changed)}: resume it with the model, options and calibration it started with, "
                      f"or remove that folder (or compile without --resume)")
    problem = _schema_problem(m, num_layers)
    if problem:
        raise QCError(damaged.format(f"malformed manifest: {problem}"))
    for rel, want in sorted(m["files"].items()):
        path = _inside(folder, rel)
        if path is None:
            raise QCError(damaged.format(f"the manifest names {rel!r}, outside the folder"))
        if not path.is_file():
            raise QCError(damaged.format(f"{rel} is missing"))
        size = path.stat().st_size
        if size != want["size"]:
            raise QCError(damaged.format(f"{rel} has {size} bytes, {want['size']} were committed"))
        if _sha256_file(path) != want["sha256"]:
            raise QCError(damaged.format(f"{rel} differs from what was committed (sha256)"))
    spill = m["spill"]
    if spill is not None:
        rel = spill["path"]
        path = _inside(folder, rel)
        if path is None or "/" in rel or not path.is_file():
            raise QCError(damaged.format(f"the open weight shard {rel} is missing"))
        end = m["artifact"]["open"]["end"]
        if path.stat().st_size < end:
            raise QCError(damaged.format(f"{rel} has {path.stat().st_size} bytes, {end} were committed"))
        for start, stop, digest in spill["ranges"]:
            if _sha256_file(path, start, stop) != digest:
                raise QCError(damaged.format(f"{rel} bytes {start}..{stop} differ from what was committed (sha256)"))
    try:
        with safe_open(str(folder / m["inputs"]), "pt") as f:
            t = {k: f.get_tensor(k) for k in ("hidden", "cos", "sin")}
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError) as e:
        raise QCError(damaged.format(f"{m['inputs']} is unreadable ({e})")) from None
    inputs = LayerInputs(hidden=t["hidden"], position_embeddings=(t["cos"], t["sin"]))
    return Restored(folder=folder, done=m["layers_done"], num_layers=num_layers, inputs=inputs,
                    inputs_file=m["inputs"], files=m["files"], spill=spill, artifact=m["artifact"],
                    executable=m["executable"], record=m["record"], fingerprint=dict(got))


def sweep(folder: Path, restored: Restored) -> list[str]:
    """Delete every file of `folder` the state does not name (work of a layer that was not committed, the
    finish of a stopped compile); returns their relative paths."""
    folder = Path(folder)
    keep = set(restored.files) | {f"{STATE_DIR}/{MANIFEST}"} | ({restored.spill["path"]} if restored.spill else set())
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel not in keep:
                os.unlink(os.path.join(root, name))
                removed.append(rel)
    return sorted(removed)
