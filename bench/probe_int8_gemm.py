#!/usr/bin/env python3
"""The int8 product two ways, in SmolLM2-135M's prefill shapes (512 token rows): `torch._int_mm` against the exact
float32 GEMM `qnumerics.int8_matmul` runs without int8 dot products (widened codes, `torch.mm`), with bf16 and
float32 `F.linear` (transformers' kinds) beside them. Wall milliseconds per call, median of 10 after a warm-up; each
`_int_mm` result is checked equal to the float32 GEMM's integers first. This is what `qnumerics.int8_gemm_native`
decides from: the CPU's int8 dot-product instructions (VNNI / AMX), which oneDNN's `_int_mm` uses.

    flock /tmp/qc-heavy.lock python3 bench/probe_int8_gemm.py [--threads 1,2]
        -> bench/results/int8_gemm.md
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qcompiler.ir import qnumerics as qn  # noqa: E402

SHAPES = ((512, 3072, 576), (512, 960, 576), (512, 576, 576), (512, 576, 1536))  # rows, n, k: gate/up, qkv, o, down


def median_ms(f, n: int = 10) -> float:
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(threads: int) -> list[str]:
    torch.set_num_threads(threads)
    rows = []
    g = torch.Generator().manual_seed(0)
    for m, n, k in SHAPES:
        x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        wt, xf, wft = w.t(), x.float(), w.float().t().contiguous()
        xb, wb = xf.bfloat16(), w.float().bfloat16()
        assert torch.equal(torch._int_mm(x, wt), torch.mm(xf, wft).to(torch.int32))
        t_int = median_ms(lambda: torch._int_mm(x, wt))
        t_f32 = median_ms(lambda: torch.mm(xf, wft))
        t_bf16 = median_ms(lambda: torch.nn.functional.linear(xb, wb))
        t_fp32 = median_ms(lambda: torch.nn.functional.linear(xf, w.float()))
        rows.append(f"| {threads} | {m} x {k} @ {k} x {n} | {t_int:.2f} | {t_f32:.2f} | {t_f32 / t_int:.1f}x | "
                    f"{t_bf16:.2f} | {t_fp32:.2f} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    a = ap.parse_args()
    cpu = torch.cpu
    flags = {f: bool(getattr(cpu, f, lambda: False)()) for f in ("_is_vnni_supported", "_is_amx_tile_supported",
                                                                  "_is_avx512_bf16_supported")}
    lines = ["# int8 GEMM: `torch._int_mm` vs the exact float32 GEMM (`bench/probe_int8_gemm.py`)", "",
             f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
             + ", ".join(f"{k.strip('_')} {v}" for k, v in flags.items())
             + f"; `qnumerics.int8_gemm_native()` here: {qn.int8_gemm_native()}", "",
             "| threads | shape | _int_mm ms | float32 GEMM ms | speed-up | bf16 linear ms | fp32 linear ms |",
             "|---|---|---|---|---|---|---|"]
    for t in (int(v) for v in a.threads.split(",")):
        lines += measure(t)
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "results" / "int8_gemm.md"
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
