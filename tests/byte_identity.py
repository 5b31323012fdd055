#!/usr/bin/env python3
"""Byte-identity harness: compile a fixed list of models and record a sha256 per output file and per tensor.

    python3 -m tests.byte_identity record [--set tiny|real|all] [--only SUBSTR] -o DIGESTS.json [--keep DIR]
    python3 -m tests.byte_identity compare BEFORE.json AFTER.json      # exit 1 and a list when they differ

A refactoring that promises "behaviour and artifacts unchanged" records the digests on main first and
compares after each step. Both lists run through `qcompiler.cli.main` (the user's command line, in-process).

- tiny (TINY_CASES, 23 pipelines x 3 architectures, several minutes on 2 cores): the random Llama / Qwen2 /
  Qwen3 checkpoints of tests/helpers.py (seed 0) x every scheme, smooth, awq, gptq, sparse (+w8a8s on ascend310p,
  +w16a16s), simulate_tp, kv8, fa3, fallback, mixed schemes and the onnx target, calibrated on 4 x 32 tokens of tests/helpers.TEXT.
- real (REAL_CASES): SmolLM2-135M (llama architecture) w8a8; smooth,w8a8d,kv8; awq,gptq,w4a16 at 16 x 512
  tokens of ../shared/data/calib/wiki_calib.jsonl. Run it under the global lock:
  `flock /tmp/qc-heavy.lock nice -n 5 python3 -m tests.byte_identity record --set real -o FILE`.

What is hashed, per case (keys of the digest dict):
  `file:<path>`               every file of OUT except the report (it holds wall times and paths); a JSON
                              file that holds wall times (`seconds`, `*_seconds`) is hashed without them
  `tensor:<path>:<name>`      every tensor of every *.safetensors (dtype, shape and raw bytes), so a
                              difference names the tensor even when only a file's layout changed
  `loaded:<head|layerN>/<name>`  every tensor of the executable graph as this checkout's reader loads it
                              (head + each layer's state), whatever the file layout (format v2 keeps them in
                              executable/, v3 reads them from the artifact)
  `report:<field>`            the report fields that are facts of the result: model_quant_type, passes,
                              per-layer Linear types, fallback choices
Digests depend on the float math of the machine (the tiny checkpoints are drawn by torch's CPU RNG; GEMM
reductions, MKL code paths): compare recordings made on one machine with one torch. See
tests/test_byte_identity.py for what the test suite checks.
"""
import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import SHARED, make_tiny_model, write_calib_file  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3")
TINY_CALIB = ["--calib-samples", "4", "--seq-len", "32"]
#: (case name, passes, extra command-line flags), compiled for every tiny architecture
TINY_PIPELINES = (
    ("w8a8", "w8a8", []),
    ("w8a8d", "w8a8d", []),
    ("w8a8mix", "w8a8mix", []),
    ("w8a16", "w8a16", []),
    ("w8a16-g32", "w8a16:group=32", []),
    ("w4a16", "w4a16", []),
    ("w4a8d", "w4a8d", []),
    ("w8a8-mse-pct", "w8a8:weight_observer=mse:act_observer=percentile", []),
    ("mixed", r"w8a16:match=mlp\.down_proj,w8a8", []),
    ("exclude", "w8a8d", ["--exclude", r"mlp\.down_proj"]),
    ("smooth-w8a8", "smooth,w8a8", []),
    ("smooth-w8a8d-kv8", "smooth,w8a8d,kv8", []),
    ("awq-gptq-w4a16", "awq,gptq,w4a16", []),
    ("gptq-w8a8d", "gptq,w8a8d", []),
    ("sparse", "sparse:ratio=0.5", []),
    ("sparse-w8a8s-310p", "sparse:ratio=0.5,w8a8s", ["--target", "ascend310p", "--dtype", "float16"]),
    ("sparse-w16a16s", "sparse:ratio=0.5,w16a16s", []),
    ("w8a8d-tp2", "w8a8d,simulate_tp:size=2", []),
    ("w8a8-310p", "w8a8", ["--target", "ascend310p", "--dtype", "float16"]),
    ("w8a8-kv8", "w8a8,kv8", []),
    ("w8a8d-fa3", "w8a8d,fa3", []),
    ("fallback", "w8a8,fallback:level=2", []),
    ("onnx-w8a8d", "w8a8d", ["--target", "onnx"]),
)
#: (arch, case name) -> passes used instead: Qwen2's q/k/v carry a bias, and no engine adds a W4A8_DYNAMIC
#: Linear's bias (engine_check refuses it before work), so on qwen2 attention takes w8a8d and the MLP w4a8d
ARCH_PIPELINES = {("qwen2", "w4a8d"): r"w8a8d:match=self_attn\.,w4a8d"}
TINY_CASES = tuple((f"{arch}/{name}", arch, ARCH_PIPELINES.get((arch, name), passes), flags)
                   for arch in ARCHS for name, passes, flags in TINY_PIPELINES)

