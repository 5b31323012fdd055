"""Compile throughput: compile wall time / one float forward of the same model over the same tokens (issue 15
part 4), for every scheme and algorithm on SmolLM2-135M at 64 x 512.

For each pipeline, under ONE acquisition of the global heavy lock (so both figures of a ratio share the
machine's load):

1. the float forward: a fresh process loads the model with transformers (`AutoModelForCausalLM
   .from_pretrained`, bf16, eager PyTorch with its default sdpa attention, `trust_remote_code=False`) and
   runs the whole model (all layers and lm_head, `use_cache=False`, inference mode) over exactly the
   calibration windows the compile uses (qcompiler's `make_windows` of wiki_calib.jsonl, 64 x 512 tokens),
   8 sequences a batch; the median of 3 timed passes after one warm-up batch;
2. the compile: `python3 -m qcompiler.cli smollm2-135m --passes P --calib wiki_calib.jsonl
   --calib-samples 64 --seq-len 512 -o OUT --force` (this checkout's qcompiler), wall seconds of the
   process measured from outside (process start and imports included), peak RSS (os.wait4), and from its
   report the seconds per pass and per phase (capture, passes, the layer forward as compiled, artifact
   and executable writing, ...): where the time goes.

ratio = compile wall / float forward. The issue's goals: <= 3x for the min-max schemes (w8a8, w8a8d, w8a16,
w8a8mix, w4a16, w4a8d), <= 6x with smooth, awq, gptq (and the other algorithms). Results: bench/results/
throughput.json (rows already measured with the same settings and commit are skipped unless --redo),
throughput.md, and the throughput section of BENCHMARKS.md.

    python3 bench/run_throughput.py --list
    python3 bench/run_throughput.py --only w8a8 smooth_w8a8
    python3 bench/run_throughput.py --label before --checkout /tmp/qc-base
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from run_memory import _commit, run_compile  # noqa: E402
from common import HeavyLock, replace_block  # noqa: E402
from run_pipelines import load1  # noqa: E402

SHARED = ROOT.parent / "shared"
CALIB = SHARED / "data" / "calib" / "wiki_calib.jsonl"
RESULTS = ROOT / "bench" / "results" / "throughput.json"
MODEL = "smollm2-135m"

#: (row, --passes, extra CLI arguments, goal x float forward)
PIPELINES = [
    ("w8a8", "w8a8", [], 3), ("w8a8d", "w8a8d", [], 3), ("w8a16", "w8a16", [], 3), ("w8a8mix", "w8a8mix", [], 3),
    ("w4a16", "w4a16:group=64", [], 3), ("w4a8d", "w4a8d", [], 3),
    ("smooth_w8a8", "smooth,w8a8", [], 6), ("smooth_w8a8d", "smooth,w8a8d", [], 6),
    ("smooth_w8a8_kv8", "smooth,w8a8,kv8", [], 6), ("w8a8d_fa3", "w8a8d,fa3", [], 6),
    ("awq_w4a16", "awq,w4a16:group=64", [], 6), ("gptq_w4a16", "gptq,w4a16:group=64", [], 6),
    ("awq_gptq_w4a16", "awq,gptq,w4a16:group=64", [], 6), ("w8a8_fallback3", "w8a8,fallback:level=3", [], 6),
    ("sparse_w8a8s", "sparse:ratio=0.5,w8a8s", ["--target", "ascend310p", "--dtype", "float16"], 6),
]

FLOAT_FORWARD = r"""
import json, statistics, sys, time
import torch
from transformers import AutoModelForCausalLM
from qcompiler.calib_data import make_windows, read_texts
from qcompiler.loading import load_tokenizer
from qcompiler.model_zoo import resolve_model_dir
model_dir, calib, n, seq_len, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
path = resolve_model_dir(model_dir)
windows = make_windows(load_tokenizer(path), read_texts(calib), seq_len, n)
model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, trust_remote_code=False).eval()
def forward():
    for s in range(0, windows.shape[0], batch):
        model(input_ids=windows[s:s + batch], use_cache=False)
