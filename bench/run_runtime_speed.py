#!/usr/bin/env python3
"""Speed of the executable graph (`qcompile eval` / `qcompile run`) against transformers, as ratios.

    python3 bench/run_runtime_speed.py [--sections prefill,decode,startup,layer7b,profile] [--threads 1,2]
        [--batches 1,4] [--reps 2] [--rounds 1] [--before CHECKOUT] [--work DIR] [--label NAME]

Sections (SmolLM2-135M, OUTs of every scheme compiled into WORK/outs on first use with
`--calib wiki_calib.jsonl --calib-samples 8 --seq-len 128`):
- prefill: one forward of 512 tokens (embedding, 30 layers, final norm, lm_head on every token), batch 1 and
  4, per thread count; each model's median time and its speed-up over transformers' float32 forward (sdpa
  attention, no torch.compile) of the same tokens: `ratio = t(transformers fp32) / t(model)`, both measured in
  one process, models interleaved within every repeat.
- decode: greedy generation of 64 new tokens with the KV cache after a chat prompt, batch 1, against
  transformers bf16 `generate` (DynamicCache); tokens/s = 64 / (prefill + 64 steps). Layers are loaded
  before the clock starts (that is `startup`).
- startup: wall time and CPU time (user + system) of a fresh `python3 -m qcompiler.cli run X --prompt P
  --max-new-tokens 1` and of `qcompile eval X --data 1 window --seq-len 128 --max-windows 1` (imports, load,
  first token / window), per thread count (QC_THREADS).
- layer7b: `qcompile eval` throughput of one decoder layer with Qwen2.5-7B's shapes (hidden 3584, MLP 18944,
  28 heads, 4 KV heads; random weights, compiled per scheme), 4 windows x 512 tokens through the eval code
  path (layer load excluded), per thread count; tokens/s per layer and the implied time for 28 layers.
- profile: torch.profiler tables (self CPU time per op, first thread count) of a 512-token prefill (4 layers)
  and of 16 decode steps, for w8a8d, w8a16 and the float model.
Each (section, side, thread count) runs in a fresh worker process; with --before CHECKOUT that checkout's
qcompiler is measured too, its worker alternating with this checkout's (same OUTs, same load). Every
worker holds /tmp/qc-heavy.lock (shared machine); the machine's load average is recorded per worker.
Results: bench/results/runtime_speed[_LABEL].{md,json}, and in BENCHMARKS.md between the markers
`<!-- runtime_speed[_LABEL]:begin -->` / `<!-- runtime_speed[_LABEL]:end -->` where BENCHMARKS.md has them.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HeavyLock, replace_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "bench" / "results"
CALIB = SHARED / "data" / "calib" / "wiki_calib.jsonl"
EVAL = SHARED / "data" / "calib" / "wiki_eval.jsonl"
MODEL = "smollm2-135m"
SCHEMES = ("w8a8", "w8a8d", "w8a16", "w4a16", "w4a8d")
PROMPT = "What is quantization? Explain it to a software engineer."
NEW_TOKENS = 64
PREFILL_TOKENS = 512


def _env():
    return {**os.environ, "QC_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------------- workers

def _models(code: Path, outs: Path, hf_dtypes=("float32", "bfloat16")):
    """{name: forward(ids [B, L]) -> logits} for transformers fp32/bf16, our float model and every OUT."""
    import torch
    from qcompiler.ir.capture import LayerInputs
    from qcompiler.model_zoo import resolve_model_dir
    from qcompiler.runtime import load_model
    from transformers import AutoModelForCausalLM
    folder = resolve_model_dir(MODEL)
    models, loaded = {}, {}
    for dt in hf_dtypes:
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dt), use_safetensors=True,
                                                  trust_remote_code=False).eval()
        models[f"transformers {'fp32' if dt == 'float32' else 'bf16'}"] = hf
    for name, path in [("float (ours)", MODEL)] + [(s, str(outs / s)) for s in SCHEMES]:
        m = load_model(path)
        sample_ids = torch.arange(8)[None] + 100
        pe = m.head.rope(8)
        sample = LayerInputs(m.head.embed(sample_ids), pe)
        layers = [_runnable(m, i, sample) for i in range(m.layers.num_layers)]
        loaded[name] = (m, layers)
    return models, loaded


def _runnable(m, i: int, sample):
    """Layer i as `qcompile eval` runs it: prepared when this checkout prepares layouts (older ones do not)."""
    try:
        return m.layers.get(i, sample, prepared=True)
    except TypeError:
        return m.layers.get(i, sample)


def _ours_forward(m, layers, ids):
    h = m.head.embed(ids)
    pe = m.head.rope(ids.shape[1])
    for layer in layers:
        h = layer(h, position_embeddings=pe)
    return m.head.logits(h)


def _tokens(n_tokens: int, batch: int):
    import torch
    from qcompiler.calib_data import read_texts
    from qcompiler.loading import load_tokenizer
    from qcompiler.model_zoo import resolve_model_dir
    tok = load_tokenizer(resolve_model_dir(MODEL), False)
    ids = tok("\n\n".join(read_texts(EVAL)[:400]), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: n_tokens * batch]).reshape(batch, n_tokens)


def worker_prefill(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    hf, ours = _models(a.code, a.outs)
    batches = [int(b) for b in a.batches.split(",")]
    ids = _tokens(PREFILL_TOKENS, max(batches))
    runs: dict = {}
    cpu: dict = {}

    def timed(name, b):
        x = ids[:b]
        with torch.inference_mode():
            t0, c0 = time.perf_counter(), time.process_time()
            if name in hf:
                hf[name](input_ids=x, use_cache=False)
            else:
                _ours_forward(*ours[name], x)
            cpu[f"{name}|{b}"] = cpu.get(f"{name}|{b}", []) + [time.process_time() - c0]
            return time.perf_counter() - t0

    names = list(hf) + list(ours)
    for b in batches:  # warm-up (first-call allocations, oneDNN primitive creation per shape)
        for name in names:
            timed(name, b)
    cpu.clear()
    for rep in range(a.reps):
        for b in batches:
            order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no model always first
            for name in order:
                runs.setdefault(f"{name}|{b}", []).append(timed(name, b))
    return {"runs": runs, "cpu": cpu}


def worker_decode(a) -> dict:
    import torch
    from qcompiler.generate import KVCache, decode_layers, encode_prompt, forward_cached
    from qcompiler.ir.capture import LayerInputs
    from qcompiler.loading import load_tokenizer
    from qcompiler.model_zoo import resolve_model_dir
    from qcompiler.runtime import load_model
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(a.threads)
    folder = resolve_model_dir(MODEL)
    tok = load_tokenizer(folder, False)
    ids = encode_prompt(tok, PROMPT, raw=False)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, use_safetensors=True,
                                              trust_remote_code=False).eval()
    ours = {}
    for name, path in [("float (ours)", MODEL)] + [(s, str(a.outs / s)) for s in SCHEMES]:
        m = load_model(path)
        sample = LayerInputs(m.head.embed(torch.tensor([ids + ids[:1]]))[:, :len(ids)], m.head.rope(len(ids)))
        ours[name] = (m, decode_layers(m, sample))

    def run_ours(m, layers, new_tokens=NEW_TOKENS):  # generate_ids_cached's loop, layers built beforehand
        cache = KVCache([spec for _, spec in layers], 1, len(ids) + new_tokens)
        chunk, out = ids, []
        with torch.inference_mode():
            for _ in range(new_tokens):
                h = forward_cached(m, layers, cache, torch.tensor([chunk]))
                nxt = int(m.head.logits(h[:, -1:]).argmax(-1).item())
                out.append(nxt)
                chunk = [nxt]
        return out

    def timed(name, new_tokens=NEW_TOKENS):
        t0, c0 = time.perf_counter(), time.process_time()
        if name == "transformers bf16":
            with torch.inference_mode():
                hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=tok.eos_token_id)
        else:
            run_ours(*ours[name], new_tokens)
        if new_tokens == NEW_TOKENS:
            cpu.setdefault(name, []).append(time.process_time() - c0)
        return time.perf_counter() - t0

    names = ["transformers bf16"] + list(ours)
    cpu: dict = {}
    for name in names:  # warm-up: prefill and a few steps
        timed(name, 4)
    runs: dict = {}
    for rep in range(a.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            runs.setdefault(name, []).append(timed(name))
    return {"runs": runs, "cpu": cpu, "prompt_tokens": len(ids)}


def worker_layer7b(a) -> dict:
    import torch
    from qcompiler.ir.capture import LayerInputs
    from qcompiler.model import run_layer_batched
    from qcompiler.runtime import load_model
    torch.set_num_threads(a.threads)
    hidden = None
    runs: dict = {}
    loaded = {}
    for name, path in [("float (ours)", a.work / "qwen7b-layer")] + [(s, a.work / "qwen7b-outs" / s) for s in SCHEMES]:
        m = load_model(str(path))
        if hidden is None:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, m.head.embed_weight.shape[0], (4, PREFILL_TOKENS), generator=g)
            hidden = m.head.embed(ids)
            pe = m.head.rope(PREFILL_TOKENS)
        loaded[name] = _runnable(m, 0, LayerInputs(hidden[:1], pe))
    for name in loaded:  # warm-up
        run_layer_batched(loaded[name], hidden[:1, :64], tuple(t[:, :64] for t in pe), 1)
    for rep in range(a.reps):
        for name in loaded:
            t0 = time.perf_counter()
            run_layer_batched(loaded[name], hidden, pe, 4)  # eval's default batch holds all 4 windows
            runs.setdefault(name, []).append(time.perf_counter() - t0)
    return {"runs": runs, "tokens": int(hidden.shape[0] * hidden.shape[1])}


def worker_profile(a) -> dict:
    """torch.profiler tables (self CPU time by op, one thread): a 512-token prefill of 4 layers and 16
    decode steps of all 30, for w8a8d, w8a16 and the float model."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from qcompiler.generate import KVCache, decode_layers, forward_cached
    from qcompiler.ir.capture import LayerInputs
    from qcompiler.runtime import load_model
    torch.set_num_threads(a.threads)
    ids = _tokens(PREFILL_TOKENS, 1)
    tables = {}
    for name, path in [("w8a8d", str(a.outs / "w8a8d")), ("w8a16", str(a.outs / "w8a16")), ("float (ours)", MODEL)]:
        m = load_model(path)
        h, pe = m.head.embed(ids), m.head.rope(PREFILL_TOKENS)
        layers = [_runnable(m, i, LayerInputs(h, pe)) for i in range(4)]
        with torch.inference_mode():
            for layer in layers:
                layer(h, position_embeddings=pe)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for layer in layers:
                    layer(h, position_embeddings=pe)
        tables[f"{name} prefill 512 tokens, 4 layers"] = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=12)
        prompt = ids[:, :32].tolist()[0]
        steps = decode_layers(m, LayerInputs(m.head.embed(torch.tensor([prompt])), m.head.rope(32)))
        cache = KVCache([spec for _, spec in steps], 1, 32 + 24)
        with torch.inference_mode():
            h = forward_cached(m, steps, cache, torch.tensor([prompt]))
            for _ in range(4):
                h = forward_cached(m, steps, cache, torch.tensor([[int(m.head.logits(h[:, -1:]).argmax())]]))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(16):
                    h = forward_cached(m, steps, cache, torch.tensor([[int(m.head.logits(h[:, -1:]).argmax())]]))
        tables[f"{name} 16 decode steps"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    return {"tables": tables}


WORKERS = {"prefill": worker_prefill, "decode": worker_decode, "layer7b": worker_layer7b, "profile": worker_profile}


# ------------------------------------------------------------------------------------------- parent

def prepare_outs(work: Path) -> Path:
    outs = work / "outs"
    for s in SCHEMES:
        if not (outs / s).exists():
            with HeavyLock():
                subprocess.run([sys.executable, "-m", "qcompiler.cli", MODEL, "--passes", s, "--calib", str(CALIB),
                                "--calib-samples", "8", "--seq-len", "128", "-o", str(outs / s)],
                               cwd=ROOT, env=_env(), check=True)
    return outs


def prepare_7b(work: Path) -> None:
    """A 1-layer Qwen2 checkpoint with Qwen2.5-7B's layer shapes (random weights, SmolLM2's tokenizer), and
    its OUT per scheme."""
    folder = work / "qwen7b-layer"
    if not (folder / "config.json").exists():
        code = f"""
import torch, shutil
from transformers import Qwen2Config, Qwen2ForCausalLM, AutoTokenizer
from qcompiler.model_zoo import resolve_model_dir
src = resolve_model_dir({MODEL!r})
tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
cfg = Qwen2Config(vocab_size=len(tok), hidden_size=3584, intermediate_size=18944, num_hidden_layers=1,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=4096, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False)
torch.manual_seed(0)
m = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
with torch.no_grad():
    for p in m.parameters():
        if p.dim() == 2:
            p.normal_(0, 0.02)
m.save_pretrained({str(folder)!r})
tok.save_pretrained({str(folder)!r})
"""
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), check=True)
    for s in SCHEMES:
        out = work / "qwen7b-outs" / s
        # Qwen2's q/k/v biases: no engine adds a W4A8_DYNAMIC Linear's bias (compile refuses it), so w4a8d
        # puts w8a8d on attention and W4A8_DYNAMIC on the MLP (tests/byte_identity.py does the same)
        passes = r"w8a8d:match=self_attn\.,w4a8d" if s == "w4a8d" else s
        if not out.exists():
            with HeavyLock():
                subprocess.run([sys.executable, "-m", "qcompiler.cli", str(folder), "--passes", passes, "--calib",
                                str(CALIB), "--calib-samples", "4", "--seq-len", "128", "-o", str(out)],
                               cwd=ROOT, env=_env(), check=True)


