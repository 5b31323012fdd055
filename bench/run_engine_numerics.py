#!/usr/bin/env python3
"""Numerics as loaded (issue 12): perplexity of w8a8 / w8a8d / w8a16 before and after the scales are rounded to
the model dtype as the engines hold them, and W4A8_DYNAMIC two-stage per-group (group 32) beside the per-channel
form it replaces, on SmolLM2-135M (llama), in one run.

    python3 bench/run_engine_numerics.py [--before REV] [--work DIR] [--reuse] [--lock FILE] [--only NAME ...]

"before" rows run the code of git revision REV (default `main`), unpacked with `git archive REV` into WORK/src-REV
and run from there (`python3 -m qcompiler.cli`, so that revision's package and executable format are used for
both compile and eval); "after" rows run this checkout. Exactly these commands, per row:

    qcompile MODEL --passes P [--exclude 'mlp\\.down_proj'] --calib wiki_calib.jsonl --calib-samples 64
             --seq-len 512 -o WORK/<rev>-<row> --force
    qcompile eval WORK/<rev>-<row> --data wiki_eval.jsonl --seq-len 512 --max-windows 40 --json
    qcompile eval MODEL (same flags)                                                              (float)
    python3 ../shared/tools/check_ascend_artifact.py WORK/<rev>-<row>                           (errors, warnings)

Rows: w8a8 with down_proj float (the core W8A8 row of BENCHMARKS.md), w8a8d, w8a16 (both revisions), w4a8d
(REV: per-channel, the form no engine loads; this checkout: two-stage per-group, group 32). Results merge into
bench/results/engine_numerics.json and are rendered to bench/results/engine_numerics.md (also printed) and into
BENCHMARKS.md between its `engine-numerics` markers. `--render` only re-renders the saved results (no runs).
`--lock FILE` wraps every compile / eval in `flock FILE` (the machine's one-heavy-job-at-a-time lock) instead of
holding it for the whole run. Artifacts (150-250 MB each) go to WORK (default ~/.cache/qc-bench/engine_numerics).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import replace_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "bench" / "results"
CALIB = SHARED / "data" / "calib" / "wiki_calib.jsonl"
EVAL = SHARED / "data" / "calib" / "wiki_eval.jsonl"
CHECKER = SHARED / "tools" / "check_ascend_artifact.py"
COMPILE_FLAGS = ["--calib", str(CALIB), "--calib-samples", "64", "--seq-len", "512"]
EVAL_FLAGS = ["--data", str(EVAL), "--seq-len", "512", "--max-windows", "40", "--json"]
ROWS = {  # name: (--passes, extra compile args, what the row shows)
    "w8a8": ("w8a8", ["--exclude", r"mlp\.down_proj"], "static per-tensor activations, down_proj float"),
    "w8a8d": ("w8a8d", [], "per-token activations"),
    "w8a16": ("w8a16", [], "weight-only int8 per-channel"),
    "w4a8d": ("w4a8d", [], "int4 weights, per-token int8 activations"),
}


class Runner:
    def __init__(self, lock: str | None):
        self.lock = lock

    def run(self, cmd: list[str], cwd: Path) -> tuple[str, float]:
        """Run one heavy command from `cwd` (whose qcompiler package it imports); (stdout, wall seconds)."""
        full = (["flock", self.lock] if self.lock else []) + cmd
        print("$ (" + str(cwd) + ") " + " ".join(cmd), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(full, cwd=cwd, capture_output=True, text=True, env=dict(os.environ, QC_NO_PROGRESS="1"))
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stderr[-3000:]}")
        return r.stdout, seconds


def qcompile(*args: str) -> list[str]:
    return [sys.executable, "-m", "qcompiler.cli", *args]


def unpack(rev: str, work: Path) -> tuple[Path, str]:
    """git archive REV into WORK/src-<sha>; returns (folder, short sha)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    dest = work / f"src-{sha}"
    if not (dest / "qcompiler").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, sha


def checker(out: Path) -> str:
    r = subprocess.run([sys.executable, str(CHECKER), str(out)], capture_output=True, text=True)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-200:]
    m = re.search(r"(\d+) errors?, (\d+) warnings?", last)
    return f"{m.group(1)} errors, {m.group(2)} warnings" if m else last


def bench_row(runner: Runner, src: Path, label: str, name: str, model: Path, work: Path, reuse: bool) -> dict:
    passes, extra, _ = ROWS[name]
    out = work / f"{label}-{name}"
    compile_s = None
    if not (reuse and (out / "quant_model_description.json").is_file()):
        _, compile_s = runner.run(qcompile(str(model), "--passes", passes, *extra, *COMPILE_FLAGS, "-o", str(out),
                                           "--force"), src)
    desc = json.loads((out / "quant_model_description.json").read_text())
    text, eval_s = runner.run(qcompile("eval", str(out), *EVAL_FLAGS), src)
    res = json.loads(text.strip().splitlines()[-1])
    return {"row": name, "code": label, "passes": " ".join([passes, *extra]), "type": desc["model_quant_type"],
            "group_size": desc["group_size"], "ppl": res["ppl"], "tokens": res["tokens"], "checker": checker(out),
            "compile_s": None if compile_s is None else round(compile_s, 1), "eval_s": round(eval_s, 1)}


