"""Attention quantization (kv8, fa3) and KV-cache decoding on a real model.

1. Perplexity: compiles MODEL with each pipeline in CONFIGS, checks each artifact with
   ../shared/tools/check_ascend_artifact.py, evaluates the executable graph with `qcompile eval`.
2. Generation speed, one run each, same prompt, greedy, N new tokens (no early stop):
   `qcompile run`'s KV-cache path vs its recomputing path (--no-cache) on the w8a8d,kv8 artifact, the
   float model through the same cached path, and the float HF model's `generate` (transformers, sdpa).
   Also the KV cache bytes (int8 codes with kv8 vs bf16) for that sequence.
Writes bench/results/attention.md and .json (rewritten after every step). Every model-loading command runs
under the global heavy-job lock (/tmp/qc-heavy.lock, taken once per config for its compile + eval, and once
for the generation runs), one command at a time.

    python3 bench/run_attention.py [--reuse] [--configs w8a8d,w8a8d_kv8] [--skip-gen]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LOCK, HeavyLock  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

#: in run order (most important first: the report is rewritten after every step, so a cut-off run still
#: leaves its figures); the generation timing runs right after w8a8d_kv8 (it needs that artifact)
CONFIGS = {
    "w8a8d": "w8a8d",
    "w8a8d_kv8": "w8a8d,kv8",
    "w8a8d_fa3": "w8a8d,fa3",
    "smooth_w8a8d": "smooth,w8a8d",
    "smooth_w8a8d_kv8": "smooth,w8a8d,kv8",
    "float": None,
}
PROMPT = "Explain in a few sentences why large language models are quantized before deployment."


def qcompile() -> list[str]:
    exe = shutil.which("qcompile")
    return [exe] if exe else [sys.executable, "-m", "qcompiler.cli"]


def run(cmd: list[str], log: Path) -> float:
    """Run one command (the caller holds the heavy lock); its output goes to `log`."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