def run_worker(section: str, code: Path, a, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", section, "--code", str(code),
           "--schemes", ",".join(SCHEMES),
           "--threads", str(threads), "--reps", str(a.reps), "--batches", a.batches, "--work", str(a.work)]
    with HeavyLock():
        load = os.getloadavg()[0]
        r = subprocess.run(cmd, cwd=code, env=_env(), capture_output=True, text=True)
    if r.returncode:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"worker {section} ({code}) failed")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["load_avg_1min_at_start"] = load
    return res


def startup_times(code: Path, target: str, data: Path, threads: int) -> dict:
    """{"run": wall s, "run cpu": CPU s, "eval": ..., "eval cpu": ...} of one fresh command each: wall from
    the command's start to its exit (first token / first window included), CPU = the child's user + system
    time (resource.RUSAGE_CHILDREN; robust to other jobs on the machine)."""
    import resource
    out = {}
    for cmd in ("run", "eval"):
        args = (["run", target, "--prompt", PROMPT, "--max-new-tokens", "1"] if cmd == "run" else
                ["eval", target, "--data", str(data), "--seq-len", "128", "--max-windows", "1"])
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qcompiler.cli", *args], cwd=code,
                       env={**_env(), "QC_THREADS": str(threads)}, check=True, capture_output=True)
        out[cmd] = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out[f"{cmd} cpu"] = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return out


