#!/usr/bin/env python3
"""ONNX backend on SmolLM2-135M (llama): onnxruntime vs the executable graph (Ascend emulation), and prefill speed.

    python3 bench/run_onnx.py [--schemes w8a8d,w8a16,w4a16] [--work DIR] [--from-dir DIR] [--windows 40]
                              [--runs 5] [--threads 2] [--skip-check] [--float-check] [--skip-bench]

Per scheme S (w4a16 with group 64):
    qcompile smollm2-135m --passes S --target onnx --calib wiki_calib.jsonl --calib-samples 16 --seq-len 512
             -o WORK/llama-S --force             (skipped when WORK/llama-S exists; with --from-dir DIR an
                                                   existing OUT DIR/llama-S is used and only exported to WORK)
    python -m qcompiler.backends.onnx.crosscheck WORK/llama-S --data wiki_eval.jsonl --seq-len 512 --max-windows 40
        -> ppl of the executable graph and of onnxruntime (same windows), max |logit diff|, top-1 agreement
Float reference: the float checkpoint exported to ONNX (float32) through the same code (WORK/float-onnx);
with --float-check the same crosscheck runs on it against the bf16 float graph (`qcompile eval
smollm2-135m`'s code path): the drift that comes from bf16 vs float32 alone, with no quantization.
Benchmark (all in one process, one after another): one 512-token window of wiki_eval, batch 1, prefill
(logits for all 512 positions); onnxruntime CPU provider with --threads intra-op threads and torch with
the same thread count; 1 warm-up, median of --runs. tokens/s = 512 / median seconds.
Every heavy step takes /tmp/qc-heavy.lock (shared machine). Results: bench/results/onnx.{md,json}.
Bound from the issue: |ppl_onnx / ppl_executable - 1| <= 1% per scheme (exit 1 otherwise).
"""
import argparse
import json
import os
import platform
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
EVAL = SHARED / "data" / "calib" / "wiki_eval.jsonl"
PASSES = {"w8a8d": "w8a8d", "w8a16": "w8a16", "w4a16": "w4a16:group=64"}


def compile_scheme(scheme: str, out: Path) -> float | None:
    if out.exists():
        return None
    cmd = ["qcompile", "smollm2-135m", "--passes", PASSES[scheme], "--target", "onnx", "--calib", str(CALIB),
           "--calib-samples", "16", "--seq-len", "512", "-o", str(out), "--force"]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with HeavyLock(f"compile {scheme}"):
        subprocess.run(cmd, check=True, env=dict(os.environ, QC_NO_PROGRESS="1"))
    return round(time.perf_counter() - t0, 1)


def timed(fn, runs: int) -> float:
    fn()  # warm-up (session / kernel caches, lazy weight loading)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def exe_prefill(out: Path):
    """Callable running one window through the executable graph (all layers loaded once)."""
    import torch

    from qcompiler.ir.capture import LayerInputs
    from qcompiler.runtime import load_model
    m = load_model(out, runtime="executable")
    sample = LayerInputs(m.head.embed(torch.zeros(1, 8, dtype=torch.long)), m.head.rope(8))
    layers = [m.layers.get(i, sample) for i in range(m.layers.num_layers)]

    def run(ids):
        with torch.inference_mode():
            h = m.head.embed(ids)
            pe = m.head.rope(ids.shape[1])
            for layer in layers:
                h = layer(h, position_embeddings=pe)
            return m.head.logits(h)
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="w8a8d,w8a16,w4a16")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "qc-bench" / "onnx")
    ap.add_argument("--from-dir", type=Path, default=None)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-check", action="store_true", help="benchmark only (reuse the last crosscheck rows)")
    ap.add_argument("--float-check", action="store_true",
                    help="also the float control: bf16 captured float graph vs the float32 ONNX model")
    ap.add_argument("--skip-bench", action="store_true")
    a = ap.parse_args()
    os.environ["QC_NO_PROGRESS"] = "1"
    import torch
    torch.set_num_threads(a.threads)
    os.environ["QC_THREADS"] = str(a.threads)
    from qcompiler.backends.onnx.crosscheck import crosscheck
    from qcompiler.backends.onnx.export import build_float_model, export_model
    from qcompiler.backends.onnx.runner import OrtModel
    from qcompiler.calib_data import make_windows, read_texts
    a.work.mkdir(parents=True, exist_ok=True)
    schemes = a.schemes.split(",")
    old = json.loads((RESULTS / "onnx.json").read_text()) if (RESULTS / "onnx.json").is_file() else {}
    rows = dict(old.get("schemes", {}))
    dirs = {}
    for s in schemes:
        out = (a.from_dir / f"llama-{s}") if a.from_dir else (a.work / f"llama-{s}")
        onnx_dir = a.work / f"llama-{s}-onnx" if a.from_dir else out / "onnx"
        dirs[s] = (out, onnx_dir)
        compile_s = None if a.from_dir else compile_scheme(s, out)
        if a.skip_check:
            continue
        with HeavyLock(f"crosscheck {s}"):
            t0 = time.perf_counter()
            r = crosscheck(out, EVAL, 512, a.windows, onnx_dir=onnx_dir)
        r.update(scheme=s, passes=PASSES[s], compile_s=compile_s, check_s=round(time.perf_counter() - t0, 1),
                 onnx_ops=json.loads((onnx_dir / "onnx_model.json").read_text())["lowered_ops"])
        rows[s] = r
        print(json.dumps(r), flush=True)
    float_dir = a.work / "float-onnx"
    if not (float_dir / "model.onnx").is_file():
        with HeavyLock("export float onnx"):
            m, info, src = build_float_model("smollm2-135m")
            export_model(m, info, float_dir, src)
            del m
    if a.float_check:
        # Control: the same comparison without any quantization (bf16 graph vs float32 ONNX), i.e. how far
        # the two runtimes drift from the dtype alone.
        with HeavyLock("crosscheck float"):
            r = crosscheck("smollm2-135m", EVAL, 512, a.windows, onnx_dir=float_dir)
        r.update(scheme="float", passes="", compile_s=None, onnx_ops={})
        rows["float"] = r
        print(json.dumps(r), flush=True)
    if a.skip_bench:
        schemes_done = ["float"] + schemes if "float" in rows else schemes
        return write_results(a, rows, schemes_done, old.get("prefill_512", {}))
    tok_src = dirs[schemes[0]][1]
    from qcompiler.loading import load_tokenizer
    ids = make_windows(load_tokenizer(tok_src), read_texts(EVAL), 512, 1)[:1]
    bench = {}
    with HeavyLock("prefill benchmark"):
        for name, folder in [("float32 ONNX (onnxruntime)", float_dir)] + \
                [(f"{s} ONNX (onnxruntime)", dirs[s][1]) for s in schemes]:
            ort_model = OrtModel(folder, a.threads)
            bench[name] = timed(lambda: ort_model(ids), a.runs)
            del ort_model
        for s in schemes:
            run = exe_prefill(dirs[s][0])
            bench[f"{s} executable graph (torch, Ascend emulation, bf16)"] = timed(lambda: run(ids), a.runs)
            del run
    bench_rows = {k: {"seconds": round(v, 4), "tokens_per_s": round(512 / v, 1)} for k, v in bench.items()}
    return write_results(a, rows, (["float"] if "float" in rows else []) + schemes, bench_rows)


