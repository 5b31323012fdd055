#!/usr/bin/env python3
"""Where `qcompile run` / `qcompile eval` spend their startup: process CPU seconds of each step, one process.

    python3 bench/run_startup_phases.py run|eval MODEL_OR_OUT [--data FILE] [--code CHECKOUT]

Steps (the commands' own code path, one thread: QC_THREADS=1 / OMP_NUM_THREADS=1 are set before torch loads):
- run: import torch; import qcompiler; load_model (head, tokenizer); encode the chat prompt; build the 30
  decode steps; prefill + first token (what `qcompile run --max-new-tokens 1` does after parsing).
- eval: import torch; import qcompiler; load_model; tokenize the windows (1 x 128 tokens of --data); build
  each prepared layer / run it (summed over layers); final norm + lm_head.
CPU time, not wall time: the machine is shared, and startup is single-threaded work, so on a quiet machine
the wall time is about the CPU time. `--code` measures another checkout's qcompiler (e.g. main) the same
way (default: this checkout's).
No lock is taken (one process, one thread, a few seconds).
"""
import os
import sys
import time
from pathlib import Path

PROMPT = "What is quantization? Explain it to a software engineer."


def main() -> int:
    args = sys.argv[1:]
    code = None
    if "--code" in args:
        i = args.index("--code")
        code = args[i + 1]
        del args[i:i + 2]
    data = None
    if "--data" in args:
        i = args.index("--data")
        data = args[i + 1]
        del args[i:i + 2]
    if len(args) != 2 or args[0] not in ("run", "eval"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    command, target = args
    sys.path.insert(0, code or str(Path(__file__).resolve().parents[1]))  # this checkout's qcompiler by default
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("QC_NO_PROGRESS", "1")
    last = [time.process_time()]
    rows = []

    def mark(name, seconds=None):
        now = time.process_time()
        rows.append((name, now - last[0] if seconds is None else seconds))
        last[0] = now

    import torch
    torch.set_num_threads(1)
    mark("import torch")
    from qcompiler.ir.capture import LayerInputs
    from qcompiler.runtime import load_model
    try:
        from qcompiler.model import run_layer_batched
    except ImportError:  # checkouts before the runtime / model split
        from qcompiler.runtime import run_layer_batched
    mark("import qcompiler")
    m = load_model(target)
    mark("load_model (head, tokenizer)")
    if command == "run":
        from qcompiler.generate import KVCache, decode_layers, encode_prompt, forward_cached
        ids = encode_prompt(m.tokenizer, PROMPT, raw=False)
        mark("encode the chat prompt")
        sample = LayerInputs(m.head.embed(torch.tensor([ids + ids[:1]]))[:, :len(ids)], m.head.rope(len(ids)))
        layers = decode_layers(m, sample)
        mark(f"build {len(layers)} decode steps")
        cache = KVCache([spec for _, spec in layers], 1, len(ids) + 1)
        with torch.inference_mode():
            h = forward_cached(m, layers, cache, torch.tensor([ids]))
            int(m.head.logits(h[:, -1:]).argmax(-1))
        mark("prefill + first token")
    else:
        from qcompiler.calib_data import make_windows, read_texts
        windows = make_windows(m.tokenizer, read_texts(data), 128, 1)
        mark("tokenize 1 x 128 tokens")
        pe, h = m.head.rope(128), m.head.embed(windows)
        build = run = 0.0
        for i in range(m.layers.num_layers):
            c = time.process_time()
            layer = m.layers.get(i, LayerInputs(h[:1], pe), prepared=True)
            build += time.process_time() - c
            c = time.process_time()
            h = run_layer_batched(layer, h, pe, 1)
            run += time.process_time() - c
        mark(f"build {m.layers.num_layers} prepared layers", build)
        mark(f"run {m.layers.num_layers} layers", run)
        last[0] = time.process_time()
        with torch.inference_mode():
            m.head.logits(h).float()
        mark("final norm + lm_head")
    total = time.process_time()
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")
    print(f"| total (process CPU) | {total:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