def main() -> int:
    global SCHEMES
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="prefill,decode,startup,layer7b,profile")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--reps", type=int, default=2, help="repeats inside each worker")
    p.add_argument("--rounds", type=int, default=1, help="workers per (section, side, threads)")
    p.add_argument("--before", type=Path, help="another qcompiler checkout, measured alternately")
    p.add_argument("--work", type=Path, default=Path("/tmp/qc-bench-runtime"))
    p.add_argument("--label", default="")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="schemes measured (comma list)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--code", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    SCHEMES = tuple(a.schemes.split(","))
    if a.worker:
        sys.path.insert(0, str(a.code))
        a.outs = a.work / "outs"
        a.threads = int(a.threads)
        print(json.dumps(WORKERS[a.worker](a)))
        return 0
    sections = a.sections.split(",")
    # SmolLM2's OUTs are for the other sections; layer7b compiles its own (prepare_7b)
    outs = prepare_outs(a.work) if set(sections) - {"layer7b"} else a.work / "outs"
    if "layer7b" in sections:
        prepare_7b(a.work)
    sides = {"this checkout": ROOT}
    if a.before:
        sides = {"before": a.before.resolve(), **sides}
    threads = [int(t) for t in a.threads.split(",")]
    result = {"sides": {k: str(v) for k, v in sides.items()}, "reps": a.reps, "rounds": a.rounds,
              "cpu_count": os.cpu_count(), "sections": {}}
    for section in sections:
        if section == "startup":
            data = a.work / "eval_1window.jsonl"
            if not data.exists():
                data.write_text("".join(line for line in EVAL.read_text().splitlines(True)[:20]))
            per, loads = {}, []
            with HeavyLock():
                load = os.getloadavg()[0]
                for threads_n in threads:
                    for r in range(a.rounds * a.reps):
                        side_order = list(sides) if r % 2 == 0 else list(reversed(sides))
                        for name in ["float (ours)", *SCHEMES]:
                            target = MODEL if name == "float (ours)" else str(outs / name)
                            for side in side_order:
                                loads.append(round(os.getloadavg()[0], 2))
                                t = startup_times(sides[side], target, data, threads_n)
                                row = f"{side}, {threads_n} thread(s)"
                                for cmd, v in t.items():
                                    per.setdefault(row, {}).setdefault(f"{name}|{cmd}", []).append(v)
                                print(f"startup {row} {name}: run {t['run']:.2f} s ({t['run cpu']:.2f} s CPU), "
                                      f"eval {t['eval']:.2f} s ({t['eval cpu']:.2f} s CPU), load {loads[-1]}",
                                      flush=True)
            result["sections"]["startup"] = {"load_avg_1min_at_start": load, "load_avg_1min_per_command": loads,
                                             "runs": per}
            write(result, a.label)
            continue
        per = {}
        for t in threads if section != "profile" else threads[:1]:  # profile: first thread count only
            for r in range(a.rounds):
                side_order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for side in side_order:
                    res = run_worker(section, sides[side], a, t)
                    per.setdefault(side, {}).setdefault(str(t), []).append(res)
                    print(f"{section} {side} threads={t}: done (load {res['load_avg_1min_at_start']:.2f})", flush=True)
        result["sections"][section] = per
        write(result, a.label)  # after every section: a long run stopped midway keeps what it measured
    print(write(result, a.label))
    return 0


