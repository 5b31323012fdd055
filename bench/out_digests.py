"""sha256 of every file a compile writes, for a fixed list of tiny compiles: is a change byte-identical?

    python3 bench/out_digests.py --checkout /tmp/qc-base --json /tmp/before.json   # older code (a snapshot)
    python3 bench/out_digests.py --json /tmp/after.json                             # this checkout
    python3 bench/out_digests.py --compare /tmp/before.json /tmp/after.json

Each compile runs `python3 -m qcompiler.cli` in the checkout (so its qcompiler is imported) on tiny random
Llama / Qwen2 / Qwen3 checkpoints (tests/conftest.py `make_tiny_model`, built once into --work) with the
test suite's calibration text, 4 x 32 tokens. Every OUT file outside `executable/` is hashed except the
report (it holds wall times). The executable graph is compared by what it computes with, whatever its file
layout (format v2 stored every tensor in its own files, v3 reads them from the artifact): the layer
programs (`program_K.json`, hashed as files) and every tensor as the checkout's own reader loads it
(`load_model(OUT)`: each layer's state and the head), hashed by dtype, shape and bytes. `--compare` lists
every entry whose digest differs, or that exists on one side only, and exits 1 if there is any.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: (architecture, --passes, extra CLI arguments)
COMPILES = [
    ("llama", "w8a8", []), ("llama", "w8a8d", []), ("llama", "w8a16", []), ("llama", "w4a16:group=32", []),
    ("llama", "w4a8d", []), ("llama", "smooth,w8a8", []), ("llama", "smooth,w8a8d,kv8", []),
    ("llama", "gptq,w4a16:group=32", []), ("llama", "awq,w4a16:group=32", []), ("llama", "w8a8,fa3", []),
    ("llama", "w8a8,fallback:level=2", []), ("llama", "w8a8mix", []),
    ("llama", "sparse:ratio=0.5,w8a8s", ["--target", "ascend310p", "--dtype", "float16"]),
    ("qwen2", "w8a8", []), ("qwen2", "smooth,gptq,w8a8", []), ("qwen2", "awq,gptq,w4a16:group=32", []),
    ("qwen3", "w8a8d", []), ("qwen3", "smooth,w8a8,kv8", []),
]
SKIP = {"qcompile_report.json", "qcompile_report.md"}

#: run in the checkout: digests of every tensor its reader loads from OUT's executable graph
LOADED = r"""
import hashlib, json, sys
from qcompiler.runtime import load_model
m = load_model(sys.argv[1], runtime="executable")
def d(t):
    t = t.detach().contiguous()
    return hashlib.sha256(str((t.dtype, tuple(t.shape))).encode() + t.view(-1).view(__import__("torch").uint8)
                          .numpy().tobytes()).hexdigest()
out = {f"executable:head/{k}": d(getattr(m.head, k)) for k in ("embed_weight", "norm_weight", "lm_head_weight",
                                                               "inv_freq")}
for i in range(m.layers.num_layers):
    out.update({f"executable:layer{i}/{k}": d(v) for k, v in m.layers.get(i).state_dict().items()})
print(json.dumps(out))
"""


def digests(folder: Path, checkout: Path) -> dict[str, str]:
    files = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in SKIP
             and (p.parent.name != "executable" and "layer_" not in p.name and p.name != "head.safetensors")}
    res = subprocess.run([sys.executable, "-c", LOADED, str(folder)], cwd=checkout, capture_output=True, text=True,
                         env=dict(os.environ, QC_NO_PROGRESS="1"))
    if res.returncode:
        raise RuntimeError(f"loading {folder}: {res.stderr.strip().splitlines()[-1:]}")
    files.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return files


def run_all(checkout: Path, work: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.helpers import TEXT, make_tiny_model
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps({"inputs_pretokenized": TEXT[i * 200:(i + 1) * 200]}) + "\n"
                             for i in range(10)))
    models = {}
    for arch in sorted({a for a, _, _ in COMPILES}):
        models[arch] = work / f"tiny-{arch}"
        if not (models[arch] / "config.json").is_file():
            make_tiny_model(models[arch], arch)
    result = {}
    for arch, passes, extra in COMPILES:
        key = f"{arch} {passes} {' '.join(extra)}".strip()
        out = work / f"out-{len(result)}"
        cmd = [sys.executable, "-m", "qcompiler.cli", str(models[arch]), "--passes", passes, "--calib", str(calib),
               "--calib-samples", "4", "--seq-len", "32", "-o", str(out), "--force"] + extra
        res = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True,
                             env=dict(os.environ, QC_NO_PROGRESS="1"))
        if res.returncode:
            result[key] = {"error": res.stderr.strip().splitlines()[-1:]}
        else:
            result[key] = digests(out, checkout)
        print(f"{key}: {'error' if res.returncode else f'{len(result[key])} files'}", file=sys.stderr, flush=True)
    return result


def compare(a: dict, b: dict) -> list[str]:
    diffs = []
    for key in sorted(set(a) | set(b)):
        da, db = a.get(key, {}), b.get(key, {})
        for f in sorted(set(da) | set(db)):
            if da.get(f) != db.get(f):
                diffs.append(f"{key}: {f} ({'differs' if f in da and f in db else 'only on one side'})")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", default=str(ROOT))
    p.add_argument("--work", default="/tmp/qc-out-digests")
    p.add_argument("--json", help="write the digests here")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = p.parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(x).read_text()) for x in args.compare)
        diffs = compare(a, b)
        print("\n".join(diffs) if diffs else f"identical: {sum(len(v) for v in a.values())} files in {len(a)} compiles")
        return 1 if diffs else 0
    result = run_all(Path(args.checkout), Path(args.work))
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