REAL_CALIB = ["--calib-samples", "16", "--seq-len", "512"]
REAL_CASES = (("smollm2/w8a8", "smollm2", "w8a8", []),
              ("smollm2/smooth-w8a8d-kv8", "smollm2", "smooth,w8a8d,kv8", []),
              ("smollm2/awq-gptq-w4a16", "smollm2", "awq,gptq,w4a16", []))

#: report fields that describe the result (not the run): hashed as `report:<field>`
REPORT_FIELDS = ("model_quant_type", "passes", "dtype", "target", "fallback")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_digest(t) -> str:
    import torch
    raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return _sha(f"{t.dtype}{list(t.shape)}".encode() + raw)


def digest_out(out: Path) -> dict[str, str]:
    """{key: sha256} of a compiled OUT (keys: see the module docstring)."""
    from safetensors import safe_open
    digests = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel.startswith("qcompile_report."):
            continue
        data = path.read_bytes()
        if path.suffix == ".json":  # wall times written beside the result (onnx_model.json: export_seconds)
            doc = json.loads(data)
            if _without_times(doc) != doc:
                data = json.dumps(_without_times(doc), sort_keys=True).encode()
        digests[f"file:{rel}"] = _sha(data)
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    digests[f"tensor:{rel}:{name}"] = _tensor_digest(f.get_tensor(name))
    digests.update(_loaded_digests(out))
    report = json.loads((out / "qcompile_report.json").read_text())
    for field in REPORT_FIELDS:
        digests[f"report:{field}"] = _sha(json.dumps(_without_times(report.get(field)), sort_keys=True).encode())
    digests["report:layer_linears"] = _sha(json.dumps([layer["linears"] for layer in report["layers"]],
                                                      sort_keys=True).encode())
    return digests


#: report fields of one run, not of the result (besides wall times): they differ between two equal compiles
RUN_FIELDS = ("peak_rss_mib", "resumed_at_layer")


def compile_differences(a: Path, b: Path) -> list[str]:
    """What differs between two compiled OUT folders: every file byte for byte (reports aside), and the
    report JSON without wall times and RUN_FIELDS. [] when they are the same compile."""
    def files(out):
        return {p.relative_to(out).as_posix(): _sha(p.read_bytes()) if p.is_file() else "symlink"
                for p in sorted(out.rglob("*")) if (p.is_file() or p.is_symlink())
                and not p.name.startswith("qcompile_report.")}

    def report(out):
        r = json.loads((out / "qcompile_report.json").read_text())
        return _without_times({k: v for k, v in r.items() if k not in RUN_FIELDS})
    fa, fb = files(a), files(b)
    diff = [f"file {n}: {'differs' if n in fa and n in fb else 'only in ' + str(a if n in fa else b)}"
            for n in sorted(set(fa) | set(fb)) if fa.get(n) != fb.get(n)]
    ra, rb = report(a), report(b)
    diff += [f"report {k} differs" for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)]
    return diff


def _without_times(obj):
    """`obj` without wall-time entries (keys `seconds` / `*_seconds`), which differ between runs."""
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items() if not (k == "seconds" or k.endswith("_seconds"))}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


def _loaded_digests(out: Path) -> dict[str, str]:
    from qcompiler.runtime import load_model
    model = load_model(out, runtime="executable")
    head = model.head
    found = {f"loaded:head/{k}": _tensor_digest(getattr(head, k))
             for k in ("embed_weight", "norm_weight", "lm_head_weight", "inv_freq")}
    for i in range(model.layers.num_layers):
        found.update({f"loaded:layer{i}/{k}": _tensor_digest(v) for k, v in model.layers.get(i).state_dict().items()})
    return found


