"""Every issue-4 pipeline on SmolLM2-135M: perplexity, x float, compile wall time, peak RSS, checker errors.

For each pipeline below and each model variant asked for (llama `smollm2-135m`; qwen2 `smollm2-135m-qwen2`
with --variants llama,qwen2):

    qcompile MODEL --passes P --calib wiki_calib.jsonl --calib-samples 64 --seq-len 512 -o OUT --force
    qcompile eval OUT --data wiki_eval.jsonl --seq-len 512 --max-windows 40 --json
    python3 ../shared/tools/check_ascend_artifact.py --json OUT

plus `qcompile eval MODEL` (the float reference, same windows). Compile wall time is measured around the
compile process; its peak RSS comes from os.wait4 (ru_maxrss of that child alone, not the max over all
children). The 1-min load average is recorded before and after each compile (2 shared cores: timings grow
with the load, perplexities do not).

Each row (compile + eval) runs under ONE acquisition of the global heavy lock /tmp/qc-heavy.lock (fcntl
flock, taken by this script per row, so other jobs interleave between rows). Results are appended to
bench/results/pipelines.json after every row; a row whose settings (model, passes, calibration,
eval windows) are already measured there is skipped, so the script can be run in pieces:

    python3 bench/run_pipelines.py                                # every llama row not yet measured
    python3 bench/run_pipelines.py --only gptq_w4a16 w8a8          # some rows
    python3 bench/run_pipelines.py --variants qwen2                # the qwen2 variant
    python3 bench/run_pipelines.py --only gptq_w4a16 --redo-only gptq_w4a16   # measure a row again
    python3 bench/run_pipelines.py --list                          # row names
    python3 bench/run_pipelines.py --markdown                      # only rewrite pipelines.md from .json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HeavyLock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CALIB = SHARED / "data" / "calib" / "wiki_calib.jsonl"
EVAL = SHARED / "data" / "calib" / "wiki_eval.jsonl"
CHECKER = SHARED / "tools" / "check_ascend_artifact.py"
RESULTS = ROOT / "bench" / "results" / "pipelines.json"
MODELS = {"llama": "smollm2-135m", "qwen2": "smollm2-135m-qwen2"}

#: (row name, --passes, what it shows); the order is the order of the table, cheapest first
PIPELINES = [
    ("w8a8", "w8a8", "static W8A8, every Linear"),
    ("smooth_w8a8", "smooth,w8a8", "alpha searched per group"),
    ("smooth05_w8a8", "smooth:alpha=0.5,w8a8", "alpha fixed 0.5"),
    ("smooth08_w8a8", "smooth:alpha=0.8,w8a8", "alpha fixed 0.8 (llm-compressor's default)"),
    ("smooth_gptq_w8a8", "smooth,gptq,w8a8", ""),
    ("w8a8d", "w8a8d", "dynamic per-token activations"),
    ("smooth_w8a8d", "smooth,w8a8d", ""),
    ("rtn_w4a16", "w4a16:group=64", "RTN"),
    ("awq_w4a16", "awq,w4a16:group=64", ""),
    ("gptq_w4a16", "gptq,w4a16:group=64", ""),
    ("awq_gptq_w4a16", "awq,gptq,w4a16:group=64", ""),
    ("gptq_w8a16", "gptq,w8a16", ""),
]


def qcompile() -> list[str]:
    """This checkout's qcompile (run with cwd=ROOT, so `-m` imports ROOT/qcompiler, never an installed copy)."""
    return [sys.executable, "-m", "qcompiler.cli"]