# ---- generation timing (runs in a subprocess under the lock: `run_attention.py gen ...`) -----------------
def gen_main(argv) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--mode", choices=["cached", "recompute", "hf"], required=True)
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args(argv)
    import torch
    if a.mode == "hf":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from qcompiler.model_zoo import resolve_model_dir
        path = resolve_model_dir(a.model)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                     trust_remote_code=False).eval()
        from qcompiler.generate import encode_prompt
        ids = torch.tensor([encode_prompt(tok, PROMPT, raw=False)])
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False)
            dt = time.perf_counter() - t0
        new = out[0, ids.shape[1]:].tolist()
        print(json.dumps({"mode": a.mode, "prompt_tokens": ids.shape[1], "new_tokens": len(new), "seconds": dt,
                          "tokens_per_s": len(new) / dt, "ids": new}))
        return 0
    from qcompiler.generate import (KVCache, decode_layers, encode_prompt, forward_cached,
                                    generate_ids_cached)
    from qcompiler.ir.capture import LayerInputs
    from qcompiler.runtime import load_model
    model = load_model(a.model)
    ids = encode_prompt(model.tokenizer, PROMPT, raw=False)
    result = {"mode": a.mode, "prompt_tokens": len(ids)}
    if a.mode == "cached":  # generate_ids_cached's loop, layers loaded before the clock starts
        sample = LayerInputs(model.head.embed(torch.tensor([ids])), model.head.rope(len(ids)))
        layers = decode_layers(model, sample)
        cache = KVCache([s for _, s in layers], 1, len(ids) + a.tokens)
        new, chunk = [], ids
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(a.tokens):
                h = forward_cached(model, layers, cache, torch.tensor([chunk]))
                new.append(int(model.head.logits(h[:, -1:]).argmax(-1).item()))
                chunk = [new[-1]]
            dt = time.perf_counter() - t0
        assert new == generate_ids_cached(model, ids, a.tokens, stop_at_eos=False)  # the product's own loop
        specs = [s for _, s in layers]
        bf16 = sum(2 * 2 * s.kv_heads * s.head_dim * (len(ids) + a.tokens) for s in specs)
        result.update(cache_bytes=cache.nbytes(), cache_bytes_bf16=bf16, cache_dtype=specs[0].k_dtype)
    else:  # the recomputing loop of generate.generate, without EOS stop
        layers = None
        new = []
        with torch.inference_mode():
            pe0 = model.head.rope(len(ids))
            sample = LayerInputs(model.head.embed(torch.tensor([ids])), pe0)
            layers = [model.layers.get(i, sample) for i in range(model.layers.num_layers)]
            t0 = time.perf_counter()
            for _ in range(a.tokens):
                seq = torch.tensor([ids + new])
                h = model.head.embed(seq)
                pe = model.head.rope(seq.shape[1])
                for layer in layers:
                    h = layer(h, position_embeddings=pe)
                new.append(int(model.head.logits(h[:, -1:]).argmax(-1).item()))
        dt = time.perf_counter() - t0
    result.update(new_tokens=len(new), seconds=dt, tokens_per_s=len(new) / dt, ids=new)
    print(json.dumps(result))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "gen":
        return gen_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", type=Path, default=SHARED / "data/calib/wiki_calib.jsonl")
    p.add_argument("--eval", type=Path, default=SHARED / "data/calib/wiki_eval.jsonl")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--tokens", type=int, default=64, help="new tokens for the generation timing")
    p.add_argument("--work", type=Path, default=Path("/tmp/qc-bench-attention"))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--reuse", action="store_true", help="skip compiles/evals/timings whose results are in --work")
    p.add_argument("--skip-gen", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/attention.md")
    args = p.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    results, commands, gen = {}, [], {}
    checker = SHARED / "tools/check_ascend_artifact.py"
    # lock turns: one per group (w8a8d_kv8 with the generation runs that need it; the smooth pair together)
    groups = [["w8a8d"], ["w8a8d_kv8", "gen"], ["w8a8d_fa3"], ["smooth_w8a8d", "smooth_w8a8d_kv8"], ["float"]]
    for group in groups:
        todo = [n for n in group if n in names or (n == "gen" and not args.skip_gen and "w8a8d_kv8" in names)]
        if not todo:
            continue
        heavy = any(not step_done(args, n) for n in todo)
        with (HeavyLock("compile + eval") if heavy else contextlib.nullcontext()):
            for name in todo:
                if name == "gen":
                    run_generation(args, gen, commands)
                else:
                    passes = CONFIGS[name]
                    row = {"passes": passes or "(float)"}
                    measure_config(args, name, passes, args.work / name, row, commands, checker)
                    results[name] = row
                    print(f"{name}: ppl {row['ppl']:.3f} checker {row.get('checker', {}).get('errors', '-')} "
                          "errors", flush=True)
                write_report(args, results, gen, commands)
    return 0


def step_done(args, name: str) -> bool:
    """Whether --reuse finds this step's results in --work (then it needs no turn at the lock)."""
    if not args.reuse:
        return False
    if name == "gen":
        return all((args.work / f).is_file() for f in ("gen_cached_w8a8d_kv8.json", "gen_recompute_w8a8d_kv8.json",
                                                         f"gen_cached_{args.model}.json", f"gen_hf_{args.model}.json"))
    return (args.work / f"{name}.eval.json").is_file() and (
        CONFIGS[name] is None or (args.work / name / "qcompile_report.json").is_file())


def measure_config(args, name, passes, out, row, commands, checker) -> None:
    if passes is not None:
        cmd = qcompile() + [args.model, "--passes", passes, "--calib", str(args.calib), "--calib-samples",
                            str(args.calib_samples), "--seq-len", str(args.seq_len), "-o", str(out), "--force"]
        commands.append(" ".join(["flock", LOCK, "qcompile"] + cmd[len(qcompile()):]))
        report_file = out / "qcompile_report.json"
        if not (args.reuse and report_file.is_file()):
            run(cmd, args.work / f"{name}.compile.log")
        report = json.loads(report_file.read_text())
        row["compile_s"] = report.get("wall_seconds")
        row["pass_seconds"] = report.get("pass_seconds", {})
        chk = subprocess.run([sys.executable, str(checker), str(out), "--json"], capture_output=True, text=True)
        c = json.loads(chk.stdout)
        row["checker"] = {"errors": c["errors"], "warnings": c["warnings"],
                          "rules": sorted({v["rule"] for v in c["violations"]})}
        commands.append(f"python3 ../shared/tools/check_ascend_artifact.py {out}")
    target = str(out) if passes is not None else args.model
    eval_file = args.work / f"{name}.eval.json"
    cmd = qcompile() + ["eval", target, "--data", str(args.eval), "--seq-len", str(args.seq_len),
                        "--max-windows", str(args.max_windows), "--json"]
    commands.append(" ".join(["flock", LOCK, "qcompile"] + cmd[len(qcompile()):]))
    if not (args.reuse and eval_file.is_file()):
        log = args.work / f"{name}.eval.log"
        run(cmd, log)
        line = [ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1]
        eval_file.write_text(line + "\n")
    row.update(json.loads(eval_file.read_text()))


def run_generation(args, gen: dict, commands: list) -> None:
    kv8_out = args.work / "w8a8d_kv8"
    runs = {"qcompile run w8a8d,kv8 (KV cache, int8)": (str(kv8_out), "cached"),
            "qcompile run w8a8d,kv8 (--no-cache, recompute)": (str(kv8_out), "recompute"),
            "qcompile run float (KV cache, bf16)": (args.model, "cached"),
            "HF transformers generate (float, bf16)": (args.model, "hf")}
    for label, (model, mode) in runs.items():
        f = args.work / f"gen_{mode}_{Path(model).name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "gen", model, "--mode", mode,
               "--tokens", str(args.tokens)]
        commands.append(" ".join(["flock", LOCK, "python3 bench/run_attention.py"] + cmd[3:]))
        if not (args.reuse and f.is_file()):
            log = args.work / f"gen_{mode}_{Path(model).name}.log"
            run(cmd, log)
            f.write_text([ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1] + "\n")
        gen[label] = json.loads(f.read_text())
        print(f"{label}: {gen[label]['tokens_per_s']:.2f} tok/s", flush=True)


