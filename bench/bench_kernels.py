"""Time qc::quant_matmul's CPU fast path (torch._int_mm) against its reference (exact float64 matmul).

Also times a plain fp32 matmul of the same shape as the float baseline. Prints a table and writes
bench/results/kernels.json. Run: `python3 bench/bench_kernels.py` (QC_THREADS sets torch threads).
Each figure is the median of several timed calls after one warm-up call.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qcompiler import knobs  # noqa: E402
from qcompiler.backends.ascend import kernels  # noqa: E402

SHAPES = [(512, 576, 576), (512, 1536, 1536), (1, 576, 576), (1, 1536, 1536)]  # (M, k, n)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocation and oneDNN primitive creation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_shape(m: int, k: int, n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    bias = torch.randint(-(2**16), 2**16, (n,), generator=g, dtype=torch.int32)
    deq = torch.rand(n, generator=g) * 1e-4
    xf, wf = x.float(), w.float()
    repeats = 20 if m > 1 else 200
    fast = median_ms(lambda: kernels.quant_matmul(x, w, deq, bias, torch.bfloat16), repeats)
    ref = median_ms(lambda: kernels.quant_matmul_ref(x, w, deq, bias, torch.bfloat16), repeats)
    fp32 = median_ms(lambda: xf @ wf.T, repeats)
    same = torch.equal(
        kernels.quant_matmul(x, w, deq, bias, torch.bfloat16),
        kernels.quant_matmul_ref(x, w, deq, bias, torch.bfloat16),
    )
    return {"M": m, "k": k, "n": n, "fast_ms": fast, "reference_ms": ref, "fp32_matmul_ms": fp32,
            "speedup": ref / fast, "bit_identical": same}


def main() -> None:
    if knobs.threads():
        torch.set_num_threads(knobs.threads())
    rows = [bench_shape(*s) for s in SHAPES]
    print(f"{'M':>5} {'k':>5} {'n':>5} {'fast ms':>9} {'ref ms':>9} {'fp32 ms':>9} {'speedup':>8} exact")
    for r in rows:
        print(f"{r['M']:>5} {r['k']:>5} {r['n']:>5} {r['fast_ms']:>9.3f} {r['reference_ms']:>9.3f} "
              f"{r['fp32_matmul_ms']:>9.3f} {r['speedup']:>7.1f}x {r['bit_identical']}")
    out = Path(__file__).resolve().parent / "results" / "kernels.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "loadavg_1min": os.getloadavg()[0]}  # other work on the box skews multi-thread timings
    out.write_text(json.dumps({"op": "qc::quant_matmul", "meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