def write(result: dict, label: str) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "runtime_speed" + (f"_{label}" if label else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    md = render(result)
    (RESULTS / f"{stem}.md").write_text(md)
    # BENCHMARKS.md gets the same tables where it has this run's markers (`<!-- runtime_speed_LABEL:begin -->`
    # ... `:end -->`); without them nothing there changes
    title, rest = md.split("\n", 1)
    replace_block(f"<!-- {stem}:begin -->", f"<!-- {stem}:end -->",
                  f"**{title.lstrip('# ')}**\n" + rest.replace("\n## ", "\n#### "))
    return md


# ------------------------------------------------------------------------------------------- report

def _merge(workers: list, key: str = "runs") -> tuple[dict, list]:
    runs: dict = {}
    for w in workers:
        for k, v in w.get(key, {}).items():
            runs.setdefault(k, []).extend(v)
    return runs, [round(w["load_avg_1min_at_start"], 2) for w in workers]


def render(result: dict) -> str:
    med = statistics.median
    lines = [f"# Executable-graph speed (SmolLM2-135M unless said), {result['cpu_count']} cores, "
             f"{result['reps']} repeats x {result['rounds']} worker(s) per cell, medians", ""]
    secs = result["sections"]
    if "prefill" in secs:
        lines += ["## Prefill, 512 tokens: speed-up over transformers fp32 forward (ratio of wall times; ms in "
                  "brackets; `cpu` = the same ratio of process CPU times, robust to other jobs on the machine)", ""]
        for side, per_t in secs["prefill"].items():
            for t, workers in per_t.items():
                runs, loads = _merge(workers)
                cpu, _ = _merge(workers, "cpu")
                batches = sorted({int(k.split("|")[1]) for k in runs})
                names = list(dict.fromkeys(k.split("|")[0] for k in runs))
                lines += [f"{side}, {t} thread(s), load avg at start {loads}:", "",
                          "| model | " + " | ".join(f"batch {b} | cpu" for b in batches) + " |",
                          "|---|" + "---|---|" * len(batches)]
                for n in names:
                    cells = []
                    for b in batches:
                        base, mine = med(runs[f"transformers fp32|{b}"]), med(runs[f"{n}|{b}"])
                        cells.append(f"{base / mine:.2f}x ({mine * 1000:.0f})")
                        if cpu.get(f"{n}|{b}"):
                            cells.append(f"{med(cpu[f'transformers fp32|{b}']) / med(cpu[f'{n}|{b}']):.2f}x")
                        else:
                            cells.append("")
                    lines.append(f"| {n} | " + " | ".join(cells) + " |")
                lines.append("")
    if "decode" in secs:
        lines += [f"## Decode, {NEW_TOKENS} new tokens with the KV cache, batch 1: tokens/s and ratio to "
                  "transformers bf16 generate", ""]
        for side, per_t in secs["decode"].items():
            for t, workers in per_t.items():
                runs, loads = _merge(workers)
                cpu, _ = _merge(workers, "cpu")
                base = NEW_TOKENS / med(runs["transformers bf16"])
                lines += [f"{side}, {t} thread(s), load avg at start {loads}:", "",
                          "| model | tok/s | ratio | cpu ratio |", "|---|---|---|---|"]
                for n, v in runs.items():
                    tps = NEW_TOKENS / med(v)
                    c = f"{med(cpu['transformers bf16']) / med(cpu[n]):.2f}x" if cpu.get(n) else ""
                    lines.append(f"| {n} | {tps:.1f} | {tps / base:.2f}x | {c} |")
                lines.append("")
    if "startup" in secs:
        st = secs["startup"]
        lines += ["## Startup: seconds of a fresh `qcompile run --max-new-tokens 1` / `qcompile eval "
                  f"--seq-len 128 --max-windows 1`, start to exit (load avg at start "
                  f"{st['load_avg_1min_at_start']:.2f}, per command {min(st.get('load_avg_1min_per_command') or [0])}"
                  f"-{max(st.get('load_avg_1min_per_command') or [0])}; `cpu` = the command's user + system CPU "
                  "seconds)", "",
                  "| side | model | run (s) | run cpu (s) | eval (s) | eval cpu (s) |", "|---|---|---|---|---|---|"]
        for side, runs in st["runs"].items():
            names = list(dict.fromkeys(k.split("|")[0] for k in runs))
            for n in names:
                cells = [f"{med(runs[k]):.2f}" if runs.get(k) else "" for k in
                         (n + "|run", n + "|run cpu", n + "|eval", n + "|eval cpu")]
                lines.append(f"| {side} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    if "profile" in secs:
        lines += ["## Profile (torch.profiler, self CPU time by op)", ""]
        for side, per_t in secs["profile"].items():
            for t, workers in per_t.items():
                for title, table in workers[0]["tables"].items():
                    lines += [f"{side}, {t} thread(s): {title}", "", "```", table.strip(), "```", ""]
    if "layer7b" in secs:
        lines += ["## `qcompile eval` throughput of one Qwen2.5-7B-shaped decoder layer (4 x 512 tokens)", "",
                  "| side | threads | model | tokens/s per layer | s per 1M tokens, 28 layers | load avg |",
                  "|---|---|---|---|---|---|"]
        for side, per_t in secs["layer7b"].items():
            for t, workers in per_t.items():
                runs, loads = _merge(workers)
                tokens = workers[0]["tokens"]
                for n, v in runs.items():
                    tps = tokens / med(v)
                    lines.append(f"| {side} | {t} | {n} | {tps:.0f} | {28e6 / tps:.0f} | {loads} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