def write_report(args, results: dict, gen: dict, commands: list) -> None:
    lines = ["# Attention quantization (kv8, fa3) and KV-cache decoding on SmolLM2-135M", "",
             f"Model `{args.model}` (bf16); calibration `{args.calib.name}` {args.calib_samples} x {args.seq_len} "
             f"tokens; eval `{args.eval.name}`, {args.seq_len}-token windows, first {args.max_windows} windows. "
             "The eval runs the executable graph (`OUT/executable`); checker = ../shared/tools/check_ascend_artifact.py.",
             "", "| config | --passes | ppl | x float | vs same pipeline without kv8/fa3 | checker errors / warnings "
             "| compile s |", "|---|---|---|---|---|---|---|"]
    float_ppl = results.get("float", {}).get("ppl")
    base = {"w8a8d_kv8": "w8a8d", "w8a8d_fa3": "w8a8d", "smooth_w8a8d_kv8": "smooth_w8a8d"}
    for name, r in results.items():
        rel = "-"
        if name in base and base[name] in results:
            rel = f"{100 * (r['ppl'] / results[base[name]]['ppl'] - 1):+.2f}%"
        chk = r.get("checker")
        chk_text = f"{chk['errors']} / {chk['warnings']} {', '.join(chk['rules'])}" if chk else "-"
        xf = f"{r['ppl'] / float_ppl:.3f}" if float_ppl else "-"
        lines.append(f"| {name} | `{r['passes']}` | {r['ppl']:.3f} | {xf} | {rel} | {chk_text} | "
                     f"{r.get('compile_s', '-')} |")
    lines += ["", "kv8 adds int8 K (after RoPE) and V per channel (C8); fa3 int8 Q, K, V per head (FAQuant); both "
              "static, absmax/127 on the calibration set. Compile seconds: wall time on 2 CPU cores shared with "
              "other jobs (rough). The float eval is the same command as bench/run_smooth.py's (same windows); "
              "with --reuse its result file may come from there."]
    if gen:
        lines += ["", f"## Generation, greedy, {args.tokens} new tokens, one run each (2 shared CPU cores)", "",
                  f"Prompt (chat template): \"{PROMPT}\"", "",
                  "| run | prompt tokens | tokens/s | seconds | greedy tokens identical to the row above, from the start |",
                  "|---|---|---|---|---|"]
        labels = list(gen)
        for i, (label, g) in enumerate(gen.items()):
            same = "-"
            if i % 2 == 1:  # recompute vs cached (kv8 artifact); HF generate vs our cached float run
                ref = gen[labels[i - 1]]["ids"]
                n = next((j for j, (a, b) in enumerate(zip(g["ids"], ref)) if a != b), min(len(ref), len(g["ids"])))
                same = f"{n}/{len(ref)}"
            lines.append(f"| {label} | {g['prompt_tokens']} | {g['tokens_per_s']:.2f} | {g['seconds']:.1f} | {same} |")
        lines += ["", "Timings exclude loading (layers are loaded, and decode steps built, before the clock starts) "
                  "and include the prompt's prefill. Cached and recomputing runs of the same artifact differ in "
                  "summation order inside attention (one query row vs the whole causal block), which can flip a "
                  "near-tie of the per-token int8 rounding and then the greedy path; the float cached run reproduces "
                  "HF transformers' own cached generate token for token."]
        for label, g in gen.items():
            if "cache_bytes" in g:
                lines.append("")
                lines.append(f"KV cache ({label}, {g['prompt_tokens']} + {args.tokens} tokens, all layers): "
                             f"{g['cache_bytes']} bytes ({g['cache_dtype']}) vs {g['cache_bytes_bf16']} bytes in bf16 "
                             f"= {g['cache_bytes'] / g['cache_bytes_bf16']:.3f}x (scales: 2 x kv_heads*head_dim float32 "
                             "per layer, stored with the layer's tensors)")
    lines += ["", "## Commands", "", "```"] + commands + ["```", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps({"ppl": results, "generation": gen}, indent=2) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
