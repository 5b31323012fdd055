"""Every QC_* environment variable qcompiler reads, in one place.

| variable        | default                         | meaning                                              |
|-----------------|---------------------------------|------------------------------------------------------|
| QC_CACHE        | ~/.cache/qcompiler              | where model aliases (smollm2-135m, ...) are built    |
| QC_DUMP_DIR     | unset                           | like --dump DIR: write the graph after every pass    |
| QC_NO_PROGRESS  | unset                           | "1" hides progress bars (CI logs)                    |
| QC_THREADS      | unset (torch's default; with    | torch intra-op threads                               |
|                 | --workers N: cores / N)         |                                                      |
| QC_INT8_GEMM    | auto                            | int8 products: "native" torch._int_mm, "float32"     |
|                 |                                 | exact float32 GEMMs, "onednn" as native but full-    |
|                 |                                 | sequence layers on oneDNN's int8 linear with packed  |
|                 |                                 | weights (backends/ascend/onednn_linear.py), "auto"   |
|                 |                                 | by the CPU (qnumerics.int8_gemm_native, onednn_      |
|                 |                                 | linear.applies); same bits, speed only               |
| QC_TEST_PAUSE   | unset                           | test hook: PHASE[@RANK][:SECONDS] makes a compile    |
|                 |                                 | print "qcompile: test pause at PHASE (pid P, rank R)"|
|                 |                                 | on stderr and sleep                                  |
|                 |                                 | (default 60 s) there, so a test can send a signal at |
|                 |                                 | a known point; phases: work (OUT's temporary folder  |
|                 |                                 | exists), layerK (every rank: end of layer K, its     |
|                 |                                 | resume state committed), replace (new OUT in place,  |
|                 |                                 | old not yet deleted). Not for users.                 |
| QC_TEST_KILL_   | unset                           | test hook: K makes a compile SIGKILL itself right    |
| AFTER_LAYER     |                                 | after layer K's resume state is committed (printing  |
|                 |                                 | "qcompile: test kill after layer K"), as a power     |
|                 |                                 | loss would stop it (resume.py). Not for users.       |
| QC_WORKERS_     | unset                           | "1" in the ranks `--workers N` starts: they leave    |
| LAUNCHED        |                                 | printing errors to the launcher (distributed.py).    |
|                 |                                 | Set by qcompile, not for users.                      |
"""
import os
import signal
import sys
import time
from pathlib import Path


def cache_dir() -> Path:
    """Root of qcompiler's on-disk cache (model aliases are built under `models/`)."""
    return Path(os.environ.get("QC_CACHE") or Path.home() / ".cache" / "qcompiler")


def dump_dir() -> Path | None:
    """Graph dump folder from QC_DUMP_DIR, or None."""
    value = os.environ.get("QC_DUMP_DIR")
    return Path(value) if value else None


def progress_enabled() -> bool:
    """False when QC_NO_PROGRESS=1, and on every rank but 0 of a compile on several processes (RANK, set by
    torchrun / --workers: distributed.py), so one bar is shown."""
    if os.environ.get("RANK", "0") not in ("", "0"):
        return False
    return os.environ.get("QC_NO_PROGRESS", "") not in ("1", "true", "yes")


def threads() -> int | None:
    """Torch intra-op thread count from QC_THREADS, or None for torch's default."""
    value = os.environ.get("QC_THREADS")
    return int(value) if value else None


#: QC_INT8_GEMM values: "auto" decides by the CPU (qnumerics.int8_gemm_native)
INT8_GEMM_CHOICES = ("auto", "onednn", "native", "float32")


def int8_gemm() -> str:
    """QC_INT8_GEMM: "auto" (unset), "onednn", "native" or "float32" (qnumerics.int8_gemm_native,
    backends/ascend/onednn_linear.applies); QCError otherwise."""
    value = os.environ.get("QC_INT8_GEMM") or "auto"
    if value not in INT8_GEMM_CHOICES:
        from .errors import QCError
        raise QCError(f"QC_INT8_GEMM={value!r}: expected one of {', '.join(INT8_GEMM_CHOICES)} (or unset)")
    return value


def test_pause(phase: str) -> None:
    """Test hook (QC_TEST_PAUSE=PHASE[:SECONDS]): announce PHASE on stderr and sleep there; else nothing."""
    value = os.environ.get("QC_TEST_PAUSE", "")
    name, _, seconds = value.partition(":")
    name, _, rank = name.partition("@")  # PHASE@R: only rank R of a compile on several processes pauses
    if name != phase or (rank and rank != (os.environ.get("RANK") or "0")):
        return
    print(f"qcompile: test pause at {phase} (pid {os.getpid()}, rank {os.environ.get('RANK', '0') or '0'})",
          file=sys.stderr, flush=True)
    time.sleep(float(seconds or 60))


def test_kill_after_layer(index: int) -> None:
    """Test hook (QC_TEST_KILL_AFTER_LAYER=K): SIGKILL this process after layer K (nothing runs after it:
    no cleanup, no buffered output); else nothing."""
    if os.environ.get("QC_TEST_KILL_AFTER_LAYER", "") == str(index):
        print(f"qcompile: test kill after layer {index}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
