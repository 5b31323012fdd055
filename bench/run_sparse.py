"""Sparsity on a real model: `sparse` (sparsegpt / wanda / magnitude) alone and sparse-quantized W8A8S.

Compiles SmolLM2-135M with each pipeline below, evaluates the executable graph of each with `qcompile eval`
(same windows as the float model), and writes bench/results/sparse.md (+ sparse.json) with perplexity,
achieved sparsity per Linear (from the compile report, and counted in the stored weights) and, for W8A8S
artifacts, the checker's verdict and a check that the stored int8 weights are zero wherever pruned.
Each config's compile + eval runs under one `flock /tmp/qc-heavy.lock` (one heavy job at a time here).

    python3 bench/run_sparse.py                        # every config
    python3 bench/run_sparse.py --configs sparsegpt,wanda --reuse

Float and plain w8a8 (every Linear) are not recompiled here: their figures are read from
bench/results/smooth.json (same model, calibration, eval windows), when present.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LOCK = "/tmp/qc-heavy.lock"

#: name -> (--passes, extra compile arguments)
CONFIGS = {
    "sparsegpt": ("sparse:ratio=0.5:method=sparsegpt", []),
    "wanda": ("sparse:ratio=0.5:method=wanda", []),
    "magnitude": ("sparse:ratio=0.5:method=magnitude", []),
    "w8a8s": ("sparse:ratio=0.5,w8a8s", ["--target", "ascend310p", "--dtype", "float16"]),
    "w8a8s_excl_down": ("sparse:ratio=0.5,w8a8s", ["--target", "ascend310p", "--dtype", "float16",
                                                   "--exclude", r"mlp\.down_proj"]),
    "w8a8s_bits8": ("sparse:ratio=0.5,w8a8s:bits=8", ["--target", "ascend310p", "--dtype", "float16"]),
    "w8a8s_gptq": ("sparse:ratio=0.5,gptq,w8a8s", ["--target", "ascend310p", "--dtype", "float16"]),
    "smooth_w8a8s": ("smooth:alpha=0.5,sparse:ratio=0.5,w8a8s", ["--target", "ascend310p", "--dtype", "float16"]),
}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def qcompile() -> list[str]:
    exe = shutil.which("qcompile")
    return [exe] if exe else [sys.executable, "-m", "qcompiler.cli"]


def run_pair(compile_cmd: list[str] | None, eval_cmd: list[str] | None, logs: tuple[Path, Path]) -> float:
    """Compile then eval under ONE lock acquisition (the lock is contended: one wait per config, not two)."""
    import shlex
    parts = [f"{shlex.join(c)} > {shlex.quote(str(log))} 2>&1"
             for c, log in zip((compile_cmd, eval_cmd), logs) if c is not None]
    if not parts:
        return 0.0
    script = " && ".join(parts)
    print("$ " + script, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run((["flock", LOCK] if LOCK else []) + ["sh", "-c", script], cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}); see {logs[0]} / {logs[1]}")
    return time.perf_counter() - t0


def report_sparsity(report: dict) -> dict:
    """Per Linear kind: min / max achieved sparsity and mean rel_err over layers (from the compile report)."""
    out = {}
    for kind in KINDS:
        sp, err = [], []
        for layer in report["layers"]:
            for name, rec in layer.get("passes", {}).get("sparse", {}).get("linears", {}).items():
                if name.endswith(kind):
                    sp.append(float(rec["sparsity"]))
                    if "rel_err" in rec:
                        err.append(float(rec["rel_err"]))
        if sp:
            out[kind] = {"linears": len(sp), "min": min(sp), "max": max(sp),
                         "rel_err_mean": round(statistics.mean(err), 5) if err else None}
    return out


def stored_sparsity(out: Path, ratio: float) -> dict:
    """Counted in the artifact's weights: per Linear kind, fraction of zeros (min/max over layers), rows with
    fewer zeros than round(ratio * k), and for int8 weights the code range."""
    desc = json.loads((out / "quant_model_description.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    stats: dict[str, dict] = {}
    for f in files:
        with safe_open(f, "pt") as h:
            for key in h.keys():
                m = re.match(r"model\.layers\.\d+\.(self_attn|mlp)\.(\w+)\.weight$", key)
                if not m:
                    continue
                w = h.get_tensor(key)
                kind = m.group(2)
                need = int(ratio * w.shape[1] + 0.5)
                zeros = (w == 0).sum(1)
                s = stats.setdefault(kind, {"type": desc[key], "fractions": [], "short_rows": 0, "absmax": 0})
                s["fractions"].append(float(zeros.sum()) / w.numel())
                s["short_rows"] += int((zeros < need).sum())
                if w.dtype == torch.int8:
                    s["absmax"] = max(s["absmax"], int(w.abs().max()))
    return {k: {"type": v["type"], "min": round(min(v["fractions"]), 6), "max": round(max(v["fractions"]), 6),
                "short_rows": v["short_rows"], "int8_absmax": v["absmax"] if v["type"] != "FLOAT" else None}
            for k, v in stats.items()}


def checker(out: Path) -> str:
    tool = SHARED / "tools" / "check_ascend_artifact.py"
    if not tool.is_file():
        return "checker absent"
    r = subprocess.run([sys.executable, str(tool), str(out)], capture_output=True, text=True)
    return (r.stdout.strip().splitlines() or ["(no output)"])[-1] + f" (exit {r.returncode})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", type=Path, default=SHARED / "data/calib/wiki_calib.jsonl")
    p.add_argument("--eval", type=Path, default=SHARED / "data/calib/wiki_eval.jsonl")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--work", type=Path, default=Path("/tmp/qc-sparse/bench"))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--reuse", action="store_true", help="skip compiles/evals whose results are in --work")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/sparse.md")
    p.add_argument("--no-lock", action="store_true", help="do not take the heavy-job lock (tiny models only)")
    args = p.parse_args(argv)
    if args.no_lock:
        global LOCK
        LOCK = ""
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    results, commands = {}, []
    prev = args.out.with_suffix(".json")
    if prev.is_file():   # keep configs measured earlier and not rerun now
        results.update({k: v for k, v in json.loads(prev.read_text()).get("results", {}).items()
                        if k not in names})
    for name in names:
        passes, extra = CONFIGS[name]
        out = args.work / name
        row = {"passes": passes, "args": " ".join(extra)}
        cmd = qcompile() + [args.model, "--passes", passes, "--calib", str(args.calib), "--calib-samples",
                            str(args.calib_samples), "--seq-len", str(args.seq_len), *extra, "-o", str(out), "--force"]
        commands.append("flock /tmp/qc-heavy.lock qcompile " + " ".join(repr(c) if "\\" in c else c
                                                                         for c in cmd[len(qcompile()):]))
        report_file = out / "qcompile_report.json"
        eval_file = args.work / f"{name}.eval.json"
        eval_cmd = qcompile() + ["eval", str(out), "--data", str(args.eval), "--seq-len", str(args.seq_len),
                                 "--max-windows", str(args.max_windows), "--json"]
        commands.append("flock /tmp/qc-heavy.lock qcompile " + " ".join(eval_cmd[len(qcompile()):]) + f" > {eval_file}")
        eval_log = args.work / f"{name}.eval.log"
        need_compile = not (args.reuse and report_file.is_file())
        need_eval = need_compile or not (args.reuse and eval_file.is_file())
        if need_compile or need_eval:
            row["compile_eval_s"] = round(run_pair(cmd if need_compile else None, eval_cmd if need_eval else None,
                                                   (args.work / f"{name}.compile.log", eval_log)), 1)
        if need_eval:
            line = [ln for ln in eval_log.read_text().splitlines() if ln.startswith("{")][-1]
            eval_file.write_text(line + "\n")
        report = json.loads(report_file.read_text())
        row.update(compile_s=report.get("wall_seconds"), pass_seconds=report.get("pass_seconds", {}),
                   model_quant_type=report["model_quant_type"], dtype=report["dtype"], target=report["target"],
                   sparsity_report=report_sparsity(report), sparsity_stored=stored_sparsity(out, 0.5))
        if report["model_quant_type"] != "FLOAT":
            row["checker"] = checker(out)
        row.update(json.loads(eval_file.read_text()))
        row["commands"] = commands[-2:]
        results[name] = row
        print(f"{name}: ppl {row['ppl']:.3f}", flush=True)
        write(args, results, commands)
    return 0


def write(args, results: dict, commands: list[str]) -> None:
    ref = {}
    smooth = ROOT / "bench/results/smooth.json"
    if smooth.is_file():
        s = json.loads(smooth.read_text())
        s = s.get("results", s)
        ref = {k: s[k]["ppl"] for k in ("float", "w8a8") if k in s}
    fl = ref.get("float")
    lines = [
        "# sparse (unstructured pruning) and w8a8s (W8A8S) on SmolLM2-135M: perplexity",
        "",
        f"Model `{args.model}` (Llama arch, bf16); calibration `{args.calib.name}` {args.calib_samples} x "
        f"{args.seq_len} tokens; eval `{args.eval.name}`, {args.seq_len}-token windows, first {args.max_windows} "
        "windows; the eval runs the executable graph (`OUT/executable`). ratio 0.5 = exactly half of every row "
        "of every decoder Linear zeroed (lm_head and embeddings dense).",
        "",
        "| config | --passes | extra args | artifact | ppl | x float | compile s | sparse pass s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if ref:
        lines.append(f"| float (bench/results/smooth.json) | - | - | - | {ref.get('float', 0):.3f} | 1.000 | - | - |")
        if "w8a8" in ref:
            lines.append(f"| w8a8 (bench/results/smooth.json) | `w8a8` | - | W8A8 bf16 | {ref['w8a8']:.3f} | "
                         f"{ref['w8a8'] / fl:.3f} | - | - |")
    for name, r in results.items():
        lines.append(f"| {name} | `{r['passes']}` | `{r['args'] or '-'}` | {r['model_quant_type']} {r['dtype']} | "
                     f"{r['ppl']:.3f} | {r['ppl'] / fl:.3f} | {r.get('compile_s', '-')} | "
                     f"{r.get('pass_seconds', {}).get('sparse', '-')} |" if fl else
                     f"| {name} | `{r['passes']}` | `{r['args'] or '-'}` | {r['model_quant_type']} | {r['ppl']:.3f} | - | "
                     f"{r.get('compile_s', '-')} | {r.get('pass_seconds', {}).get('sparse', '-')} |")
    lines += ["", "## Achieved sparsity per Linear (over every decoder layer)", "",
              "From the compile report (fraction of zeros of each pruned weight, min/max over layers; rel_err = "
              "tr(dW H dW^T) / tr(W H W^T), mean over layers) and counted in the stored artifact weights "
              "(`short rows`: rows with fewer than k/2 zeros; `|q| max`: int8 code range).", "",
              "| config | Linear | report min/max | rel_err | stored type | stored zeros min/max | short rows | |q| max |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for kind in KINDS:
            rep = r["sparsity_report"].get(kind)
            st = r["sparsity_stored"].get(kind, {})
            if rep is None and not st:
                continue
            rep_s = f"{rep['min']:.4f} / {rep['max']:.4f}" if rep else "not pruned"
            lines.append(f"| {name} | {kind} | {rep_s} | {rep['rel_err_mean'] if rep else '-'} | "
                         f"{st.get('type', '-')} | {st.get('min', 0):.4f} / {st.get('max', 0):.4f} | "
                         f"{st.get('short_rows', '-')} | {st.get('int8_absmax') if st.get('int8_absmax') is not None else '-'} |")
    checks = [(n, r["checker"]) for n, r in results.items() if "checker" in r]
    if checks:
        lines += ["", "## Checker (../shared/tools/check_ascend_artifact.py)", ""]
        lines += [f"- {n}: {c}" for n, c in checks]
    lines += ["", "## Commands", "", "```"] + [c for r in results.values() for c in r.get("commands", [])] + ["```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps({"reference": ref, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