def compile_case(model: Path, passes: str, flags: list[str], calib: Path, calib_flags: list[str],
                 out: Path) -> None:
    """One compile through the command line (in-process); raises with its stderr when it fails."""
    from qcompiler import cli
    argv = [str(model), "--passes", passes, "--calib", str(calib), *calib_flags, *flags, "-o", str(out)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    if rc != 0:
        raise RuntimeError(f"qcompile {' '.join(argv)} exited {rc}: {err.getvalue()[-2000:]}")


def _real_model() -> Path:
    for folder in (Path.home() / ".cache" / "qc-models" / "smollm2-135m",):
        if (folder / "config.json").is_file():
            return folder
    from qcompiler.model_zoo import resolve_model_dir
    return resolve_model_dir("smollm2-135m")


def record(cases, work: Path, models: dict[str, Path], calib: Path, calib_flags, log=None, save=None) -> dict:
    """{case name: {key: sha256}} for `cases` [(name, model key, passes, flags)], compiled into `work`."""
    results = {}
    for name, model_key, passes, flags in cases:
        out = work / name.replace("/", "__")
        compile_case(models[model_key], passes, flags, calib, calib_flags, out)
        results[name] = digest_out(out)
        if log:
            log(f"{name}: {len(results[name])} digests")
        if save:  # after every case: a long (real-model) recording that is stopped keeps what it did
            save(results)
    return results


def record_tiny(work: Path, cases=TINY_CASES, log=None, save=None) -> dict:
    """Build the tiny checkpoints and calibration file under `work`, compile `cases`, return the digests."""
    work.mkdir(parents=True, exist_ok=True)
    models = {arch: make_tiny_model(work / "models" / arch, arch) for arch in sorted({c[1] for c in cases})}
    calib = write_calib_file(work / "calib.jsonl")
    return record(cases, work / "out", models, calib, TINY_CALIB, log, save)


def compare(before: dict, after: dict) -> list[str]:
    """Human-readable differences between two recordings (empty when byte-identical)."""
    lines = []
    for case in sorted(set(before) | set(after)):
        if case not in after or case not in before:
            lines.append(f"{case}: only in {'before' if case in before else 'after'}")
            continue
        b, a = before[case], after[case]
        changed = sorted(k for k in set(b) & set(a) if b[k] != a[k])
        gone, new = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        for label, keys in (("changed", changed), ("removed", gone), ("added", new)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                lines.append(f"{case}: {label} {shown}")
    return lines


def _select(cases, only: str | None):
    return [c for c in cases if only is None or any(part in c[0] for part in only.split(","))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.byte_identity", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record")
    r.add_argument("--set", choices=["tiny", "real", "all"], default="tiny")
    r.add_argument("--only", default=None, help="only cases whose name contains one of these (comma-separated)")
    r.add_argument("-o", "--output", type=Path, required=True)
    r.add_argument("--keep", type=Path, default=None, help="compile into this folder and keep it")
    r.add_argument("--shared", type=Path, default=SHARED, help=f"the shared folder (default {SHARED})")
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    a = p.parse_args(argv)
    if a.command == "compare":
        before, after = (json.loads(f.read_text()) for f in (a.before, a.after))
        env = [f"{k}: {before.get(k)} -> {after.get(k)}" for k in ("torch", "cpu_capability", "threads")
               if before.get(k) != after.get(k)]
        if env:
            print("note: recorded in different environments (" + "; ".join(env) + ")")
        diff = compare(before["cases"], after["cases"])
        print("\n".join(diff) if diff else f"byte-identical: {a.before} == {a.after}")
        return 1 if diff else 0
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    import torch
    done = {}

    def save(results):
        done.update(results)
        doc = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "cases": done}
        a.output.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")

    with contextlib.ExitStack() as stack:
        work = a.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qc-identity-")))
        if a.set in ("tiny", "all"):
            record_tiny(work / "tiny", _select(TINY_CASES, a.only), log, save)
        if a.set in ("real", "all"):
            calib = a.shared / "data" / "calib" / "wiki_calib.jsonl"
            record(_select(REAL_CASES, a.only), work / "real", {"smollm2": _real_model()}, calib, REAL_CALIB, log,
                   save)
    save({})
    log(f"wrote {a.output}: {len(done)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
