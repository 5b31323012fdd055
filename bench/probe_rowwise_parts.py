#!/usr/bin/env python3
"""One-token int8 GEMV of the row-wise kernel (backends/ascend/kernels.py `_rowwise_bag`) with the weight held in
1 / 2 / 4 / 8 parts along n (`kernels.rowwise_codes`), against transformers' kind of bf16 `F.linear`, in
SmolLM2-135M's decode shapes. Each figure cycles through 40 different weights, so every call streams its weight
from memory as a decode step does (one weight, called in a loop, would sit in cache and hide what the parts change).
Min over 7 rounds of 40 passes, wall microseconds per call; each parts figure is checked bit-identical to one part
first. This is what `kernels.ROWWISE_PART_MIN_CHANNELS` / `ROWWISE_MAX_PARTS` were chosen from.

    flock /tmp/qc-heavy.lock python3 bench/probe_rowwise_parts.py [--threads 1,2]
        -> bench/results/rowwise_parts.md
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qcompiler.backends.ascend import kernels as K  # noqa: E402

SHAPES = ((576, 576), (960, 576), (3072, 576), (576, 1536))  # o; merged q/k/v; merged gate/up; down (n, k)
WEIGHTS = 40


def per_call_us(calls: list, rounds: int = 7, passes: int = 40) -> float:
    for f in calls:
        f()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(passes):
            for f in calls:
                f()
        best = min(best, (time.perf_counter() - t0) / passes / len(calls) * 1e6)
    return best


def measure(threads: int) -> list[str]:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    lines = []
    for n, k in SHAPES:
        x = torch.randn(1, 1, k, generator=g).bfloat16()
        codes, _ = K.dynamic_quant_codes(x)
        step = K.exact_slice_width(k)
        ws = [torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8) for _ in range(WEIGHTS)]
        cells = []
        want = K._rowwise_bag(codes, K.rowwise_codes(ws[0]), step)
        for parts in (1, 2, 4, 8):
            packed = [K.rowwise_codes(w, parts) for w in ws]
            assert torch.equal(K._rowwise_bag(codes, packed[0], step), want)
            cells.append(per_call_us([lambda p=p: K._rowwise_bag(codes, p, step) for p in packed]))
        wb = [w.to(torch.bfloat16) for w in ws]
        cells.append(per_call_us([lambda w=w: torch.nn.functional.linear(x, w) for w in wb]))
        chosen = K.rowwise_parts(n, k)
        lines.append(f"| {threads} | [{k}] x [{k}, {n}] | " + " | ".join(f"{c:.0f}" for c in cells) + f" | {chosen} |")
        print(lines[-1], flush=True)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    a = p.parse_args()
    head = ["| threads | GEMV | 1 part | 2 parts | 4 parts | 8 parts | bf16 linear | parts chosen |",
            "|---|---|---|---|---|---|---|---|"]
    print("\n".join(head), flush=True)
    rows = [line for t in a.threads.split(",") for line in measure(int(t))]
    out = Path(__file__).resolve().parent / "results" / "rowwise_parts.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(head + rows) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