def render(data: dict) -> str:
    rows, float_ppl = data["rows"], data.get("float_ppl")
    before, after = data.get("before_code", "?"), data.get("after_code", "?")
    lines = [
        "# Numerics as loaded: scales rounded to the model dtype; W4A8_DYNAMIC per-group",
        "",
        "Made by `python3 bench/run_engine_numerics.py` (its docstring has the exact commands): SmolLM2-135M (llama),",
        "bfloat16, ascend910b, calibration `wiki_calib.jsonl` 64 x 512, perplexity of the executable graph on",
        "`wiki_eval.jsonl` (512-token windows, first 40). `before` = code of revision "
        f"`{before}`, `after` = `{after}`.",
        f"Float perplexity: {float_ppl:.4f}." if float_ppl else "",
        "",
        "| row | code | passes | type | group | ppl | x float | after - before | checker | compile s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["row"], r["code"]): r for r in rows.values()}
    for name in ROWS:
        for code in ("before", "after"):
            r = by.get((name, code))
            if r is None:
                continue
            ratio = f"{r['ppl'] / float_ppl:.4f}" if float_ppl else ""
            other = by.get((name, "before")) if code == "after" else None
            delta = f"{r['ppl'] - other['ppl']:+.4f}" if other else ""
            fmt = lambda v: "" if v is None else str(v)  # noqa: E731
            lines.append(f"| {name} | {code} | `{r['passes']}` | {r['type']} | {r['group_size']} | {r['ppl']:.4f} | "
                         f"{ratio} | {delta} | {r['checker']} | {fmt(r['compile_s'])} | {fmt(r['eval_s'])} |")
    missing = [f"{name}/{code}" for name in ROWS for code in ("before", "after") if (name, code) not in by]
    if missing:
        lines += ["", "Not measured yet (run `python3 bench/run_engine_numerics.py --lock /tmp/qc-heavy.lock --only "
                  f"...`): {', '.join(missing)}."]
    lines += ["", f"Times: wall seconds on {platform.machine()} with {os.cpu_count()} CPUs, shared with other jobs."]
    return "\n".join(line for line in lines if line is not None) + "\n"


BEGIN, END = "<!-- engine-numerics:begin -->", "<!-- engine-numerics:end -->"


def write_results(data: dict) -> str:
    """Save `data` and its table: results json + md, and the block between BEGIN / END in BENCHMARKS.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine_numerics.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    table = render(data)
    (RESULTS / "engine_numerics.md").write_text(table)
    replace_block(BEGIN, END, table.split("\n", 2)[2])  # without the md file's title line
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="main", help="git revision of the 'before' rows (default main)")
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache" / "qc-models" / "smollm2-135m")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qc-bench" / "engine_numerics")
    ap.add_argument("--reuse", action="store_true", help="re-evaluate an existing compiled OUT instead of compiling")
    ap.add_argument("--lock", help="flock this file around every compile / eval (e.g. /tmp/qc-heavy.lock)")
    ap.add_argument("--only", nargs="*", choices=sorted(ROWS), help="rows to run (default: all)")
    ap.add_argument("--render", action="store_true", help="only re-render the saved results (no compile / eval)")
    a = ap.parse_args(argv)
    saved = RESULTS / "engine_numerics.json"
    if a.render:
        print(write_results(json.loads(saved.read_text())), end="")
        return 0
    if not (a.model / "config.json").is_file():
        raise SystemExit(f"{a.model} missing: build it with python3 {SHARED / 'models' / 'get_models.py'}")
    a.work.mkdir(parents=True, exist_ok=True)
    runner = Runner(a.lock)
    data = json.loads(saved.read_text()) if saved.is_file() else {"rows": {}}
    before_src, before_sha = unpack(a.before, a.work)
    after_sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                               text=True).stdout.strip()
    data.update(before_code=f"{a.before} ({before_sha})", after_code=f"HEAD ({after_sha})")
    text, _ = runner.run(qcompile("eval", str(a.model), *EVAL_FLAGS), ROOT)
    data["float_ppl"] = json.loads(text.strip().splitlines()[-1])["ppl"]
    for name in a.only or list(ROWS):
        for code, src, label in (("before", before_src, before_sha), ("after", ROOT, "head")):
            row = bench_row(runner, src, label, name, a.model, a.work, a.reuse)
            row["code"] = code
            data["rows"][f"{name}/{code}"] = row
            write_results(data)
    print(write_results(data), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