def run_measured(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run cmd (stdout+stderr to log); return (returncode, wall s, peak RSS MiB of that process tree)."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024  # Linux: KiB


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def evaluate(target: str, log: Path, args) -> tuple[dict, float]:
    cmd = qcompile() + ["eval", target, "--data", str(EVAL), "--seq-len", str(args.seq_len),
                        "--max-windows", str(args.max_windows), "--json"]
    rc, wall, _ = run_measured(cmd, log)
    if rc:
        raise RuntimeError(f"eval failed ({rc}); see {log}")
    line = [ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1]
    return json.loads(line), wall


def check(out: Path) -> dict:
    res = subprocess.run([sys.executable, str(CHECKER), "--json", str(out)], capture_output=True, text=True)
    try:
        rep = json.loads(res.stdout)
    except json.JSONDecodeError:
        return {"errors": None, "warnings": None, "raw": (res.stdout + res.stderr)[-2000:], "rc": res.returncode}
    errs = [v for v in rep.get("violations", []) if v.get("severity") != "WARN"]
    return {"errors": rep.get("errors"), "warnings": rep.get("warnings"), "summary": rep.get("summary"),
            "error_list": errs[:20], "rc": res.returncode}


def settings(variant: str, passes: str | None, args) -> dict:
    s = {"model": MODELS[variant], "passes": passes or "(float)", "eval": EVAL.name, "seq_len": args.seq_len,
         "max_windows": args.max_windows}
    if passes:
        s.update(calib=CALIB.name, calib_samples=args.calib_samples, calib_seq_len=args.seq_len)
    return s


def measure_row(key: str, variant: str, passes: str | None, args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    row = {"settings": settings(variant, passes, args), "variant": variant}
    with HeavyLock() as lock:
        row["lock_wait_s"] = round(lock.waited, 1)
        if passes is None:
            row["load_before"] = load1()
            ev, ev_s = evaluate(MODELS[variant], work / f"{key}.eval.log", args)
        else:
            out = work / key
            cmd = qcompile() + [MODELS[variant], "--passes", passes, "--calib", str(CALIB), "--calib-samples",
                                str(args.calib_samples), "--seq-len", str(args.seq_len), "-o", str(out), "--force"]
            row["command"] = " ".join(["qcompile"] + cmd[len(qcompile()):]).replace(str(SHARED), "../shared")
            row["load_before"] = load1()
            rc, wall, rss = run_measured(cmd, work / f"{key}.compile.log")
            row["load_after_compile"] = load1()
            if rc:
                raise RuntimeError(f"compile failed ({rc}); see {work / (key + '.compile.log')}")
            row.update(compile_wall_s=round(wall, 1), peak_rss_mib=round(rss, 1))
            report = json.loads((out / "qcompile_report.json").read_text())
            row.update(report_wall_s=report.get("wall_seconds"), report_peak_rss_mib=report.get("peak_rss_mib"),
                       pass_seconds=report.get("pass_seconds", {}), quant_type=report.get("model_quant_type"))
            ev, ev_s = evaluate(str(out), work / f"{key}.eval.log", args)
        row["load_after"] = load1()
    row.update(ppl=ev["ppl"], eval=ev, eval_wall_s=round(ev_s, 1))
    if passes is not None:
        row["checker"] = check(work / key)
        if not args.keep:
            shutil.rmtree(work / key, ignore_errors=True)  # ~100-300 MB each; the figures are in the json
    row["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return row


def write_markdown(results: dict, path: Path, args) -> None:
    lines = [
        "# Issue-4 pipelines on SmolLM2-135M: perplexity, compile wall time, peak RSS, checker",
        "",
        f"Generated by `python3 bench/run_pipelines.py` ({platform.machine()}, {os.cpu_count()} cores shared with "
        "other jobs). Calibration `wiki_calib.jsonl`, calib-samples x seq-len as in each row's settings "
        "(64 x 512 unless stated); perplexity of the executable graph on `wiki_eval.jsonl`, 512-token windows, "
        "first 40 (`qcompile eval OUT --max-windows 40`); x float = ppl / float ppl of the same variant. "
        "compile s = wall seconds of the `qcompile` process; peak RSS = ru_maxrss of that process (os.wait4). "
        "Every row ran as the only heavy job (global lock; unit tests of other helpers may run beside it); load = 1-min load average before -> after the compile "
        "(timings grow with it; perplexities are deterministic). Checker: ../shared/tools/check_ascend_artifact.py.",
        "",
        "| model | --passes | note | ppl | x float | compile s | pass s | peak RSS MiB | load | checker |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = {p: n for _, p, n in PIPELINES}
    for variant in ("llama", "qwen2"):
        fl = results.get(f"{variant}/float")
        for key in ["float"] + [k for k, _, _ in PIPELINES]:
            r = results.get(f"{variant}/{key}")
            if r is None:
                continue
            passes = r["settings"]["passes"]
            xf = f"{r['ppl'] / fl['ppl']:.3f}" if fl and passes != "(float)" else ("1.000" if passes == "(float)" else "")
            ps = r.get("pass_seconds", {})
            own = ", ".join(f"{k} {ps[k]:.0f}" for k in ("smooth", "awq", "gptq", "calibrate") if ps.get(k, 0) >= 1)
            chk = r.get("checker")
            chk_s = f"{chk['errors']} errors, {chk['warnings']} warnings" if chk else ""
            load = f"{r.get('load_before', '')} -> {r.get('load_after_compile', r.get('load_after', ''))}"
            cal = ""
            st = r["settings"]
            if passes != "(float)" and (st.get("calib_samples"), st.get("calib_seq_len")) != (64, 512):
                cal = f" ({st['calib_samples']} x {st['calib_seq_len']})"
            lines.append(f"| {variant} | `{passes}`{cal} | {notes.get(passes, '')} | {r['ppl']:.3f} | {xf} | "
                         f"{r.get('compile_wall_s', '-')} | {own or '-'} | {r.get('peak_rss_mib', '-')} | {load} | "
                         f"{chk_s or '-'} |")
    earlier = [(k, p) for k, r in results.items() for p in r.get("previous", [])]
    if earlier:
        lines += ["", "Earlier measurements of the same rows (same settings, other machine load):", ""]
        for k, p in earlier:
            lines.append(f"- {k}: compile {p['compile_wall_s']} s, peak RSS {p['peak_rss_mib']} MiB, load "
                         f"{p['load_before']} -> {p['load_after_compile']}, ppl {p['ppl']:.3f} ({p['measured_at']})")
    cmds = [r["command"] for r in results.values() if r.get("command")]
    lines += ["", "Commands (each followed by `qcompile eval OUT --data ../shared/data/calib/wiki_eval.jsonl "
              "--seq-len 512 --max-windows 40 --json`):", "", "```"] + cmds + ["```", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="llama", help="comma list of llama,qwen2 (default llama)")
    p.add_argument("--only", nargs="*", help="row names (see --list); float is always measured first")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--work", default="/tmp/qc-bench-pipelines")
    p.add_argument("--keep", action="store_true", help="keep the compiled OUT folders in --work")
    p.add_argument("--redo-only", nargs="*", default=[], metavar="ROW",
                   help="measure these rows again even if already measured (e.g. at a lower load)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--markdown", action="store_true", help="only rewrite pipelines.md from pipelines.json")
    args = p.parse_args(argv)
    if args.list:
        for key, passes, note in PIPELINES:
            print(f"{key:18s} {passes:28s} {note}")
        return 0
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    md = RESULTS.with_suffix(".md")
    if args.markdown:
        write_markdown(results, md, args)
        print(md.read_text())
        return 0
    known = {k for k, _, _ in PIPELINES}
    if args.only and set(args.only) - known:
        raise SystemExit(f"unknown rows {sorted(set(args.only) - known)}; known: {', '.join(sorted(known))}")
    by_key = {k: pp for k, pp, _ in PIPELINES}
    rows = [(k, by_key[k]) for k in args.only] if args.only else list(by_key.items())  # --only: in its order
    failed = []
    for variant in [v for v in args.variants.split(",") if v]:
        if variant not in MODELS:
            raise SystemExit(f"unknown variant {variant!r}; expected llama or qwen2")
        for key, passes in [("float", None)] + rows:
            rkey = f"{variant}/{key}"
            if results.get(rkey, {}).get("settings") == settings(variant, passes, args) and \
                    key not in args.redo_only:
                print(f"skip {rkey} (measured {results[rkey].get('measured_at')})", flush=True)
                continue
            try:
                row = measure_row(f"{variant}_{key}", variant, passes, args)
            except RuntimeError as e:
                print(f"{rkey}: {e}", flush=True)
                failed.append(rkey)
                continue
            results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}  # another run may have added rows
            old = results.get(rkey)
            if old and old.get("settings") == row["settings"]:  # a re-measurement: keep the earlier timings
                row["previous"] = old.pop("previous", []) + [
                    {k: old.get(k) for k in ("compile_wall_s", "peak_rss_mib", "pass_seconds", "load_before",
                                             "load_after_compile", "ppl", "measured_at")}]
            results[rkey] = row
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
            write_markdown(results, md, args)
            print(f"{rkey}: ppl {row['ppl']:.3f}, compile {row.get('compile_wall_s', '-')} s, "
                  f"rss {row.get('peak_rss_mib', '-')} MiB, load {row.get('load_before')} -> {row.get('load_after')}",
                  flush=True)
    write_markdown(results, md, args)
    print(md.read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
