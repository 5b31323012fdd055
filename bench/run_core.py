"""Core benchmark (issue: compiler core): SmolLM2-135M w8a8, both architectures.

For each variant (llama, qwen2): compile `w8a8` and `w8a8 --exclude mlp\\.down_proj` (bf16) and
`w8a8` with `--dtype float16`, calibrated on wiki_calib.jsonl (64 x 512 tokens); run the conformance
checker on each artifact; evaluate perplexity of the executable graphs and of the float model on
wiki_eval.jsonl (same windows); record compile wall time and peak RSS (from each report).
Writes bench/results/core.md and bench/results/core.json and prints the table.

    python bench/run_core.py [--variants llama,qwen2] [--max-windows N] [--work DIR]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CALIB = SHARED / "data/calib/wiki_calib.jsonl"
EVAL = SHARED / "data/calib/wiki_eval.jsonl"


def sh(args, **kw):
    print("$", " ".join(str(a) for a in args), flush=True)
    return subprocess.run([str(a) for a in args], check=True, text=True, capture_output=True, **kw)


def models():
    out = sh([sys.executable, SHARED / "models/get_models.py"]).stdout.split()
    return {"llama": Path(out[0]), "qwen2": Path(out[1])}


def evaluate(path, max_windows):
    args = ["qcompile", "eval", path, "--data", EVAL, "--seq-len", "512", "--json"]
    if max_windows:
        args += ["--max-windows", str(max_windows)]
    t = time.perf_counter()
    r = json.loads(sh(args).stdout.strip().splitlines()[-1])
    r["eval_seconds"] = round(time.perf_counter() - t, 1)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="llama,qwen2")
    ap.add_argument("--max-windows", type=int, default=0, help="0 = all of wiki_eval")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qc-bench-core"))
    a = ap.parse_args()
    paths = models()
    rows = []
    for variant in a.variants.split(","):
        base = evaluate(paths[variant], a.max_windows)
        rows.append({"variant": variant, "config": "float (bf16)", "ppl": base["ppl"], "tokens": base["tokens"],
                     "ratio": 1.0})
        for name, extra in [("w8a8", []), ("w8a8 --exclude mlp\\.down_proj", ["--exclude", r"mlp\.down_proj"]),
                            ("w8a8 --dtype float16", ["--dtype", "float16"])]:
            out = a.work / f"{variant}-{len(rows)}"
            sh(["qcompile", paths[variant], "--passes", "w8a8", "--target", "ascend910b", "--calib", CALIB,
                "--calib-samples", "64", "--seq-len", "512", "-o", out, "--force", *extra])
            check = subprocess.run([sys.executable, SHARED / "tools/check_ascend_artifact.py", out],
                                   capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rep = json.loads((out / "qcompile_report.json").read_text())
            ev = evaluate(out, a.max_windows)
            rows.append({"variant": variant, "config": name, "ppl": ev["ppl"], "tokens": ev["tokens"],
                         "ratio": ev["ppl"] / base["ppl"], "checker": check, "compile_s": rep["wall_seconds"],
                         "peak_rss_mib": rep["peak_rss_mib"]})
            print(rows[-1], flush=True)
    lines = ["| model | pipeline | ppl | x float | tokens | compile s | peak RSS MiB | checker |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['config']} | {r['ppl']:.3f} | {r['ratio']:.3f} | {r['tokens']} | "
                     f"{r.get('compile_s', '-')} | {r.get('peak_rss_mib', '-')} | {r.get('checker', '-')} |")
    table = "\n".join(lines)
    res = ROOT / "bench/results"
    res.mkdir(parents=True, exist_ok=True)
    (res / "core.md").write_text(f"wiki_eval.jsonl, seq 512, windows: {a.max_windows or 'all'}; calibration "
                                 f"wiki_calib.jsonl 64 x 512\n\n{table}\n")
    (res / "core.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
