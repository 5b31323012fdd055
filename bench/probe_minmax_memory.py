"""Probe: peak memory above its input of ONE min/max statistic of a Qwen2.5-7B down_proj input (issue 15, part 1).

`MinMaxObserver` (static activation ranges) and `LayerRunner.collect(extrema=True, keep_rows=...)` (smooth's
statistics) are fed each Linear's input a batch at a time; a 7B down_proj input of 16 x 512 tokens is a bf16
[8192, 18944] tensor (296 MiB). This measures, in a fresh process per checkout, the high-water mark one
`MinMaxObserver` call adds above that input: VmHWM after resetting it (/proc/self/clear_refs 5) minus VmHWM
before. A checkout whose observer widens the whole input to float32 adds ~592 MiB; one that takes min / max in
the input's dtype adds ~0.

    python3 bench/probe_minmax_memory.py [--before CHECKOUT]   # prints one line per checkout (MiB)

CHECKOUT: a directory holding an older `qcompiler` package (e.g. `git archive f5d90a0 | tar -x -C DIR`).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from qcompiler.calibration.observers import MinMaxObserver
x = torch.empty(8192, 18944, dtype=torch.bfloat16).normal_()
def hwm():
    return next(int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))
MinMaxObserver()(x[:8])  # libraries and kernels loaded
open('/proc/self/clear_refs', 'w').write('5')
base = hwm()
MinMaxObserver()(x)
print(hwm() - base)
"""


def peak_above_input(checkout: Path) -> int:
    """MiB one observer call adds above its bf16 [8192, 18944] input, with `checkout`'s qcompiler first."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(checkout)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="an older checkout to compare with")
    a = p.parse_args(argv)
    sides = ([("before", Path(a.before))] if a.before else []) + [("this checkout", ROOT)]
    for name, path in sides:
        print(f"{name} ({path}): MinMaxObserver on bf16 [8192, 18944]: {peak_above_input(path)} MiB above the input")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
