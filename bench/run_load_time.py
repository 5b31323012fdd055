#!/usr/bin/env python3
"""Time to first token of `qcompile run` on a compiled SmolLM2-135M OUT (loading the executable graph).

    python3 bench/run_load_time.py [--out OUT] [--before OUT_OLD:CHECKOUT_OLD] [--runs 5] [--work DIR]

Without --out, compiles `qcompile smollm2-135m --passes w8a8 --calib wiki_calib.jsonl --calib-samples 8
--seq-len 128 -o WORK/smollm2-w8a8` first. Each run is a fresh process (cold imports) that times:
import of qcompiler, `load_model(OUT)` (model.json, head, tokenizer), then `generate(..., 1 token)` (the 30
layer programs rebuilt from their files plus their decode steps, and the prefill), then on a second
load_model every layer's `layers.get(i)` alone (the graph loading itself); and, separately, the wall time
of `python3 -m qcompiler.cli run OUT --prompt P --max-new-tokens 1`. Medians of --runs.
--before OUT_OLD:CHECKOUT_OLD measures another qcompiler checkout on its own OUT in the same run,
interleaved run by run (e.g. the format before the JSON graph: an OUT compiled by that checkout).
The compile and the whole measurement each hold /tmp/qc-heavy.lock (shared machine).
Results: bench/results/load_time.{md,json}.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HeavyLock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "bench" / "results"
CALIB = SHARED / "data" / "calib" / "wiki_calib.jsonl"
PROMPT = "What is quantization?"
PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[2])
from qcompiler.runtime import load_model
from qcompiler.generate import generate
t1 = time.perf_counter()
model = load_model(sys.argv[1])
t2 = time.perf_counter()
generate(model, sys.argv[3], 1)
t3 = time.perf_counter()
fresh = load_model(sys.argv[1])
t4 = time.perf_counter()
layers = [fresh.layers.get(i) for i in range(fresh.layers.num_layers)]
t5 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_model_s": t2 - t1, "layers_and_prefill_s": t3 - t2,
                  "load_to_first_token_s": t3 - t1, "all_layers_get_s": t5 - t4}))
"""


def _env():
    return {**os.environ, "QC_NO_PROGRESS": "1"}


def measure(out: Path, code: Path) -> dict:
    """One fresh-process measurement of `out` with the qcompiler of checkout `code` (caller holds the lock)."""
    r = subprocess.run([sys.executable, "-c", PHASES, str(out), str(code), PROMPT], cwd=code, env=_env(),
                       capture_output=True, text=True, check=True)
    phases = json.loads(r.stdout.strip().splitlines()[-1])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qcompiler.cli", "run", str(out), "--prompt", PROMPT,
                    "--max-new-tokens", "1"], cwd=code, env=_env(), capture_output=True, check=True)
    phases["cli_run_1_token_s"] = time.perf_counter() - t0
    return phases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="compiled OUT to load (default: compile smollm2-135m w8a8 into WORK)")
    p.add_argument("--before", help="OUT_OLD:CHECKOUT_OLD, measured interleaved in the same run")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--work", type=Path, default=Path("/tmp/qc-bench-load-time"))
    a = p.parse_args()
    out = a.out
    if out is None:
        out = a.work / "smollm2-w8a8"
        if not out.exists():
            with HeavyLock():
                subprocess.run([sys.executable, "-m", "qcompiler.cli", "smollm2-135m", "--passes", "w8a8", "--calib",
                                str(CALIB), "--calib-samples", "8", "--seq-len", "128", "-o", str(out)],
                               cwd=ROOT, env=_env(), check=True)
    sides = {"this checkout": (out, ROOT)}
    if a.before:
        old_out, old_code = a.before.split(":", 1)
        sides = {"before": (Path(old_out), Path(old_code)), **sides}
    runs = {name: [] for name in sides}
    with HeavyLock():  # one hold for all runs: the sides are measured under the same machine load
        for i in range(a.runs):
            for name, (o, code) in sides.items():
                runs[name].append(measure(o, code))
                print(f"run {i + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[name][-1].items()),
                      flush=True)
    medians = {name: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for name, rs in runs.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    what = {name: {"out": str(o), "checkout": str(code)} for name, (o, code) in sides.items()}
    (RESULTS / "load_time.json").write_text(json.dumps({"runs": a.runs, "sides": what, "medians": medians,
                                                        "raw": runs}, indent=2))
    keys = list(next(iter(medians.values())))
    lines = [f"# Time to first token of `qcompile run` (SmolLM2-135M w8a8), median of {a.runs} fresh processes",
             "", "| checkout | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.2f}" for k in keys) + " |" for name, m in medians.items()]
    (RESULTS / "load_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
