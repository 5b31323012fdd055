"""SmoothQuant (`smooth` pass) on a real model: perplexity of w8a8 with and without smoothing, vs float.

Compiles MODEL with each pipeline below (static W8A8 on every decoder Linear), evaluates the executable
graph of each with `qcompile eval` on the same windows as the float model, and writes
bench/results/smooth.md (+ smooth.json). Runs one command at a time (the machine is small and shared).

    python3 bench/run_smooth.py                       # everything (about an hour on 2 busy cores)
    python3 bench/run_smooth.py --reuse               # keep finished compiles/evals in --work
    python3 bench/run_smooth.py --configs w8a8,smooth # a subset (float is always evaluated)

Defaults follow the brief: SmolLM2-135M (alias smollm2-135m, built by ../shared/models/get_models.py),
--calib wiki_calib.jsonl with 16 x 512 tokens, eval on wiki_eval.jsonl, 512-token windows, 40 windows.
Compiled folders go to --work (default /tmp/qc-bench-smooth; they are large and not kept in the repo).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

#: name -> (--passes or None for the float model (eval only), model variant: "llama" | "qwen2")
#: shift only applies where the consumer Linears have a bias (Qwen2's q/k/v), so it is measured on
#: smollm2-135m-qwen2: the same weights as Qwen2 architecture (zero q/k/v biases)
CONFIGS = {
    "float": (None, "llama"),
    "w8a8": ("w8a8", "llama"),
    "smooth": ("smooth,w8a8", "llama"),
    "smooth_a05": ("smooth:alpha=0.5,w8a8", "llama"),
    "float_qwen2": (None, "qwen2"),
    "smooth_qwen2": ("smooth,w8a8", "qwen2"),
    "smooth_shift_qwen2": ("smooth:shift=true,w8a8", "qwen2"),
}


def qcompile() -> list[str]:
    exe = shutil.which("qcompile")
    return [exe] if exe else [sys.executable, "-m", "qcompiler.cli"]


def run(cmd: list[str], log: Path) -> float:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def alpha_summary(report: dict) -> dict:
    """Per smoothing group (producer name): mean/min/max chosen alpha over layers, and the mean group MSE
    reduction (before / after) of the search."""
    by_group: dict[str, list[float]] = {}
    gains: dict[str, list[float]] = {}
    for layer in report["layers"]:
        rec = layer.get("passes", {}).get("smooth", {})
        for g, a in rec.get("alphas", {}).items():
            by_group.setdefault(g, []).append(float(a))
        for g, (before, after) in rec.get("mse", {}).items():
            if after > 0:
                gains.setdefault(g, []).append(before / after)
    return {g: {"mean": round(statistics.mean(v), 3), "min": min(v), "max": max(v),
                "mse_gain": round(statistics.geometric_mean(gains[g]), 2) if g in gains else None}
            for g, v in by_group.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="the Llama-architecture model")
    p.add_argument("--model-qwen2", default="smollm2-135m-qwen2", help="the same model as Qwen2 (for shift)")
    p.add_argument("--calib", type=Path, default=SHARED / "data/calib/wiki_calib.jsonl")
    p.add_argument("--eval", type=Path, default=SHARED / "data/calib/wiki_eval.jsonl")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--work", type=Path, default=Path("/tmp/qc-bench-smooth"))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--reuse", action="store_true", help="skip compiles/evals whose results are in --work")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/smooth.md")
    args = p.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    for n in list(names):  # every variant used is compared with its float model
        fl = "float" if CONFIGS[n][1] == "llama" else "float_qwen2"
        if fl not in names:
            names.insert(0, fl)
    models = {"llama": args.model, "qwen2": args.model_qwen2}
    args.work.mkdir(parents=True, exist_ok=True)
    results, commands = {}, []
    for name in names:
        passes, variant = CONFIGS[name]
        model = models[variant]
        out = args.work / name
        row = {"passes": passes or "(float)", "variant": variant}
        if passes is not None:
            cmd = qcompile() + [model, "--passes", passes, "--calib", str(args.calib), "--calib-samples",
                                str(args.calib_samples), "--seq-len", str(args.seq_len), "-o", str(out), "--force"]
            commands.append(" ".join(["qcompile"] + cmd[len(qcompile()):]))
            report_file = out / "qcompile_report.json"
            if not (args.reuse and report_file.is_file()):
                row["compile_s"] = round(run(cmd, args.work / f"{name}.compile.log"), 1)
            report = json.loads(report_file.read_text())
            row["compile_s"] = row.get("compile_s", report.get("wall_seconds"))
            row["pass_seconds"] = report.get("pass_seconds", {})
            if "smooth" in passes:
                row["alphas"] = alpha_summary(report)
        target = str(out) if passes is not None else model
        eval_file = args.work / f"{name}.eval.json"
        cmd = qcompile() + ["eval", target, "--data", str(args.eval), "--seq-len", str(args.seq_len),
                            "--max-windows", str(args.max_windows), "--json"]
        commands.append(" ".join(["qcompile"] + cmd[len(qcompile()):]) + f" > {eval_file}")
        if not (args.reuse and eval_file.is_file()):
            log = args.work / f"{name}.eval.log"
            row["eval_s"] = round(run(cmd, log), 1)
            line = [ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1]
            eval_file.write_text(line + "\n")
        row.update(json.loads(eval_file.read_text()))
        row["source"] = model
        results[name] = row
        print(f"{name}: ppl {row['ppl']:.3f}", flush=True)

    float_ppl = {r["variant"]: r["ppl"] for r in results.values() if r["passes"] == "(float)"}
    first = next(iter(results.values()))
    lines = [
        "# smooth (SmoothQuant) on SmolLM2-135M: perplexity",
        "",
        f"Model `{args.model}` (bf16; `{args.model_qwen2}`: the same weights as Qwen2 architecture); calibration `{args.calib.name}` {args.calib_samples} x {args.seq_len} tokens; "
        f"eval `{args.eval.name}`, {args.seq_len}-token windows, first {args.max_windows} windows "
        f"({first['tokens']} tokens). Every decoder Linear static W8A8 (int8 per-channel weights, "
        "int8 per-tensor asymmetric activations, min-max); lm_head and embeddings float. The eval runs the "
        "executable graph (`OUT/executable`).",
        "",
        "| config | model | --passes | ppl | x float | compile s | smooth pass s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['source']} | `{r['passes']}` | {r['ppl']:.3f} | "
                     f"{r['ppl'] / float_ppl[r['variant']]:.3f} | {r.get('compile_s', '-')} | "
                     f"{r.get('pass_seconds', {}).get('smooth', '-')} |")
    lines += [
        "",
        "x float: ppl / ppl of the float model of the same variant. Times are wall seconds on a 2-core machine "
        "shared with other jobs (load 6-10 during these runs): compare them only roughly.",
        "shift (`smooth:shift=true`) only applies where every consumer Linear already has a bias (Qwen2's "
        "q/k/v; the artifact has no place for a bias the architecture lacks), so it is measured on the Qwen2 "
        "variant and changes only the input_layernorm -> q/k/v group; the other groups are smoothed as without "
        "shift.",
    ]
    for name, r in results.items():
        if r.get("alphas"):
            lines += ["", f"## Alphas chosen: {name} (`{r['passes']}`)", "",
                      "| group (where 1/s is folded) | mean alpha | min | max | group MSE before/after (geo-mean) |",
                      "|---|---|---|---|---|"]
            for g, a in r["alphas"].items():
                lines.append(f"| {g} | {a['mean']} | {a['min']} | {a['max']} | {a['mse_gain'] or '-'} |")
    lines += ["", "## Commands", "", "```"] + commands + ["```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
