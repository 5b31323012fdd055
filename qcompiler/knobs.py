"""Every QC_* environment variable qcompiler reads, in one place.

| variable        | default                         | meaning                                              |
|-----------------|---------------------------------|------------------------------------------------------|
| QC_CACHE        | ~/.cache/qcompiler              | where model aliases (smollm2-135m, ...) are built    |
| QC_DUMP_DIR     | unset                           | like --dump DIR: write the graph after every pass    |
| QC_NO_PROGRESS  | unset                           | "1" hides progress bars (CI logs)                    |
| QC_THREADS      | unset (torch's default)         | torch intra-op threads                               |
"""
import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of qcompiler's on-disk cache (model aliases are built under `models/`)."""
    return Path(os.environ.get("QC_CACHE") or Path.home() / ".cache" / "qcompiler")


def dump_dir() -> Path | None:
    """Graph dump folder from QC_DUMP_DIR, or None."""
    value = os.environ.get("QC_DUMP_DIR")
    return Path(value) if value else None


def progress_enabled() -> bool:
    """False when QC_NO_PROGRESS=1."""
    return os.environ.get("QC_NO_PROGRESS", "") not in ("1", "true", "yes")


def threads() -> int | None:
    """Torch intra-op thread count from QC_THREADS, or None for torch's default."""
    value = os.environ.get("QC_THREADS")
    return int(value) if value else None