def write_results(a, rows, schemes, bench_rows) -> int:
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores (shared)", "threads": a.threads,
              "model": "smollm2-135m (llama)", "eval": f"wiki_eval.jsonl, {a.windows} x 512",
              "calibration": "wiki_calib.jsonl, 16 x 512", "schemes": rows, "prefill_512": bench_rows,
              "from_dir": str(a.from_dir) if a.from_dir else None}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "onnx.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    md = ["# ONNX backend: onnxruntime vs the executable graph (SmolLM2-135M, llama)", "",
          f"Eval: {result['eval']}; calibration {result['calibration']}; {result['machine']}, {a.threads} threads.",
          "Command: `python3 bench/run_onnx.py" + (f" --from-dir {a.from_dir}" if a.from_dir else "") + "`", "",
          "| scheme | ppl executable (bf16) | ppl onnxruntime (fp32) | rel diff | max abs logit diff | mean abs diff | top-1 agree | ONNX quant ops |",
          "|---|---|---|---|---|---|---|---|"]
    ok = True
    for s in schemes:
        r = rows.get(s)
        if not r:
            continue
        ok &= r["ppl_rel_diff"] <= 0.01 or s == "float"
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(r["onnx_ops"].items()) if not k.startswith("qc.")) or "none (float control)"
        md.append(f"| {s} | {r['ppl_executable']:.4f} | {r['ppl_onnx']:.4f} | {100 * r['ppl_rel_diff']:.3f}% | "
                  f"{r['max_abs_logit_diff']:.4g} (of max {r['max_abs_logit']:.3g}) | {r['mean_abs_logit_diff']:.3g} | "
                  f"{100 * r['top1_agreement']:.2f}% | {ops} |")
    md += ["", "Prefill, one 512-token window, batch 1 (median of "
           f"{a.runs} after 1 warm-up):", "", "| model | seconds | tokens/s |", "|---|---|---|"]
    md += [f"| {k} | {v['seconds']} | {v['tokens_per_s']} |" for k, v in bench_rows.items()]
    md += ["", "Why the logits differ beyond float noise (see qcompiler/backends/onnx/lower.py): the executable graph "
           "rounds every activation, norm, rotary table and matmul result to bf16 as the NPU does, the ONNX model "
           "stays float32; with dynamic per-token activation quantization (w8a8d) every Linear input is re-rounded "
           "to int8, so bf16-sized input differences flip int8 codes at every layer and the two runs drift apart "
           "more (lower top-1 agreement) without either being worse (the float32 run has the lower perplexity).",
           "w4a16 uses group 64 (MatMulNBits block 64); w8a16 per-channel (MatMulNBits bits=8, scale repeated per "
           "block: 64 for k=576, 128 for k=1536)."]
    (RESULTS / "onnx.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
