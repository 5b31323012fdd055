"""Memory the float model needs when calibration text is sampled from it, checked before any work.

Without calibration text (`qcompile MODEL` without --calib, `qcompile quant` without --calib_file) the driver
loads the whole float model (ir/capture.py `HFSkeleton.float_model`, on the validated safetensors) and samples
text from it (calib_data.sample_windows_from_model);
the compile itself holds about one decoder layer. A model that cannot fit must be refused before any work with
a one-line error asking for calibration text, never killed by the out-of-memory killer half way.

Estimate (`sampling_bytes`, bytes): the weights as loaded, sum over the safetensors headers of numel x the
itemsize of the compile dtype (read from the headers only, no tensor data), times 1.2 for the loader's transient
copies and allocator slack, plus the KV cache of `sequences` x `seq_len` tokens (2 x layers x kv_heads x head_dim
values each) and two float32 logits rows per sequence and step, plus a fixed 512 MiB for the sampling loop.
It is compared with psutil's `virtual_memory().available` (memory the process can take without swapping).
"""
from __future__ import annotations

import contextlib
import gc

import torch

from .errors import QCError
from .safetensors_open import safe_open

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
LOADER_FACTOR = 1.2
FIXED_OVERHEAD = 512 * 2**20


def weight_numel(ckpt) -> tuple[int, int]:
    """(floating-point elements, bytes of the other tensors as stored) over every safetensors file's header."""
    floats = other = 0
    for file_name in sorted(set(ckpt.weight_map.values())):
        with safe_open(ckpt.path / file_name, "pt") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= int(d)
                dtype = sl.get_dtype()
                if dtype in ("F64", "F32", "F16", "BF16"):
                    floats += numel
                else:
                    other += numel * _ITEMSIZE.get(dtype, 1)
    return floats, other


def sampling_bytes(ckpt, sequences: int, seq_len: int) -> int:
    """Estimated peak bytes of loading the float model and sampling `sequences` x `seq_len` tokens from it."""
    floats, other = weight_numel(ckpt)
    itemsize = torch.tensor([], dtype=ckpt.dtype).element_size()
    cfg = ckpt.config
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    kv = 2 * ckpt.num_layers * kv_heads * head_dim * sequences * seq_len * itemsize
    logits = 2 * sequences * int(cfg["vocab_size"]) * 4
    return int((floats * itemsize + other) * LOADER_FACTOR) + kv + logits + FIXED_OVERHEAD


def available_bytes() -> int:
    import psutil
    return int(psutil.virtual_memory().available)


def check_sampling_memory(ckpt, sequences: int, seq_len: int, available: int | None = None) -> None:
    """QCError (before any work) when sampling calibration text from the float model would not fit in memory."""
    need = sampling_bytes(ckpt, sequences, seq_len)
    have = available_bytes() if available is None else available
    if need > have:
        raise QCError(f"{ckpt.path}: no calibration text was given, and sampling it from the float model needs "
                      f"about {need / 2**30:.1f} GiB of memory ({have / 2**30:.1f} GiB available): pass calibration "
                      f"text with --calib FILE (qcompile quant: --calib_file FILE), which compiles one decoder layer "
                      f"at a time")


def release_freed_memory() -> None:
    """Between decoder layers: collect the layer's garbage cycles (FX GraphModules and their generated classes
    reference each other, so reference counting alone never frees a finished layer's graph) and hand the freed
    heap back to the OS (glibc `malloc_trim(0)`; a no-op where libc has none).

    Without it, peak RSS crept up ~1 MiB per layer on SmolLM2's width (16 x 512 calibration: per-layer peaks
    495 -> 588 MiB anonymous over 30 layers; with it flat at 493-542): uncollected cycles and heap fragmentation
    from the activations' large transient buffers (BENCHMARKS.md, "Memory at real widths").
    Inside `long_lived_frozen` the collection scans only what was made since (about 1 ms instead of 40-60 ms on
    SmolLM2, whose long-lived objects are mostly torch's and transformers' own)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def long_lived_frozen():
    """Around the layer loop: `gc.freeze()` every object alive now (the modules torch and transformers imported,
    the checkpoint index, the skeleton), so each `release_freed_memory` scans only the objects made since: a
    finished layer's graphs. What is frozen is still freed by reference counting; a frozen object that becomes
    part of a garbage cycle waits for the exit, where `gc.unfreeze()` hands everything back to the collector
    (compiles run in-process one after another: tests, `qcompile quant` batches). Garbage existing at entry is
    collected first, so none of it is frozen."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _malloc_trim():
    """glibc's malloc_trim, or None (another libc, or none loadable)."""
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
