"""qcompiler vs llm-compressor on SmolLM2-135M: same recipes, calibration and evaluation text, side by side.

llm-compressor is NOT a project dependency: this script installs it into its own throwaway venv
(--venv, default /tmp/qc-llmc-venv: `python3 -m venv`, then `pip install torch==2.13.0` FIRST, then
`pip install llmcompressor torch==2.13.0` so pip never pulls another torch/CUDA build) and runs itself
inside that venv as a worker (`--worker RECIPE`), one recipe per worker process, each under one
acquisition of the global heavy lock /tmp/qc-heavy.lock (cheap recipes first, GPTQ last).

Same inputs as bench/run_pipelines.py (whose results, bench/results/pipelines.json, are the qcompiler side):
- model: the HF folder ~/.cache/qc-models/smollm2-135m (bf16);
- calibration: wiki_calib.jsonl cut exactly as qcompiler does (texts joined by a blank line, tokenized
  once without special tokens, the first 64 consecutive 512-token windows), handed to `oneshot` as a
  pre-tokenized dataset;
- evaluation: wiki_eval.jsonl windowed exactly as qcompiler/evaluate.py (same joining, 512-token windows,
  first 40, each scored on its own: exp(mean NLL of tokens 2..512)), computed in the worker on the
  fake-quantized model left in memory by `oneshot` (compressed-tensors quantizes weights and input
  activations in forward). The `float` recipe checks that this eval reproduces `qcompile eval MODEL`.

Recipes (llm-compressor side -> qcompiler row):
- sq_w8a8: SmoothQuantModifier(0.8, llama mappings) + QuantizationModifier int8 weights per channel
  symmetric, int8 input activations per tensor asymmetric static -> `smooth:alpha=0.8,w8a8` and
  `smooth,w8a8` (alpha searched) (our static W8A8 layout)
- awq_w4a16: AWQModifier (defaults: llama mappings, duo scaling) + QuantizationModifier int4 weights
  group 64 symmetric (RTN with AWQ's scales) -> `awq,w4a16:group=64`
- gptq_w4a16: GPTQModifier int4 group 64 symmetric, actorder weight, dampening 0.01, block 128
  -> `gptq,w4a16:group=64`
- sq_gptq_w8a8: SmoothQuantModifier(0.8) + GPTQModifier with the sq_w8a8 scheme -> `smooth,gptq,w8a8`

On a CPU-only machine the worker turns llm-compressor's IntermediatesCache.pin_memory into a no-op (its AWQ
pins cached activations for faster host-to-device copies and raises without an accelerator; no value
changes). Compile wall time on their side = the worker process minus its eval (model load + oneshot), beside the
`oneshot` call alone. Writes bench/results/llmcompressor.md and .json; resumable (recipes already
measured with the same settings are skipped). If llm-compressor cannot be installed or run, the script
says why in one line, records it in bench/results/llmcompressor.md and exits 0.

    python3 bench/llmcompressor_side_by_side.py                 # all recipes not yet measured
    python3 bench/llmcompressor_side_by_side.py --only float sq_w8a8
    python3 bench/llmcompressor_side_by_side.py --markdown      # only rewrite the .md from the .json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
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
RESULTS = ROOT / "bench" / "results" / "llmcompressor.json"
OURS = ROOT / "bench" / "results" / "pipelines.json"
MODEL = Path.home() / ".cache" / "qc-models" / "smollm2-135m"
TORCH = "torch==2.13.0"

#: recipe -> (qcompiler rows in pipelines.json to compare with, what it is); in run order, heaviest last
RECIPES = {
    "float": (["llama/float"], "float model, this script's eval (checks the windowing)"),
    "sq_w8a8": (["llama/smooth08_w8a8", "llama/smooth_w8a8"], "SmoothQuant 0.8 + static W8A8 (RTN)"),
    "awq_w4a16": (["llama/awq_w4a16"], "AWQ W4A16 g64 sym"),
    "gptq_w4a16": (["llama/gptq_w4a16"], "GPTQ W4A16 g64 sym, actorder weight"),
    "sq_gptq_w8a8": (["llama/smooth_gptq_w8a8"], "SmoothQuant 0.8 + GPTQ static W8A8"),
}

_W8A8 = """
          weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
          input_activations: {num_bits: 8, type: int, symmetric: false, strategy: tensor, dynamic: false}
          targets: [Linear]"""
_SQ = """
    SmoothQuantModifier:
      smoothing_strength: 0.8
      mappings:
      - - ['re:.*q_proj', 're:.*k_proj', 're:.*v_proj']
        - re:.*input_layernorm
      - - ['re:.*gate_proj', 're:.*up_proj']
        - re:.*post_attention_layernorm
      - - ['re:.*down_proj']
        - re:.*up_proj"""
_W4G64 = "{num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64%s}"
YAML = {
    "float": None,
    "sq_w8a8": "quant_stage:\n  quant_modifiers:" + _SQ + """
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        group_0:""" + _W8A8 + "\n",
    # llm-compressor >= 0.14: AWQModifier only scales (a transform); a QuantizationModifier quantizes
    "awq_w4a16": """quant_stage:
  quant_modifiers:
    AWQModifier: {}
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          weights: """ + _W4G64 % "" + """
          targets: [Linear]
