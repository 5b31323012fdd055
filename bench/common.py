"""What the bench scripts share: the machine-wide heavy-job lock, and the generated blocks of BENCHMARKS.md.

`HeavyLock()` is the lock every real-model job takes (flock(2) on LOCK, the same lock as
`flock /tmp/qc-heavy.lock CMD`): one compile / eval / timing at a time on a shared machine. With
QC_HEAVY_LOCK_HELD=1 the caller already holds it for a whole series (`flock /tmp/qc-heavy.lock env
QC_HEAVY_LOCK_HELD=1 python3 bench/...`) and nothing is acquired (a second flock on the file would wait for us).

`replace_block(begin, end, body)` rewrites the lines between two markers of BENCHMARKS.md (each script owns its
markers), or appends a new section with them when they are absent and a heading is given.
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
LOCK = "/tmp/qc-heavy.lock"


class HeavyLock:
    """One acquisition of the heavy-job lock (blocks until free); `.waited` = seconds spent waiting. With `what`,
    the wait and the hold are reported on stderr."""

    def __init__(self, what: str | None = None):
        self.what = what

    def __enter__(self):
        self.held = os.environ.get("QC_HEAVY_LOCK_HELD") == "1"
        self.waited = 0.0
        if self.held:
            return self
        if self.what:
            print(f"[lock] waiting for {LOCK}: {self.what}", file=sys.stderr, flush=True)
        self.f = open(LOCK, "a")
        t0 = time.perf_counter()
        fcntl.flock(self.f, fcntl.LOCK_EX)
        self.acquired = time.perf_counter()
        self.waited = self.acquired - t0
        return self

    def __exit__(self, *exc):
        if self.held:
            return
        if self.what:
            print(f"[lock] {self.what}: held {time.perf_counter() - self.acquired:.0f} s", file=sys.stderr, flush=True)
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def replace_block(begin: str, end: str, body: str, heading: str | None = None, path: Path = BENCHMARKS) -> bool:
    """Put `body` between the `begin` and `end` marker lines of `path` (markers kept). Without the markers:
    append `heading`, the markers and `body` when a heading is given, else change nothing. True if written."""
    if not path.exists():
        return False
    text = path.read_text()
    block = begin + "\n" + body.strip("\n") + "\n" + end
    if begin in text and end in text.split(begin, 1)[1]:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif heading:
        text = text.rstrip() + "\n\n" + heading + "\n\n" + block + "\n"
    else:
        return False
    path.write_text(text)
    return True
