"""Fallback on real models: `fallback:level=3` vs w8a8 alone (Llama), and the Qwen down_proj policy (Qwen2).

Compiles each config below, runs the artifact checker (../shared/tools/check_ascend_artifact.py) on it,
evaluates its executable graph with `qcompile eval` on the same windows as the float model, and writes
bench/results/fallback.md (+ fallback.json). One command at a time; heavy commands run under
/tmp/qc-heavy.lock (the machine is shared).

    python3 bench/run_fallback.py                          # everything (about 1.5 h on 2 busy cores)
    python3 bench/run_fallback.py --reuse                  # keep finished compiles/evals in --work
    python3 bench/run_fallback.py --configs fb3            # a subset (its float model is always evaluated)
    python3 bench/run_fallback.py --seed-from /tmp/qc-bench-smooth --reuse   # reuse bench/run_smooth.py's
                                                           # identical float / w8a8 / smooth_qwen2 runs

Defaults: SmolLM2-135M (`smollm2-135m`, Llama; `smollm2-135m-qwen2`, the same weights as Qwen2),
--calib wiki_calib.jsonl 16 x 512 tokens, eval wiki_eval.jsonl, 512-token windows, first 40 windows.
Every config names --policy explicitly, so the table does not depend on the default.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LOCK = "/tmp/qc-heavy.lock"
LOCKING = True  # --no-lock: tiny models (a smoke run of this script)

#: name -> (--passes or None for the float model, variant "llama" | "qwen2", --policy)
CONFIGS = {
    "float": (None, "llama", None),
    "w8a8": ("w8a8", "llama", "none"),
    "fb3": ("w8a8,fallback:level=3", "llama", "none"),
    "w8a8_policy": ("w8a8", "llama", "qwen"),        # every down_proj float, for comparison with fb3
    "float_qwen2": (None, "qwen2", None),
    "w8a8_qwen2": ("w8a8", "qwen2", "none"),
    "w8a8_qwen2_policy": ("w8a8", "qwen2", "qwen"),
    "smooth_qwen2": ("smooth,w8a8", "qwen2", "none"),
    "smooth_qwen2_policy": ("smooth,w8a8", "qwen2", "qwen"),
    "fb3_qwen2": ("w8a8,fallback:level=3", "qwen2", "none"),
}
#: this bench's name -> bench/run_smooth.py's name for the same command (for --seed-from)
SMOOTH_BENCH_SAME = {"float": "float", "w8a8": "w8a8", "float_qwen2": "float_qwen2", "smooth_qwen2": "smooth_qwen2"}


def qcompile() -> list[str]:
    exe = shutil.which("qcompile")
    return [exe] if exe else [sys.executable, "-m", "qcompiler.cli"]


def run(cmd: list[str], log: Path, heavy: bool = True) -> float:
    print("$ " + " ".join(cmd), flush=True)
    full = (["flock", LOCK] if heavy and LOCKING and shutil.which("flock") else []) + cmd
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def checker(out: Path) -> dict | None:
    tool = SHARED / "tools" / "check_ascend_artifact.py"
    if not tool.is_file():
        return None
    r = subprocess.run([sys.executable, str(tool), "--json", str(out)], capture_output=True, text=True)
    data = json.loads(r.stdout)
    return {"errors": data["errors"], "warnings": data["warnings"], "summary": data["summary"]}


def float_linears(report: dict) -> list[str]:
    return [f"model.layers.{layer['layer']}.{n}" for layer in report["layers"]
            for n, t in layer["linears"].items() if t == "FLOAT"]


def seed(work: Path, source: Path, names: list[str]) -> None:
    """Link bench/run_smooth.py's results of the identical commands into --work (then --reuse skips them)."""
    for name in names:
        other = SMOOTH_BENCH_SAME.get(name)
        if other is None:
            continue
        for suffix in (".eval.json",):
            src, dst = source / f"{other}{suffix}", work / f"{name}{suffix}"
            if src.is_file() and not dst.exists():
                shutil.copy(src, dst)
                (work / f"{name}.seeded").write_text(str(src) + "\n")
        if CONFIGS[name][0] is not None and (source / other / "qcompile_report.json").is_file() \
                and not (work / name).exists():
            (work / name).symlink_to(source / other)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--model-qwen2", default="smollm2-135m-qwen2")
    p.add_argument("--calib", type=Path, default=SHARED / "data/calib/wiki_calib.jsonl")
    p.add_argument("--eval", type=Path, default=SHARED / "data/calib/wiki_eval.jsonl")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--work", type=Path, default=Path("/tmp/qc-bench-fallback"))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--reuse", action="store_true", help="skip compiles/evals whose results are in --work")
    p.add_argument("--seed-from", type=Path, default=None, help="bench/run_smooth.py's --work to reuse")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/fallback.md")
    p.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK} (tiny models only)")
    args = p.parse_args(argv)
    global LOCKING
    LOCKING = not args.no_lock
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    for n in list(names):
        fl = "float" if CONFIGS[n][1] == "llama" else "float_qwen2"
        if fl not in names:
            names.insert(0, fl)
    models = {"llama": args.model, "qwen2": args.model_qwen2}
    args.work.mkdir(parents=True, exist_ok=True)
    if args.seed_from:
        seed(args.work, args.seed_from, names)
    results = {}
    for name in names:
        passes, variant, policy = CONFIGS[name]
        model = models[variant]
        out = args.work / name
        seeded = (args.work / f"{name}.seeded").is_file()
        row = {"passes": passes or "(float)", "variant": variant, "policy": policy, "source": model,
               "reused": seeded or out.is_symlink()}
        if passes is not None and seeded and args.reuse and not (out / "qcompile_report.json").is_file():
            # bench/run_smooth.py kept only the eval of this identical command (its OUT was removed)
            row["compile_cmd"] = " ".join(["qcompile", model, "--passes", passes, "--calib", str(args.calib),
                                           "--calib-samples", str(args.calib_samples), "--seq-len",
                                           str(args.seq_len), "-o", str(out)])
        elif passes is not None:
            cmd = qcompile() + [model, "--passes", passes, "--policy", policy, "--calib", str(args.calib),
                                "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
                                "-o", str(out), "--force"]
            row["compile_cmd"] = " ".join(["qcompile"] + cmd[len(qcompile()):])
            report_file = out / "qcompile_report.json"
            if not (args.reuse and report_file.is_file()):
                row["compile_s"] = round(run(cmd, args.work / f"{name}.compile.log"), 1)
            report = json.loads(report_file.read_text())
            row["compile_s"] = row.get("compile_s", report.get("wall_seconds"))
            row["float_linears"] = float_linears(report)
            row["fallback"] = report.get("fallback")
            row["checker"] = checker(out)
        target = str(out) if passes is not None else model
        eval_file = args.work / f"{name}.eval.json"
        cmd = qcompile() + ["eval", target, "--data", str(args.eval), "--seq-len", str(args.seq_len),
                            "--max-windows", str(args.max_windows), "--json"]
        row["eval_cmd"] = " ".join(["qcompile"] + cmd[len(qcompile()):])
        if not (args.reuse and eval_file.is_file()):
            log = args.work / f"{name}.eval.log"
            row["eval_s"] = round(run(cmd, log), 1)
            line = [ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1]
            eval_file.write_text(line + "\n")
        row.update({k: v for k, v in json.loads(eval_file.read_text()).items() if k != "model"})
        results[name] = row
        print(f"{name}: ppl {row['ppl']:.3f}", flush=True)
        write(args, results)
    return 0


