"""Probe: peak memory of ONE `gptq_quantize` call above the caller's Hessian, in units of H (issue 15, part 1).

GPTQ at a Qwen2.5-7B down_proj has k = 18944, so H (float32 k x k) is 1.34 GiB and every k x k buffer the call
holds counts. This measures, in a fresh process per (checkout, k, act_order), the high-water mark the call adds
above the process's RSS with H already in memory: VmHWM after resetting it (/proc/self/clear_refs 5) minus VmRSS
before, divided by 4 k^2 (the test tests/passes/test_gptq.py::test_gptq_holds_a_few_hessian_sized_buffers runs
the same problem at k 2048: tests/helpers.py `hessian_peak_preamble`). glibc's mmap threshold is fixed
(tests/helpers.py PEAK_MALLOC_ENV, as peak_in_subprocess) so that freed temporaries are returned at once. A
checkout that keeps a float32 copy of H beside the float64 buffer reads ~3 + transients; one that narrows the
buffer in place ~2 + transients (the transients are of a fixed size of some MiB: ~0.5 H at k 2048, ~0.2 at 4096).

    python3 bench/probe_gptq_peak.py [--ks 2048 4096] [--before CHECKOUT]   # one JSON line per measurement

CHECKOUT: a directory holding an older `qcompiler` package (e.g. `git archive e45872c | tar -x -C DIR`).
Light (k 4096: H 64 MiB, a few seconds each), so it does not take the heavy lock.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import PEAK_MALLOC_ENV, hessian_peak_preamble  # noqa: E402

# the problem and `peak` come from tests/helpers.py `hessian_peak_preamble` (the test's, at any k); the checkout's
# qcompiler is put first on the path before it
CHILD_BODY = r"""
from qcompiler.passes.gptq import gptq_quantize
act_order = sys.argv[2] == "1"
scale = w.abs().amax(1, keepdim=True) / 7
gptq_quantize(w[:, :64], h[:64, :64], scale, 4)  # libraries and kernels loaded
print(peak(lambda: gptq_quantize(w, h, scale, 4, act_order=act_order)))
"""


def peak_units(checkout: Path, k: int, act_order: bool) -> float:
    """Units of H one gptq_quantize call adds above the caller's H, with `checkout`'s qcompiler first."""
    child = "import sys\nsys.path.insert(0, sys.argv[1])\n" + hessian_peak_preamble(k) + CHILD_BODY
    out = subprocess.run([sys.executable, "-c", child, str(checkout), "1" if act_order else "0"],
                         capture_output=True, text=True, check=True, env=dict(os.environ, **PEAK_MALLOC_ENV))
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--before", type=Path, help="an older checkout to measure first")
    a = p.parse_args(argv)
    for name, checkout in (("before", a.before), ("this", ROOT)):
        if checkout is None:
            continue
        for k in a.ks:
            for act_order in (True, False):
                units = peak_units(checkout.resolve(), k, act_order)
                print(json.dumps({"checkout": name, "path": str(checkout), "k": k, "act_order": act_order,
                                  "peak_xH_above_caller_H": round(units, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