""",
    "gptq_w4a16": """quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: [lm_head]
      block_size: 128
      dampening_frac: 0.01
      config_groups:
        group_0:
          weights: """ + _W4G64 % ", actorder: weight" + """
          targets: [Linear]
""",
    "sq_gptq_w8a8": "quant_stage:\n  quant_modifiers:" + _SQ + """
    GPTQModifier:
      ignore: [lm_head]
      block_size: 128
      dampening_frac: 0.01
      config_groups:
        group_0:""" + _W8A8 + "\n",
}


# ------------------------------------------------------------------------------------ qcompiler's windowing

def read_texts(path: Path) -> list[str]:
    """qcompiler.calib_data.read_texts for .jsonl (inputs_pretokenized, else text; empty ones left out)."""
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append(row["inputs_pretokenized"] if "inputs_pretokenized" in row else row["text"])
    return [t for t in texts if t.strip()]


def make_windows(tokenizer, texts: list[str], seq_len: int, max_windows: int):
    """qcompiler.calib_data.make_windows: join with a blank line, no special tokens, consecutive windows."""
    import torch
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    count = min(len(ids) // seq_len, max_windows)
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def perplexity(model, windows, batch: int = 4) -> dict:
    """qcompiler.evaluate.perplexity on an HF model: each window on its own, NLL of tokens 2..L."""
    import torch
    import torch.nn.functional as F
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch):
            w = windows[start:start + batch]
            logits = model(input_ids=w, use_cache=False).logits.float()
            target = w[:, 1:]
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   reduction="sum").item()
            count += target.numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": int(windows.shape[0])}


# ------------------------------------------------------------------------------------------------- worker

def worker(recipe: str, args) -> dict:
    """Runs inside the venv: load, oneshot (timed), eval; returns the figures."""
    t_start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, trust_remote_code=False)
    model.eval()
    res = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    oneshot_s = 0.0
    if YAML[recipe] is not None:
        import llmcompressor
        from datasets import Dataset
        from llmcompressor import oneshot
        res["llmcompressor"] = llmcompressor.__version__
        if not torch.cuda.is_available():
            # llm-compressor 0.14's AWQ pins cached activations (pin_memory, a host-to-device transfer
            # speed-up) and fails without an accelerator; pinning changes no value, so skip it on CPU
            from llmcompressor.pipelines.cache import IntermediatesCache
            IntermediatesCache.pin_memory = lambda self, *a, **k: None
            res["patched"] = "IntermediatesCache.pin_memory -> no-op (CPU)"
        calib = make_windows(tok, read_texts(CALIB), args.seq_len, args.calib_samples)
        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        t0 = time.perf_counter()
        oneshot(model=model, dataset=ds, recipe=YAML[recipe], max_seq_length=args.seq_len,
                num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False, processor=tok)
        oneshot_s = time.perf_counter() - t0
    res["compile_s"] = round(time.perf_counter() - t_start, 1)  # process start to end of oneshot
    res["oneshot_s"] = round(oneshot_s, 1)
    t0 = time.perf_counter()
    windows = make_windows(tok, read_texts(EVAL), args.seq_len, args.max_windows)
    res.update(perplexity(model, windows))
    res["eval_s"] = round(time.perf_counter() - t0, 1)
    return res


# ---------------------------------------------------------------------------------------------- orchestration

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path) -> str | None:
    """Create the venv and install torch (pinned) then llm-compressor; None when ready, else why not."""
    py = venv_python(venv)
    probe = [str(py), "-c", "import llmcompressor, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return None
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(py), "-m", "pip", "install", "-q", TORCH],
             [str(py), "-m", "pip", "install", "-q", "llmcompressor", TORCH]]
    for cmd in steps:
        print("$ " + " ".join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            tail = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip() and "ignored" not in ln]
            return f"`{' '.join(cmd[-2:])}` failed: {tail[-1] if tail else r.returncode}"
    r = subprocess.run(probe, capture_output=True, text=True)
    if r.returncode:
        return f"llm-compressor installed but does not import with torch 2.13.0: {r.stderr.strip().splitlines()[-1]}"
    return None


def settings(recipe: str, args) -> dict:
    return {"recipe": YAML[recipe], "model": str(args.model), "calib": CALIB.name, "calib_samples": args.calib_samples,
            "seq_len": args.seq_len, "eval": EVAL.name, "max_windows": args.max_windows}


def run_worker(recipe: str, args) -> dict:
    out = Path(args.work) / f"{recipe}.json"
    log = Path(args.work) / f"{recipe}.log"
    out.unlink(missing_ok=True)
    cmd = [str(venv_python(Path(args.venv))), str(Path(__file__).resolve()), "--worker", recipe, "--result", str(out),
           "--model", str(args.model), "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
           "--max-windows", str(args.max_windows)]
    print("$ " + " ".join(cmd), flush=True)
    with HeavyLock():
        load = round(os.getloadavg()[0], 2)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            # cwd: the work folder (llm-compressor may write logs into the current directory)
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=args.work)
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        load_after = round(os.getloadavg()[0], 2)
    if os.waitstatus_to_exitcode(status) or not out.exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "?")
        return {"error": err.strip()[:400], "log": str(log), "settings": settings(recipe, args)}
    res = json.loads(out.read_text())
    res.update(process_wall_s=round(wall, 1), peak_rss_mib=round(usage.ru_maxrss / 1024, 1), load_before=load,
               load_after=load_after, settings=settings(recipe, args), measured_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    return res


def write_markdown(results: dict, why_not: str | None) -> str:
    ours = json.loads(OURS.read_text()) if OURS.exists() else {}
    lines = ["# qcompiler vs llm-compressor on SmolLM2-135M (llama), side by side", "",
             "Generated by `python3 bench/llmcompressor_side_by_side.py`. Same model folder "
             "(~/.cache/qc-models/smollm2-135m, bf16), calibration (wiki_calib.jsonl, 64 x 512, cut as qcompiler "
             "does) and evaluation (wiki_eval.jsonl, 512-token windows, first 40, qcompiler's windowing). "
             "qcompiler figures from bench/results/pipelines.json (`qcompile eval` on the executable graph; compile s = "
             "the `qcompile` process); llm-compressor figures: the fake-quantized model after `oneshot`, evaluated "
             "in the same process (compile s = model load + oneshot; oneshot s = the call alone). "
             f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs: load = 1-min load average "
             "before -> after the run; every run alone under the heavy lock.", ""]
    if why_not:
        lines += [f"**llm-compressor could not run here**: {why_not}", ""]
    lines += ["| recipe | qcompiler --passes | qc ppl | llmc ppl | qc compile s | llmc compile s (oneshot s) | "
              "qc peak RSS MiB | llmc peak RSS MiB | qc load | llmc load |", "|---|---|---|---|---|---|---|---|---|---|"]
    for recipe, (our_keys, what) in RECIPES.items():
        for our_key in our_keys:
            r, o = results.get(recipe), ours.get(our_key)
            if r is None and o is None:
                continue
            if r and "error" in r:
                llmc = ["failed: " + r["error"][:160].replace("|", "/"), "-", "-", "-"]
            elif r:
                llmc = [f"{r['ppl']:.3f}", f"{r['compile_s']} ({r['oneshot_s']})", str(r.get("peak_rss_mib", "-")),
                        f"{r.get('load_before')} -> {r.get('load_after')}"]
            else:
                llmc = ["not run", "-", "-", "-"]
            if o:
                qc = [f"`{o['settings']['passes']}`", f"{o['ppl']:.3f}", str(o.get("compile_wall_s", "-")),
                      str(o.get("peak_rss_mib", "-")), f"{o.get('load_before', '')} -> {o.get('load_after_compile', o.get('load_after', ''))}"]
            else:
                qc = [f"(`{our_key}` not measured yet)", "-", "-", "-", "-"]
            lines.append(f"| {recipe} ({what}) | {qc[0]} | {qc[1]} | {llmc[0]} | {qc[2]} | {llmc[1]} | {qc[3]} | "
                         f"{llmc[2]} | {qc[4]} | {llmc[3]} |")
    versions = {r.get("llmcompressor") for r in results.values() if r.get("llmcompressor")}
    if versions:
        lines += ["", f"llm-compressor {', '.join(sorted(versions))}, torch "
                  f"{next(r['torch'] for r in results.values() if r.get('torch'))}."]
    lines += ["", "llm-compressor recipes (YAML passed to `oneshot`):", ""]
    for recipe, y in YAML.items():
        if y:
            lines += [f"{recipe}:", "```yaml", y.rstrip(), "```"]
    text = "\n".join(lines) + "\n"
    RESULTS.with_suffix(".md").write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", default="/tmp/qc-llmc-venv")
    p.add_argument("--work", default="/tmp/qc-bench-llmc")
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--only", nargs="*", help=f"recipes, in this order (default all: {', '.join(RECIPES)})")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args.worker, args)))
        return 0
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.markdown:
        print(write_markdown(results, results.get("_why_not")))
        return 0
    unknown = set(args.only or []) - set(RECIPES)
    if unknown:
        raise SystemExit(f"unknown recipes {sorted(unknown)}; known: {', '.join(RECIPES)}")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    why_not = ensure_venv(Path(args.venv)) if args.model.is_dir() else f"model folder {args.model} not found"
    if why_not:
        print(f"llm-compressor cannot run here: {why_not}")
        results["_why_not"] = why_not
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        write_markdown(results, why_not)
        return 0
    results.pop("_why_not", None)
    for recipe in args.only or list(RECIPES):
        if results.get(recipe, {}).get("settings") == settings(recipe, args) and "error" not in results[recipe]:
            print(f"skip {recipe} (measured {results[recipe].get('measured_at')})", flush=True)
            continue
        res = run_worker(recipe, args)
        results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        results.pop("_why_not", None)
        results[recipe] = res
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{recipe}: " + (f"failed: {res['error']}" if "error" in res else
                                f"ppl {res['ppl']:.3f}, compile {res['compile_s']} s (oneshot {res['oneshot_s']} s)"),
              flush=True)
        write_markdown(results, None)
    print(write_markdown(results, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