def write(args, results: dict) -> None:
    float_ppl = {r["variant"]: r["ppl"] for r in results.values() if r["passes"] == "(float)"}
    first = next(iter(results.values()))
    lines = [
        "# fallback and the Qwen down_proj policy on SmolLM2-135M: perplexity",
        "",
        f"Models `{args.model}` (Llama) and `{args.model_qwen2}` (the same weights as Qwen2), bf16; calibration "
        f"`{args.calib.name}` {args.calib_samples} x {args.seq_len} tokens; eval `{args.eval.name}`, "
        f"{args.seq_len}-token windows, first {args.max_windows} windows ({first['tokens']} tokens); the eval runs "
        "the executable graph (`OUT/executable`). w8a8: static W8A8 on every decoder Linear not kept float "
        "(int8 per-channel weights, int8 per-tensor asymmetric activations, min-max); lm_head, embeddings float. "
        "policy qwen = every `mlp.down_proj` float (one per layer); fallback:level=3 = the 3 Linears chosen by "
        "measured sensitivity.",
        "",
        "| config | model | --passes | --policy | ppl | x float | float decoder Linears | checker | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        fl = r.get("float_linears")
        chk = r.get("checker")
        lines.append(
            f"| {name} | {r['source']} | `{r['passes']}` | {r['policy'] or '-'} | {r['ppl']:.3f} | "
            f"{r['ppl'] / float_ppl[r['variant']]:.3f} | {'-' if fl is None else len(fl)} | "
            f"{'-' if chk is None else chk['summary']} | {r.get('compile_s', '-')} |")
    lines += ["", "x float: ppl / ppl of the float model of the same variant. Rows marked reused below come from "
              "bench/run_smooth.py's identical commands. Compile s: wall seconds of the command on a shared 2-core machine, including the wait for the heavy-job lock."]
    for name, r in results.items():
        f = r.get("fallback")
        if not f:
            continue
        lines += ["", f"## {name}: what fallback kept float (`{r['passes']}`)", "",
                  f"Sensitivity: {f['metric']}. Estimated error E {f['error_before']:.4g} -> {f['error_after']:.4g}; "
                  f"cutoff: lowest chosen {f['cutoff']['lowest_chosen']:.4g}, highest not chosen "
                  f"{f['cutoff']['highest_not_chosen']:.4g}; pre-sweep {f.get('seconds', '-')} s.", "",
                  "| rank | Linears kept float | sensitivity |", "|---|---|---|"]
        lines += [f"| {u['rank']} | {', '.join(u['linears'])} | {u['sensitivity']:.4g} |" for u in f["chosen"]]
        lines += ["", "Top of the ranking:", "", "| rank | unit | sensitivity |", "|---|---|---|"]
        lines += [f"| {u['rank']} | {', '.join(u['linears'])} | {u['sensitivity']:.4g} |" for u in f["ranking_top"]]
    lines += ["", "## Commands", ""]
    for name, r in results.items():
        lines += [f"- {name}{' (reused)' if r.get('reused') else ''}: "
                  + "; ".join(f"`{c}`" for c in (r.get("compile_cmd"), r.get("eval_cmd")) if c)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    slim = {n: {k: v for k, v in r.items() if k != "fallback"} | (
        {"fallback": {k: v for k, v in r["fallback"].items() if k != "sensitivity_by_linear"}}
        if r.get("fallback") else {}) for n, r in results.items()}
    args.out.with_suffix(".json").write_text(json.dumps(slim, indent=1) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
