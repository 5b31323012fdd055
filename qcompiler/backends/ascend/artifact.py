"""Streaming writer of the Ascend deployable artifact (shared/spec/ascend-artifact.md, sections 1-2).

Contract
- `ArtifactWriter(out_dir, model_dtype)`: `add(name, tensor, quant_type)` per tensor, in any order, then
  `finish(source_dir, config, ...)` once. Memory is bounded by one tensor: `add` writes the tensor's bytes to
  disk at once (the open shard's spill file, safetensors_stream.SpilledFile; nothing of it is kept); a shard
  is closed when the next tensor would take it past `max_shard_bytes` and assembled into
  `quant_model_weights-partNNNNN.safetensors` (the bytes `safetensors.torch.save_file` writes). `finish`
  renames the shards to `quant_model_weights-0000i-of-0000N.safetensors` + `quant_model_weights.safetensors.index.json`
  (or the single `quant_model_weights.safetensors`, no index), writes `quant_model_description.json` and
  `config.json`, and copies tokenizer / generation / chat-template files from the source model.
- No code goes into OUT (trust.py): no `*.py` (or pickle) file is copied, and `auto_map` (a pointer to custom
  code the engines would try to import with trust_remote_code) is dropped from config.json and
  tokenizer_config.json: the artifact is computed by the built-in implementation of its architecture.
- `out_dir` is meant to be a temporary folder that the caller renames into place when `finish` returned; the
  engines load every top-level `*.safetensors`, so other outputs (reports, graphs) belong in a subfolder.
- Output is deterministic: the same adds and arguments give byte-identical files (no timestamps; shard split
  follows add order; JSON keys in a fixed order).
- Resumable (`resumable=True`, the compile driver; resume.py): `state()` is the JSON of everything added
  (types, sizes, closed shards, the open shard's spill entries) and `ArtifactWriter.restore(out_dir, dtype,
  state)` continues from it in another process (the open spill's bytes beyond the state are cut off), so
  the files come out as if the writer had never stopped. To keep every state valid until the next one is
  committed, a closed shard's spill file is kept (`retired_spills`; `release_retired()` deletes them once
  the newer state is committed) and `finish` hard-links the shards to their final names instead of
  renaming them (a stop during the finish can be resumed); `drop_resume_files()` deletes the part files
  and spills once nothing will resume (before OUT is put in place).

Limits
- `describe(name, type)` adds a description entry without a tensor (a Linear stored without `weight`).
- The writer does not check the tensors against the spec (encode.py produces them; the conformance checker
  shared/tools/check_ascend_artifact.py verifies a finished artifact). It checks names, types and file layout.
- A shard exceeds `max_shard_bytes` only when a single tensor does.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qcompiler.backends.ascend.encode import (FLOAT, QUANT_TYPES, as_model_dtype, mindie_quantize_name,
                                              model_dtype_name, model_quant_type)
from qcompiler.backends.ascend.mindie_keys import is_moe, moe_config_keys
from qcompiler.errors import QCError
from qcompiler.safetensors_stream import SpilledFile

DESCRIPTION_FILE = "quant_model_description.json"
WEIGHTS_FILE = "quant_model_weights.safetensors"
INDEX_FILE = "quant_model_weights.safetensors.index.json"
DESCRIPTION_VERSION = "1.0.0"
# Top-level description keys besides model_quant_type / version / group_size (the checker's TOP_KEYS).
EXTRA_DESCRIPTION_KEYS = ("kv_cache_type", "kv_quant_type", "fa_quant_type", "reduce_quant_type", "metadata",
                          "optional", "indexer_quant_type", "is_nzcasted", "AtlasGMMPermute")
_FIXED_KEYS = ("model_quant_type", "version", "group_size")

# Files the engines need from the source model folder (tokenizer, generation defaults, chat template).
COPY_PATTERNS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "chat_template*",
                 "vocab.json", "merges.txt", "*.model", "added_tokens.json")
# Never copied: the engines would load float weights or a stale index next to ours; and code or pickles, which
# OUT never carries (trust.py), even when named like a tokenizer file (`tokenizer.py`).
_NEVER_COPY = ("*.safetensors", "*.index.json", "config.json", DESCRIPTION_FILE,
               "*.py", "*.pyc", "*.so", "*.bin", "*.pt", "*.pt2", "*.pth", "*.pkl", "*.pickle")
# Keys naming custom code, dropped from the JSON files written into OUT (module docstring).
CODE_KEYS = ("auto_map",)


def write_json(path: Path, obj: Any, sort_keys: bool = True) -> None:
    """Deterministic JSON: indent 2, keys sorted unless the caller's order matters, trailing newline."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