with torch.inference_mode():
    model(input_ids=windows[:batch], use_cache=False)  # warm-up
    times = []
    for _ in range(int(sys.argv[6])):
        t = time.perf_counter(); forward(); times.append(time.perf_counter() - t)
print(json.dumps({"seconds": statistics.median(times), "runs": times, "tokens": int(windows.numel()),
                  "attn": model.config._attn_implementation, "threads": torch.get_num_threads()}))
"""


def float_forward(args) -> dict:
    cmd = [sys.executable, "-c", FLOAT_FORWARD, MODEL, str(CALIB), str(args.calib_samples), str(args.seq_len), "8",
           str(args.float_runs)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, QC_NO_PROGRESS="1"))
    if res.returncode:
        raise RuntimeError(f"float forward failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def host() -> dict:
    """The CPU a row ran on: bf16 GEMMs cost 14-35x a float32 one on a CPU without native bf16 (AVX2), so both
    sides of the ratio move with it and rows of different hosts must not be compared."""
    import torch
    flags = set()
    model = platform.processor()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    return {"cpu": model, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"})}


def settings(passes: str, extra: list[str], args) -> dict:
    return {"model": MODEL, "passes": passes, "extra": extra, "calib": CALIB.name,
            "calib_samples": args.calib_samples, "seq_len": args.seq_len}


def measure(key: str, passes: str, extra: list[str], args, log, shared_float: dict | None = None) -> dict:
    """One row. `shared_float`: --one-hold, the lock is already held and the float forward measured once for
    every row (`_one_hold`); else this row takes the lock and measures its own float forward."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{args.label}_{key}"
    row = {"settings": settings(passes, extra, args), "label": args.label, "commit": _commit(Path(args.checkout)),
           "host": host()}
    cmd = [sys.executable, "-m", "qcompiler.cli", MODEL, "--passes", passes, "--calib", str(CALIB), "--calib-samples",
           str(args.calib_samples), "--seq-len", str(args.seq_len), "-o", str(out), "--force"] + extra
    row["command"] = " ".join(["qcompile"] + cmd[3:]).replace(str(SHARED), "../shared").replace(str(out), "OUT")
    with HeavyLock() as lock:
        row["lock_wait_s"] = round(lock.waited, 1)
        row["load_before"] = load1()
        row["float"] = dict(shared_float) if shared_float is not None else float_forward(args)
        log(f"float forward {row['float']['seconds']:.1f} s; $ {row['command']}")
        row.update(run_compile(cmd, Path(args.checkout), work / f"{args.label}_{key}.log"))
        row["load_after"] = load1()
    if row["rc"] == 0:
        report = json.loads((out / "qcompile_report.json").read_text())
        row.update(report_wall_s=report.get("wall_seconds"), pass_seconds=report.get("pass_seconds", {}),
                   phase_seconds=report.get("phase_seconds", {}))
    else:
        row["log_tail"] = (work / f"{args.label}_{key}.log").read_text()[-3000:]
    shutil.rmtree(out, ignore_errors=True)
    row.pop("timeline", None)
    row["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return row


def _where(r: dict) -> str:
    """The biggest costs: phases (passes split into the passes that took >= 5% of the wall)."""
    wall = r["wall_s"]
    parts = []
    for name, sec in r.get("phase_seconds", {}).items():
        if name == "passes":
            for p, s in sorted(r.get("pass_seconds", {}).items(), key=lambda kv: -kv[1]):
                if s >= 0.05 * wall:
                    parts.append((f"pass {p}", s))
        elif sec >= 0.05 * wall:
            parts.append((name, sec))
    start = wall - (r.get("report_wall_s") or wall)
    if start >= 0.05 * wall:
        parts.append(("process start + imports", start))
    parts.sort(key=lambda kv: -kv[1])
    return ", ".join(f"{n} {s:.0f}" for n, s in parts)


def table(results: dict, label: str) -> list[str]:
    order = {k: i for i, (k, *_) in enumerate(PIPELINES)}
    rows = sorted(((k.split("/", 1)[1], r) for k, r in results.items() if r.get("label") == label and r["rc"] == 0),
                  key=lambda kr: order.get(kr[0], 99))
    if not rows:
        return []
    goals = {k: g for k, _, _, g in PIPELINES}
    lines = ["| --passes | calibration | threads | CPU | float forward s | compile s | ratio | goal | peak RSS MiB | "
             "where the time goes (s) | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in rows:
        ratio = r["wall_s"] / r["float"]["seconds"]
        goal = goals.get(key)
        ok = "" if goal is None else (f"<= {goal}x yes" if ratio <= goal else f"<= {goal}x **no**")
        extra = " " + " ".join(r["settings"]["extra"]) if r["settings"]["extra"] else ""
        calib = f"{r['settings']['calib_samples']} x {r['settings']['seq_len']}"
        cpu = r.get("host", {})
        cpu = (f"{cpu['cpu_capability']}, {'native' if cpu['native_bf16'] else 'no native'} bf16" if cpu
               else "not recorded")
        lines.append(f"| `{r['settings']['passes']}`{extra} | {calib} | {r['float'].get('threads', '?')} | {cpu} | "
                     f"{r['float']['seconds']:.1f} | {r['wall_s']:.1f} | "
                     f"**{ratio:.1f}x** | {ok} | {r['peak_rss_mib']:,.0f} | {_where(r)} | "
                     f"{r['load_before']} -> {r['load_after']} |")
    return lines


def _float_note(results: dict, label: str) -> list[str]:
    """How the float forward of `label`'s rows was measured (--one-hold: once at the start and the end)."""
    holds = sorted({(r["float"]["start_s"], r["float"]["end_s"], len(r["float"]["runs"]) // 2)
                    for r in results.values() if r.get("label") == label and r["float"].get("one_hold")})
    return [f"All rows in one hold of the heavy lock (`--one-hold`); float forward {a:.1f} s at the start and "
            f"{b:.1f} s at the end (median of {n} timed pass(es) each, after a warm-up batch); every ratio divides "
            f"by their mean {(a + b) / 2:.1f} s." for a, b, n in holds] + ([""] if holds else [])


def write_markdown(results: dict) -> str:
    labels = sorted({r["label"] for r in results.values()}, key=lambda x: (x != "after", x))
    lines = ["# Compile throughput on SmolLM2-135M (issue 15 part 4; the issue's calibration: 64 x 512)", "",
             f"Generated by `python3 bench/run_throughput.py` ({platform.machine()}, {os.cpu_count()} cores; each row's "
             "float forward and compile ran under one hold of the global heavy lock). ratio = compile "
             "wall (the qcompile process, start to exit) / one float forward of the same model (transformers, bf16, "
             "whole model incl. lm_head) over the same calibration tokens (the row's calibration column). Where the time goes: the "
             "report's phase seconds (passes split per pass), those >= 5% of the wall.", ""]
    for label in labels:
        commits = sorted({r.get("commit", "?") for r in results.values() if r.get("label") == label})
        lines += [f"## {label} ({', '.join(commits)})", ""] + _float_note(results, label) + table(results, label) + [""]
    cmds = [r["command"] for r in results.values() if r.get("command")]
    lines += ["Commands:", "", "```"] + sorted(set(cmds)) + ["```", ""]
    text = "\n".join(lines)
    RESULTS.with_suffix(".md").write_text(text)
    return text


def update_benchmarks(results: dict) -> None:
    body = []
    for label in sorted({r["label"] for r in results.values()}, key=lambda x: (x != "after", x)):
        t = table(results, label)
        if t:
            commits = sorted({r.get("commit", "?") for r in results.values() if r.get("label") == label})
            body += [f"**{label}** ({', '.join(commits)}):", ""] + _float_note(results, label) + t + [""]
    if not body:
        return
    replace_block("<!-- throughput -->", "<!-- /throughput -->", "\n".join(body),
                  heading="## Compile throughput (issue 15) — `python3 bench/run_throughput.py`")


def _save(rkey: str, row: dict) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[rkey] = row
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


def _one_hold(args, known: dict, log, waited: float) -> None:
    """--one-hold: every selected row under ONE hold of the heavy lock (others wait once, not once per row), the
    float forward measured at the start and again at the end; every row's ratio divides by the mean of the two
    (both kept in the row: float.start_s, float.end_s), so the drift of the machine's load shows."""
    start = float_forward(args)
    log(f"float forward (start) {start['seconds']:.1f} s, runs {[round(t, 1) for t in start['runs']]}")
    rows, t0 = [], time.perf_counter()
    for key in args.only or list(known):
        if args.budget and time.perf_counter() - t0 > args.budget:
            log(f"--budget {args.budget} s spent: {key} and the rows after it not measured")
            break
        passes, extra = known[key]
        row = measure(key, passes, extra, args, log, shared_float=start)
        row["lock_wait_s"] = round(waited, 1)
        rows.append((f"{args.label}/{key}", row))
        _save(*rows[-1])
        if row["rc"]:
            log(f"{rows[-1][0]}: FAILED: {row.get('log_tail', '')[-800:]}")
        else:
            log(f"{rows[-1][0]}: compile {row['wall_s']} s ({_where(row)})")
    end = float_forward(args)
    log(f"float forward (end) {end['seconds']:.1f} s, runs {[round(t, 1) for t in end['runs']]}")
    mean = (start["seconds"] + end["seconds"]) / 2
    for rkey, row in rows:
        row["float"] = dict(start, seconds=mean, start_s=start["seconds"], end_s=end["seconds"],
                            runs=start["runs"] + end["runs"], one_hold=True)
        _save(rkey, row)
        if row["rc"] == 0:
            log(f"{rkey}: compile {row['wall_s']} s / float {mean:.1f} s = {row['wall_s'] / mean:.1f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="row names (see --list)")
    p.add_argument("--label", default="after")
    p.add_argument("--checkout", default=str(ROOT))
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--work", default="/tmp/qc-bench-throughput")
    p.add_argument("--redo", action="store_true")
    p.add_argument("--list", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--float-runs", type=int, default=3, help="timed float-forward passes (median), after a warm-up")
    p.add_argument("--one-hold", action="store_true",
                   help="all rows under one hold of the heavy lock; float forward at the start and the end (mean)")
    p.add_argument("--budget", type=float, default=0,
                   help="--one-hold: start no further row once this many seconds of the hold are spent")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.list:
        for key, passes, extra, goal in PIPELINES:
            print(f"{key:16s} {passes:28s} {' '.join(extra):40s} goal <= {goal}x")
        return 0
    known = {k: (p_, e) for k, p_, e, _ in PIPELINES}
    if args.only and set(args.only) - set(known):
        raise SystemExit(f"unknown rows {sorted(set(args.only) - set(known))}; see --list")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.one_hold and not args.markdown:
        with HeavyLock("run_throughput --one-hold") as lock:
            os.environ["QC_HEAVY_LOCK_HELD"] = "1"  # the rows below run inside this one hold
            try:
                _one_hold(args, known, log, lock.waited)
            finally:
                os.environ.pop("QC_HEAVY_LOCK_HELD", None)
        results = json.loads(RESULTS.read_text())
    elif not args.markdown:
        for key in args.only or list(known):
            passes, extra = known[key]
            rkey = f"{args.label}/{key}"
            old = results.get(rkey)
            if (old and old.get("rc") == 0 and old["settings"] == settings(passes, extra, args)
                    and old.get("commit") == _commit(Path(args.checkout)) and not args.redo):
                log(f"skip {rkey} (measured {old.get('measured_at')})")
                continue
            row = measure(key, passes, extra, args, log)
            results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
            results[rkey] = row
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            if row["rc"]:
                log(f"{rkey}: FAILED: {row.get('log_tail', '')[-800:]}")
            else:
                log(f"{rkey}: compile {row['wall_s']} s / float {row['float']['seconds']:.1f} s = "
                    f"{row['wall_s'] / row['float']['seconds']:.1f}x; {_where(row)}")
    print(write_markdown(results))
    update_benchmarks(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
