"""Observers on a real model: w8a8 with act_observer minmax / percentile / entropy, w4a16 with
weight_observer minmax / mse; perplexity of each executable graph vs float.

    python3 bench/run_observers.py                         # everything, one heavy command at a time
    python3 bench/run_observers.py --configs w8a8_entropy --reuse

Defaults follow the brief: SmolLM2-135M (alias smollm2-135m), --calib wiki_calib.jsonl 16 x 512 tokens
(the same calibration for every config), eval on wiki_eval.jsonl, 512-token windows, first 40 windows.
Every compile/eval runs under `flock --lock` (the machine's heavy-job lock), one command per lock hold.
Besides perplexity it reports how the chosen scales moved against min-max: per Linear kind, the geometric
mean over layers of input_scale (w8a8 configs) or weight_scale (w4a16 configs) / the min-max config's.
Writes bench/results/observers.md and .json; compiled folders go to --work (not kept in the repo).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

#: name -> (--passes or None for the float model, the min-max config it is compared with)
CONFIGS = {
    "float": (None, None),
    "w8a8_minmax": ("w8a8", None),
    "w8a8_percentile": ("w8a8:act_observer=percentile", "w8a8_minmax"),
    "w8a8_percentile_99.9": ("w8a8:act_observer=percentile:percentile=99.9", "w8a8_minmax"),
    "w8a8_entropy": ("w8a8:act_observer=entropy", "w8a8_minmax"),
    "w4a16_minmax": ("w4a16", None),
    "w4a16_mse": ("w4a16:weight_observer=mse", "w4a16_minmax"),
}
DEFAULT = [c for c in CONFIGS if c != "w8a8_percentile_99.9"]


def qcompile() -> list[str]:
    exe = shutil.which("qcompile")
    return [exe] if exe else [sys.executable, "-m", "qcompiler.cli"]


def run(cmd: list[str], log: Path, lock: str | None) -> float:
    full = (["flock", lock] if lock else []) + cmd
    print("$ " + " ".join(full), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def scales(out: Path, suffix: str) -> dict[str, float | list]:
    """{linear name: scale tensor as list} for every artifact tensor ending in `suffix`."""
    from safetensors.torch import load_file
    found = {}
    for f in sorted(out.glob("quant_model_weights*.safetensors")):
        for k, v in load_file(f).items():
            if k.endswith(suffix):
                found[k[: -len(suffix) - 1]] = v.float()
    return found


def scale_ratio(out: Path, ref: Path, suffix: str) -> dict[str, float]:
    """Per Linear kind (q_proj, ..., down_proj): geometric mean over its scale entries of out / ref."""
    a, b = scales(out, suffix), scales(ref, suffix)
    logs: dict[str, list[float]] = {}
    for name, t in a.items():
        if name in b:
            r = (t / b[name]).reshape(-1)
            logs.setdefault(name.rsplit(".", 1)[-1], []).extend(r.log().tolist())
    return {k: round(math.exp(sum(v) / len(v)), 4) for k, v in sorted(logs.items())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", type=Path, default=SHARED / "data/calib/wiki_calib.jsonl")
    p.add_argument("--eval", type=Path, default=SHARED / "data/calib/wiki_eval.jsonl")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--work", type=Path, default=Path("/tmp/qc-observers"))
    p.add_argument("--configs", default=",".join(DEFAULT), help=f"known: {', '.join(CONFIGS)}")
    p.add_argument("--reuse", action="store_true", help="skip compiles/evals whose results are in --work")
    p.add_argument("--lock", default="/tmp/qc-heavy.lock", help="flock file around each command ('' = none)")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/observers.md")
    args = p.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    lock = args.lock or None
    results, commands = {}, []
    for name in names:
        passes, _ = CONFIGS[name]
        out = args.work / name
        row = {"passes": passes or "(float)"}
        if passes is not None:
            cmd = qcompile() + [args.model, "--passes", passes, "--calib", str(args.calib), "--calib-samples",
                                str(args.calib_samples), "--seq-len", str(args.seq_len), "-o", str(out), "--force"]
            commands.append(" ".join(["qcompile"] + cmd[len(qcompile()):]))
            report_file = out / "qcompile_report.json"
            if not (args.reuse and report_file.is_file()):
                run(cmd, args.work / f"{name}.compile.log", lock)
            report = json.loads(report_file.read_text())
            row["compile_s"] = report.get("wall_seconds")
            row["pass_seconds"] = report.get("pass_seconds", {})
        target = str(out) if passes is not None else args.model
        eval_file = args.work / f"{name}.eval.json"
        cmd = qcompile() + ["eval", target, "--data", str(args.eval), "--seq-len", str(args.seq_len),
                            "--max-windows", str(args.max_windows), "--json"]
        commands.append(" ".join(["qcompile"] + cmd[len(qcompile()):]) + f" > {eval_file}")
        if not (args.reuse and eval_file.is_file()):
            log = args.work / f"{name}.eval.log"
            run(cmd, log, lock)
            line = [ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1]
            eval_file.write_text(line + "\n")
        row.update(json.loads(eval_file.read_text()))
        results[name] = row
        print(f"{name}: ppl {row['ppl']:.3f}", flush=True)
    for name, row in results.items():
        ref = CONFIGS[name][1]
        if ref and (args.work / ref / "qcompile_report.json").is_file():
            suffix = "input_scale" if name.startswith("w8a8") else "weight_scale"
            row["scale_ratio_vs_minmax"] = {"tensor": suffix,
                                            **scale_ratio(args.work / name, args.work / ref, suffix)}

    float_ppl = results.get("float", {}).get("ppl")
    first = next(iter(results.values()))
    lines = [
        "# Observers on SmolLM2-135M: perplexity",
        "",
        f"Model `{args.model}` (bf16, llama); calibration `{args.calib.name}` {args.calib_samples} x "
        f"{args.seq_len} tokens (the same for every config); eval `{args.eval.name}`, {args.seq_len}-token "
        f"windows, first {args.max_windows} windows ({first['tokens']} tokens), executable graph. w8a8: every "
        "decoder Linear static W8A8 (per-tensor asymmetric activations from the observer); w4a16: int4 "
        "per-group (64, the default for hidden 576), round-to-nearest with absmax (minmax) or MSE-searched "
        "scales. lm_head and embeddings float.",
        "",
        "| config | --passes | ppl | x float | compile s |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ratio = f"{r['ppl'] / float_ppl:.3f}" if float_ppl else "-"
        lines.append(f"| {name} | `{r['passes']}` | {r['ppl']:.3f} | {ratio} | {r.get('compile_s', '-')} |")
    ratios = {n: r["scale_ratio_vs_minmax"] for n, r in results.items() if "scale_ratio_vs_minmax" in r}
    if ratios:
        kinds = sorted({k for v in ratios.values() for k in v if k != "tensor"})
        lines += ["", "Scales against the min-max config (geometric mean over layers and entries, per Linear "
                  "kind; q/k/v and gate/up share one input_scale):", "",
                  "| config | tensor | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        for n, v in ratios.items():
            lines.append(f"| {n} | {v['tensor']} | " + " | ".join(str(v.get(k, '-')) for k in kinds) + " |")
    lines += ["", "x float: ppl / float ppl. Compile seconds are wall time on a 2-core machine shared with "
              "other jobs: compare them only roughly.", "", "## Commands", "", "```"] + commands + ["```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
