"""Writing safetensors files without holding their tensors in memory, byte-identical to `save_file`.

`safetensors.torch.save_file(tensors, path)` needs every tensor of the file in memory at once: a writer
that buffers a 5 GiB shard holds 5 GiB, and a 2.5 GB embedding has to exist whole before it is written.
This module writes the same bytes with a bounded footprint:

- `SpilledFile`: tensors arrive one by one in any order (`add(name, tensor)`); each tensor's bytes go to a
  spill file on disk at once, only (name, dtype, shape, position) stays in memory. `finish(path)` writes
  the safetensors header and copies the data from the spill file in the file's layout order, in chunks
  (`os.copy_file_range`: in-kernel, never more than CHUNK_BYTES in user memory), then deletes the spill
  (or keeps it, `keep_spill=True`, for a resumable compile: resume.py). `state()` / `SpilledFile.reopen`
  carry an open spill across processes: its entries as JSON, its bytes beyond the saved end cut off.
- `StreamingFile`: every tensor's (name, dtype, shape) is known before any data exists (e.g. a synthetic
  checkpoint drawn row block by row block): the header is written first, then the data is streamed in
  layout order (`layout_order`), any number of chunks per tensor.

Both produce exactly the bytes `save_file(tensors, path, metadata)` produces for the same tensors: the
file format is an 8-byte little-endian header length N, N bytes of compact JSON header padded with
spaces to a multiple of 8 (`__metadata__` first, then one entry per tensor with its dtype code, shape
and [begin, end) data offsets), then the data, packed without gaps in the layout order. That order and
the dtype codes are the safetensors serializer's own (its `prepare`: tensors sorted by dtype, larger
alignment first, then by name): they are read off a header the library itself writes for one-element
placeholders of the same names and dtypes (`layout`), so a library version that lays files out
differently is followed, not contradicted; tests/test_safetensors_stream.py compares the bytes with
`save_file` for every dtype the compiler writes.
Limits: CPU tensors of the plain dtypes (no packed float4); little-endian host (as safetensors' own
`save_file`, which writes the in-memory bytes).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as _save_bytes

#: bytes per copy / draw step: the most tensor data the writers hold in user memory at once
CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: name, dtype, shape (data size follows)."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n * torch.empty((), dtype=self.dtype).element_size()


def _placeholder_header(entries: list[Entry]) -> list[tuple[str, dict]]:
    """The header safetensors writes for one-element tensors of these names and dtypes, in its order."""
    placeholders = {e.name: torch.zeros(1, dtype=e.dtype) for e in entries}
    blob = _save_bytes(placeholders)
    n = struct.unpack("<Q", blob[:8])[0]
    pairs = json.loads(blob[8:8 + n].decode("utf-8"), object_pairs_hook=list)
    return [(k, dict(v)) for k, v in pairs if k != "__metadata__"]


def layout(entries: list[Entry], metadata: dict[str, str] | None) -> tuple[bytes, list[Entry]]:
    """(header bytes including the 8-byte length prefix, entries in data order) of the file that
    `save_file` would write for tensors described by `entries`."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    by_name = {e.name: e for e in entries}
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    ordered, offset = [], 0
    for name, placeholder in _placeholder_header(entries):
        e = by_name[name]
        header[name] = {"dtype": placeholder["dtype"], "shape": [int(d) for d in e.shape],
                        "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
        ordered.append(e)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


def layout_order(entries: list[Entry]) -> list[Entry]:
    """The order in which the data of `entries` follows the header (see the module docstring)."""
    return layout(entries, None)[1]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy view of a CPU tensor's bytes (row-major; made contiguous first if it is not)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _write_all(f, data: memoryview) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = f.write(view)
        view = view[written:]


def _copy_range(src, dst, offset: int, count: int) -> None:
    """Copy `count` bytes of file `src` from `offset` to the current end of `dst` (both open, binary)."""
    dst.flush()
    while count:
        step = min(count, CHUNK_BYTES)
        try:
            done = os.copy_file_range(src.fileno(), dst.fileno(), step, offset_src=offset)
        except OSError:  # e.g. a filesystem without it: plain read/write of one chunk
            src.seek(offset)
            done = dst.write(src.read(step))
            dst.flush()
        if done <= 0:
            raise OSError(f"short copy from {src.name} at byte {offset}")
        offset += done
        count -= done
        dst.seek(0, os.SEEK_END)


class SpilledFile:
    """One safetensors file assembled from tensors spilled to disk as they arrive (module docstring)."""

    def __init__(self, spill_path: Path):
        self.spill_path = Path(spill_path)
        self._spill = open(self.spill_path, "xb")
        self._entries: dict[str, tuple[Entry, int]] = {}   # name -> (entry, offset in the spill file)
        self._end = 0

    @property
    def nbytes(self) -> int:
        """Data bytes added so far."""
        return self._end

    @property
    def names(self) -> list[str]:
        """Tensor names in the order they were added."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor`'s bytes to the spill file now (nothing of it is kept)."""
        if name in self._entries:
            raise ValueError(f"tensor {name!r} added twice")
        data = tensor_bytes(tensor)
        entry = Entry(name, tensor.dtype, tuple(int(d) for d in tensor.shape))
        if data.nbytes != entry.nbytes:
            raise ValueError(f"{name}: {data.nbytes} bytes for shape {list(entry.shape)} {entry.dtype}")
        _write_all(self._spill, data)
        self._entries[name] = (entry, self._end)
        self._end += entry.nbytes

    def sync(self) -> None:
        """Flush the spill file to the disk (fsync): what was added survives a power loss."""
        self._spill.flush()
        os.fsync(self._spill.fileno())

    def state(self) -> dict:
        """JSON of what was added: {"end": data bytes, "entries": [[name, dtype, shape, offset], ...]}."""
        return {"end": self._end, "entries": [[e.name, str(e.dtype).removeprefix("torch."), list(e.shape), off]
                                              for e, off in self._entries.values()]}

    @classmethod
    def reopen(cls, spill_path: Path, state: dict) -> "SpilledFile":
        """The spill file `spill_path` as `state()` described it (bytes beyond state["end"], written after
        that state was taken, are cut off); ValueError when the file is shorter or `state` is malformed."""
        self = cls.__new__(cls)
        self.spill_path = Path(spill_path)
        self._entries = {}
        for name, dtype, shape, offset in state["entries"]:
            dt = getattr(torch, str(dtype), None)
            if not isinstance(dt, torch.dtype) or not isinstance(name, str) or name in self._entries:
                raise ValueError(f"{spill_path}: bad entry {name!r} ({dtype})")
            self._entries[name] = (Entry(name, dt, tuple(int(d) for d in shape)), int(offset))
        self._end = int(state["end"])
        if os.path.getsize(self.spill_path) < self._end:
            raise ValueError(f"{spill_path}: shorter than the {self._end} bytes recorded")
        self._spill = open(self.spill_path, "r+b")
        self._spill.truncate(self._end)
        self._spill.seek(self._end)
        return self

    def finish(self, path: Path, metadata: dict[str, str] | None = None, keep_spill: bool = False) -> None:
        """Write the safetensors file `path` (must not exist) and delete the spill file (unless `keep_spill`)."""
        self._spill.flush()
        header, ordered = layout([e for e, _ in self._entries.values()], metadata)
        with open(self.spill_path, "rb") as src, open(path, "xb") as dst:
            dst.write(header)
            for e in ordered:
                if e.nbytes:
                    _copy_range(src, dst, self._entries[e.name][1], e.nbytes)
        if keep_spill:
            self._spill.close()
        else:
            self.discard()

    def discard(self) -> None:
        """Close and delete the spill file (finish does this; call it on failure)."""
        self._spill.close()
        self.spill_path.unlink(missing_ok=True)


class StreamingFile:
    """A safetensors file whose tensors are all declared up front and streamed in layout order.

    `with StreamingFile(path, entries, metadata) as f:` then for each entry of `f.order`, `f.write(chunk)`
    with consecutive pieces of its data (any split; each chunk a tensor of that entry's dtype, rows in
    order). Closing checks that exactly the declared bytes were written; on an exception the partial
    file is deleted.
    """

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header, self.order = layout(list(entries), metadata)
        self._f = open(self.path, "xb")
        self._f.write(header)
        self._index, self._left = 0, self.order[0].nbytes if self.order else 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._f.close()
            self.path.unlink(missing_ok=True)
            return False
        self.close()
        return False

    @property
    def current(self) -> Entry | None:
        """The entry whose data is expected next (None when every byte was written)."""
        self._skip_empty()
        return self.order[self._index] if self._index < len(self.order) else None

    def _skip_empty(self) -> None:
        while self._index < len(self.order) and self._left == 0:
            self._index += 1
            self._left = self.order[self._index].nbytes if self._index < len(self.order) else 0

    def write(self, chunk: torch.Tensor) -> None:
        entry = self.current
        if entry is None:
            raise ValueError(f"{self.path}: more data than declared")
        if chunk.dtype != entry.dtype:
            raise ValueError(f"{self.path}: {entry.name} is {entry.dtype}, got a {chunk.dtype} chunk")
        data = tensor_bytes(chunk)
        if data.nbytes > self._left:
            raise ValueError(f"{self.path}: chunk of {data.nbytes} bytes overruns {entry.name} ({self._left} left)")
        _write_all(self._f, data)
        self._left -= data.nbytes

    def close(self) -> None:
        if self._f.closed:
            return
        missing = self.current
        self._f.close()
        if missing is not None:
            self.path.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: data of {missing.name} (and what follows) was never written")