def natural_key(name: str) -> tuple:
    """Sort key putting model.layers.2 before model.layers.10 (digits compare as numbers)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


class ArtifactWriter:
    """Streams quantized tensors into an AscendV1 artifact folder; see the module docstring."""

    def __init__(self, out_dir: Path, model_dtype: torch.dtype | str, max_shard_bytes: int = 5 * 2**30,
                 resumable: bool = False):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.model_dtype = as_model_dtype(model_dtype)
        self.max_shard_bytes = max_shard_bytes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = sorted(p.name for p in self.out_dir.glob("*.safetensors*")) + sorted(
            p.name for p in self.out_dir.glob(DESCRIPTION_FILE))
        if stale:
            # the engines load every top-level *.safetensors: leftovers would be loaded with ours
            raise QCError(f"artifact folder {self.out_dir} already holds {', '.join(stale[:3])}: use an empty folder")
        self._types: dict[str, str] = {}      # every added tensor -> its quant type
        self._sizes: dict[str, int] = {}      # every added tensor -> data bytes (index total_size)
        self._open: SpilledFile | None = None  # the shard being filled (its tensors are on disk already)
        self._shards: list[tuple[str, list[str]]] = []  # (streaming file name, tensor names)
        self._finished = False
        self._resumable = resumable
        self._retired: list[str] = []         # spill files of closed shards, kept until release_retired()
        self._described: set[str] = set()      # description entries without a tensor (describe)

    # ------------------------------------------------------------------------------ resumable compiles

    def state(self) -> dict[str, Any]:
        """JSON of everything added so far (module docstring: Resumable); the open spill's data is synced to disk."""
        if self._open is not None:
            self._open.sync()
        return {"max_shard_bytes": self.max_shard_bytes, "types": [[n, t] for n, t in self._types.items()],
                "described": sorted(self._described),
                "sizes": [[n, s] for n, s in self._sizes.items()],
                "shards": [[f, list(names)] for f, names in self._shards],
                "open": None if self._open is None else {"spill": self._open.spill_path.name, **self._open.state()}}

    def part_files(self) -> list[str]:
        """File names (in out_dir) of the closed shards so far."""
        return [f for f, _ in self._shards]

    @property
    def open_spill(self) -> Path | None:
        """The spill file of the shard being filled (None before the first add / after a flush)."""
        return None if self._open is None else self._open.spill_path

    @classmethod
    def restore(cls, out_dir: Path, model_dtype: torch.dtype | str, state: dict[str, Any]) -> "ArtifactWriter":
        """A resumable writer continuing from `state()` (module docstring); ValueError/KeyError/TypeError on a
        malformed state (the caller validated the files' bytes)."""
        self = cls.__new__(cls)
        self.out_dir = Path(out_dir)
        self.model_dtype = as_model_dtype(model_dtype)
        self.max_shard_bytes = int(state["max_shard_bytes"])
        self._types = {str(n): str(t) for n, t in state["types"]}
        self._sizes = {str(n): int(s) for n, s in state["sizes"]}
        self._shards = [(str(f), [str(n) for n in names]) for f, names in state["shards"]]
        self._described = {str(n) for n in state.get("described", [])}
        self._open = None
        if state["open"] is not None:
            self._open = SpilledFile.reopen(self.out_dir / state["open"]["spill"], state["open"])
        if set(self._types) != set(self._sizes) | self._described or set(self._sizes) & self._described:
            raise ValueError("types and sizes name different tensors")
        self._finished, self._resumable, self._retired = False, True, []
        return self

    def release_retired(self) -> None:
        """Delete the spill files of shards closed before the last committed state (module docstring)."""
        for name in self._retired:
            (self.out_dir / name).unlink(missing_ok=True)
        self._retired = []

    def drop_resume_files(self) -> None:
        """After `finish`: delete what only a resume would read (part files, kept spills)."""
        self.release_retired()
        for name, _ in self._shards:
            (self.out_dir / name).unlink(missing_ok=True)

    def describe(self, name: str, quant_type: str) -> None:
        """A description entry with no tensor: `<linear>.weight` of a Linear stored without a `weight` tensor
        (W4A16 MoE experts: `weight_packed`, encode.encode_w4a16_moe), whose entry vLLM-Ascend's quant config
        reads to choose the scheme (modelslim_config.py get_linear_quant_type, is_layer_skipped_ascend)."""
        if name in self._types:
            raise ValueError(f"tensor {name!r} added twice")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"{name}: unknown quant type {quant_type!r}; known: {', '.join(QUANT_TYPES)}")
        self._types[name] = quant_type
        self._described.add(name)

    @property
    def quant_types(self) -> dict[str, str]:
        """A copy of {tensor name: quant type} for everything added so far."""
        return dict(self._types)

    def add(self, name: str, tensor: Tensor, quant_type: str) -> None:
        """Write one tensor (stored contiguous) under `name` with description type `quant_type`; the caller may
        drop or change it afterwards (its bytes are on disk)."""
        if self._finished:
            raise RuntimeError("ArtifactWriter.add after finish")
        if not isinstance(name, str) or not name or name in _FIXED_KEYS or name in EXTRA_DESCRIPTION_KEYS:
            raise ValueError(f"invalid tensor name {name!r}")
        if name in self._types:
            raise ValueError(f"tensor {name!r} added twice")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"{name}: unknown quant type {quant_type!r}; known: {', '.join(QUANT_TYPES)}")
        t = tensor.detach()
        size = t.numel() * t.element_size()
        if self._open is not None and len(self._open) and self._open.nbytes + size > self.max_shard_bytes:
            self._flush()
        if self._open is None:
            self._open = SpilledFile(self.out_dir / f".quant_model_weights-part{len(self._shards):05d}.spill")
        self._open.add(name, t)  # bytes to disk now (views and tensors sharing storage are fine)
        self._types[name], self._sizes[name] = quant_type, size

    def _flush(self) -> None:
        if self._open is None or not len(self._open):
            return
        fname = f"quant_model_weights-part{len(self._shards):05d}.safetensors"
        self._open.finish(self.out_dir / fname, metadata={"format": "pt"}, keep_spill=self._resumable)
        if self._resumable:
            self._retired.append(self._open.spill_path.name)
        self._shards.append((fname, self._open.names))
        self._open = None

    def finish(self, source_dir: Path | None, config: dict, group_size: int = 0,
               extra_description: dict | None = None, tied_lm_head: bool = False) -> dict[str, Any]:
        """Write the last shard, name the weight files, write description and config.json, copy source files.

        `config` is the source config.json as a dict (not modified). `tied_lm_head` (or the config's
        tie_word_embeddings) adds `lm_head.weight: "FLOAT"` to the description when that tensor is not stored.
        Returns the description as written.
        """
        if self._finished:
            raise RuntimeError("ArtifactWriter.finish called twice")
        if not self._types:
            raise QCError("no tensors were added: nothing to write")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 0:
            raise ValueError(f"group_size must be an int >= 0, got {group_size!r}")
        description = self._description(group_size, extra_description or {}, tied_lm_head or _tied(config))
        self._flush()
        self._name_weight_files()
        write_json(self.out_dir / DESCRIPTION_FILE, description, sort_keys=False)
        write_json(self.out_dir / "config.json", self._config(config, description["model_quant_type"]))
        if source_dir is not None:
            copy_source_files(Path(source_dir), self.out_dir)
        self._finished = True
        return description

    def _description(self, group_size: int, extra: dict, tied: bool) -> dict[str, Any]:
        types = dict(self._types)
        if tied and "lm_head.weight" not in types:
            types["lm_head.weight"] = FLOAT  # both engines look the key up even when the head is tied
        bad = sorted(k for k in extra if k not in EXTRA_DESCRIPTION_KEYS)
        if bad:
            # any other top-level key would be read as a tensor entry by the engines and the checker
            raise ValueError(f"extra_description keys {bad} are not description keys {EXTRA_DESCRIPTION_KEYS}")
        head = {"model_quant_type": model_quant_type(types.values()), "version": DESCRIPTION_VERSION,
                "group_size": group_size}
        head.update({k: extra[k] for k in sorted(extra)})
        head.update({k: types[k] for k in sorted(types, key=natural_key)})
        return head

    def _place(self, part: str, final: str) -> None:
        """A shard under its final name: renamed, or hard-linked when resumable (the part stays valid)."""
        if self._resumable:
            try:
                os.link(self.out_dir / part, self.out_dir / final)
            except OSError as e:  # a file system without hard links: a copy (same bytes, more disk)
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                shutil.copyfile(self.out_dir / part, self.out_dir / final)
        else:
            (self.out_dir / part).rename(self.out_dir / final)

    def _name_weight_files(self) -> None:
        if len(self._shards) == 1:
            self._place(self._shards[0][0], WEIGHTS_FILE)
            return
        total = len(self._shards)
        weight_map = {}
        for i, (tmp, names) in enumerate(self._shards, start=1):
            final = f"quant_model_weights-{i:05d}-of-{total:05d}.safetensors"
            self._place(tmp, final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": sum(self._sizes.values())},
                 "weight_map": {n: weight_map[n] for n in sorted(weight_map, key=natural_key)}}
        write_json(self.out_dir / INDEX_FILE, index, sort_keys=False)

    def _config(self, config: dict, quant_type: str) -> dict:
        cfg = copy.deepcopy(config)
        dtype = model_dtype_name(self.model_dtype)
        for part in (cfg, cfg.get("text_config")):
            if isinstance(part, dict):
                part.pop("quantization_config", None)  # a quant_method there overrides vLLM-Ascend's "ascend"
                for key in CODE_KEYS:
                    part.pop(key, None)
                # the engines pick the deq_scale decoding from it: keep both spellings in step (transformers 5: dtype)
                part["torch_dtype"] = part["dtype"] = dtype
        name = mindie_quantize_name(quant_type)
        for key in ("attn_quantize", "moe_quantize"):  # a source model's type claims would mistype our Linears
            cfg.pop(key, None)                         # (MindIE: mindie_keys.py; vLLM-Ascend reads moe_quantize)
        linears = {k[:-len(".weight")]: t for k, t in self._types.items() if k.endswith("_proj.weight")}
        if is_moe(linears):  # MindIE's atb loader types a MoE model's Linears by these keys (mindie_keys.py)
            keys, _ = moe_config_keys(linears)  # problems: the engine matrix refuses MindIE (engines.py)
            name = keys.get("quantize")
            if "attn_quantize" in keys:
                cfg["attn_quantize"] = keys["attn_quantize"]
        if name is None:
            cfg.pop("quantize", None)
        else:
            cfg["quantize"] = name
        return cfg


def _tied(config: dict) -> bool:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def copy_source_files(source_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer / generation / chat-template files (top level only; never code, and
    tokenizer_config.json without CODE_KEYS); returns their names."""
    if not source_dir.is_dir():
        raise QCError(f"source model folder {source_dir} does not exist")
    names = set()
    for pattern in COPY_PATTERNS:
        names |= {p.name for p in source_dir.glob(pattern) if p.is_file()}
    names = sorted(n for n in names if not any(Path(n).match(x) for x in _NEVER_COPY))
    for n in names:
        if n == "tokenizer_config.json" and _drop_code_keys(source_dir / n, out_dir / n):
            continue
        shutil.copyfile(source_dir / n, out_dir / n)  # contents only: no timestamps or permissions carried over
    return names


def _drop_code_keys(source: Path, dest: Path) -> bool:
    """Write `source` (a JSON object) to `dest` without CODE_KEYS when it has any; False (nothing written)
    when it has none (loading.check_aux_files refused a tokenizer_config.json that is not a JSON object before
    any work)."""
    try:
        content = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(content, dict) or not any(k in content for k in CODE_KEYS):
        return False
    write_json(dest, {k: v for k, v in content.items() if k not in CODE_KEYS}, sort_keys=False)
    return True
