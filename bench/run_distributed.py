"""Several processes, one compile (issue 15 part 3): wall time of 1, 2 and 4 processes of one thread each.

For each pipeline (w8a8d, smooth,w8a8) on SmolLM2-135M, 16 x 512 tokens of wiki_calib.jsonl, under ONE
acquisition of the global heavy lock (all rows share the machine's load):

    QC_THREADS=1 python3 -m qcompiler.cli smollm2-135m --passes P --calib wiki_calib.jsonl --calib-samples 16
        --seq-len 512 -o OUT --force --workers N            (N = 1, 2, 4; this checkout's qcompiler)

wall seconds measured from outside (process start, rendezvous and imports included), peak RSS of the largest
process (os.wait4 of the launcher: the maximum over it and its ranks), speed-up = wall(1) / wall(N), and
whether OUT is byte-identical to the 1-process OUT (tests/byte_identity.py's digests: every file but the
report, every tensor, the executable graph as loaded). Results: bench/results/distributed.json and the
`distributed` block of BENCHMARKS.md. On a machine with fewer cores than processes the ranks share cores:
more processes cannot be faster there, the table says what they cost.

    flock /tmp/qc-heavy.lock env QC_HEAVY_LOCK_HELD=1 python3 bench/run_distributed.py
    python3 bench/run_distributed.py --only w8a8d --workers 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import HeavyLock, replace_block  # noqa: E402
from run_memory import _commit, run_compile  # noqa: E402
from run_pipelines import load1  # noqa: E402
from tests.byte_identity import digest_out  # noqa: E402

SHARED = ROOT.parent / "shared"
CALIB = SHARED / "data" / "calib" / "wiki_calib.jsonl"
RESULTS = ROOT / "bench" / "results" / "distributed.json"
MODEL = "smollm2-135m"
PIPELINES = ("w8a8d", "smooth,w8a8")  # also run: --only gptq,w4a16:group=64 --workers 1 2
BEGIN, END = "<!-- distributed -->", "<!-- /distributed -->"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=list(PIPELINES), help="pipelines (--passes values)")
    ap.add_argument("--workers", nargs="*", type=int, default=[1, 2, 4])
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--work", default="/tmp/qc-bench-distributed")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    base = base_out = None
    with HeavyLock("bench/run_distributed.py") as lock:
        load_before = load1()
        for passes in a.only:
            base = None
            for n in a.workers:
                out = work / f"{passes.replace(',', '_')}_{n}"
                cmd = [sys.executable, "-m", "qcompiler.cli", MODEL, "--passes", passes, "--calib", str(CALIB),
                       "--calib-samples", str(a.calib_samples), "--seq-len", str(a.seq_len), "-o", str(out),
                       "--force", "--workers", str(n)]
                os.environ["QC_THREADS"] = "1"  # one thread per process
                r = run_compile(cmd, ROOT, work / f"{out.name}.log")
                row = {"passes": passes, "workers": n, "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"],
                       "rc": r["rc"]}
                if r["rc"] == 0:
                    digests = digest_out(out)
                    if n == a.workers[0]:
                        base, base_out = digests, out
                    row["differ_from_1"] = (None if base is None else
                                            sorted(k for k in set(base) | set(digests) if base.get(k) != digests.get(k)))
                    if row["differ_from_1"]:
                        row["weight_bytes_differ"] = weight_bytes_differ(base_out, out)
                print(json.dumps({k: v for k, v in row.items() if k != "differ_from_1"}
                                 | {"differ": len(row.get("differ_from_1") or [])}), flush=True)
                rows.append(row)
                save(rows, a, lock.waited, load_before)  # after every row: a stopped series keeps what it measured
    return 0


def save(rows: list[dict], a, waited: float, load_before: float) -> None:
    old = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    done = {(r["passes"], r["workers"]) for r in rows}
    data = {"commit": _commit(ROOT), "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "lock_waited_s": round(waited, 1), "load": [load_before, load1()],
            "calib": f"{a.calib_samples} x {a.seq_len} of {CALIB.name}",
            "rows": [r for r in old if (r["passes"], r["workers"]) not in done] + rows}  # earlier rows kept
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))
    render(data)


def weight_bytes_differ(a: Path, b: Path) -> float:
    """Fraction of the bytes of the artifact's integer weight tensors (int8 codes; packed int4 pairs) that differ."""
    from safetensors.torch import load_file
    import torch
    ta, tb = load_file(a / "quant_model_weights.safetensors"), load_file(b / "quant_model_weights.safetensors")
    total = differ = 0
    for name, x in ta.items():
        if x.dtype == torch.int8 and name.endswith(".weight"):
            total += x.numel()
            differ += int((x != tb[name]).sum())
    return round(differ / max(total, 1), 4)


def render(data: dict) -> None:
    lines = [f"{data['commit']}, {data['cpus']} CPUs, {data['calib']}, one thread per process, load "
             f"{data['load'][0]} -> {data['load'][1]}:", "",
             "| --passes | processes | wall s | speed-up vs 1 | peak RSS MiB (largest process) | artifact vs 1 process |",
             "|---|---|---|---|---|---|"]
    walls = {}
    for r in data["rows"]:
        if r["rc"] != 0:
            lines.append(f"| `{r['passes']}` | {r['workers']} | failed (exit {r['rc']}) | | | |")
            continue
        walls.setdefault(r["passes"], r["wall_s"])
        diff = r.get("differ_from_1")
        same = ("(reference)" if r["workers"] == 1 else "byte-identical" if diff == [] else
                f"{len(diff)} digests differ; {100 * r.get('weight_bytes_differ', 0):.1f}% of weight code bytes"
                if diff else "-")
        lines.append(f"| `{r['passes']}` | {r['workers']} | {r['wall_s']} | {walls[r['passes']] / r['wall_s']:.2f}x "
                     f"| {r['peak_rss_mib']:,.0f} | {same} |")
    replace_block(BEGIN, END, "\n".join(lines), heading="## Several processes (issue 15 part 3) — `flock "
                  "/tmp/qc-heavy.lock env QC_HEAVY_LOCK_HELD=1 python3 bench/run_distributed.py`")


if __name__ == "__main__":
    sys.exit(main())
