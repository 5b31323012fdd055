"""Cross-check: the executable graph (Ascend kernel emulation) vs the ONNX model under onnxruntime.

    python -m qcompiler.backends.onnx.crosscheck OUT --data FILE.jsonl [--seq-len 512] [--max-windows N]
                                                 [--onnx-dir DIR] [--json]

Same compiled OUT, same windows (evaluate.py's convention), both runtimes: max / mean absolute logit
difference, top-1 agreement and the perplexity of each. OUT/onnx (or --onnx-dir) is exported first when
missing (so this also turns any compiled OUT into an ONNX model); `check_onnx_dir` says what that folder may be.

Expected differences beyond float noise (documented in lower.py): the executable graph rounds every
activation and weight-only matmul result to the model dtype (bf16 / fp16) as the NPU does, the ONNX
model stays in float32; a value that lands within rounding distance of an int8 quantization boundary
(dynamic or static activation quantization, KV int8) can take the neighbouring code in one runtime.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import QCError, require_file

LOGIT_WINDOWS = 4


def check_onnx_dir(onnx_dir: Path, out_dir: Path, data_path: Path, option: str) -> None:
    """Before an export into `onnx_dir` (rule 1: written, and replaced, only where it is named): QCError naming
    `option` when it is a symbolic link (outdir.symlink_on_path), is or contains the compiled OUT, lies inside it
    anywhere but OUT/onnx, contains the --data file, or exists and is neither empty nor an ONNX export (no
    onnx_model.json): an export replaces the folder as a whole. Paths compared resolved."""
    from ...outdir import resolved, symlink_on_path
    from .export import META_FILE, ONNX_DIR
    why = symlink_on_path(onnx_dir)
    if why:
        raise QCError(f"{option} {onnx_dir} {why}: give the folder itself")
    where, out = resolved(onnx_dir), resolved(out_dir)
    if where == out or where in out.parents:
        raise QCError(f"{option} {onnx_dir} is or contains the compiled OUT {out_dir}; choose another {option}")
    if where.is_relative_to(out) and where != out / ONNX_DIR:
        raise QCError(f"{option} {onnx_dir} lies inside the compiled OUT {out_dir} (only {out_dir / ONNX_DIR} may be "
                      f"written there); choose another {option}")
    if resolved(data_path).is_relative_to(where):
        raise QCError(f"{option} {onnx_dir} contains the --data file {data_path}; choose another {option}")
    if where.exists() and not (where.is_dir() and (not any(where.iterdir()) or (where / META_FILE).is_file())):
        raise QCError(f"{option} {onnx_dir} exists and is not an ONNX export (no {META_FILE}): an export replaces "
                      f"the folder as a whole, so only an empty folder or an earlier export; choose another {option}")


def crosscheck(out_dir: Path, data_path: Path, seq_len: int = 512, max_windows: int | None = None,
               log=None, onnx_dir: Path | None = None) -> dict:
    """Both runtimes on the same windows; `onnx_dir` defaults to OUT/onnx (exported when missing)."""
    from ...calib_data import make_windows, read_texts
    from ...ir.capture import LayerInputs
    from ...executable import load_compiled_model
    from ...model import auto_batch_size, run_layer_batched
    from .export import export_onnx
    from .runtime_hook import _onnx_folder, pick_onnx
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out_dir = Path(out_dir)
    option = "--onnx-dir" if onnx_dir is not None else "OUT/onnx"
    onnx_dir = Path(onnx_dir) if onnx_dir is not None else out_dir / "onnx"
    if _onnx_folder(onnx_dir) != onnx_dir:
        check_onnx_dir(onnx_dir, out_dir, data_path, option)
        log(f"{onnx_dir} missing: exporting")
        export_onnx(out_dir, dest=onnx_dir, log=log)
    exe = load_compiled_model(out_dir)
    onx = pick_onnx(onnx_dir, None, "onnx")
    windows = make_windows(exe.tokenizer, read_texts(data_path, "--data"), seq_len, max_windows)
    head = exe.head
    pe = head.rope(windows.shape[1])
    with torch.inference_mode():
        hidden = head.embed(windows)
        for i in range(exe.layers.num_layers):
            layer = exe.layers.get(i, LayerInputs(hidden[:1], pe))
            hidden = run_layer_batched(layer, hidden, pe, auto_batch_size(windows.shape[1]))
            del layer
        nll = {"executable": 0.0, "onnx": 0.0}
        max_diff = sum_diff = max_logit = 0.0
        agree = count = 0
        for start in range(0, windows.shape[0], LOGIT_WINDOWS):
            ids = windows[start:start + LOGIT_WINDOWS]
            lx = head.logits(hidden[start:start + LOGIT_WINDOWS]).float()
            lo = onx.forward(ids).float()
            d = (lx - lo).abs()
            max_diff, sum_diff = max(max_diff, d.max().item()), sum_diff + d.double().sum().item()
            max_logit = max(max_logit, lx.abs().max().item())
            agree += (lx.argmax(-1) == lo.argmax(-1)).sum().item()
            target = ids[:, 1:].reshape(-1)
            for name, lg in (("executable", lx), ("onnx", lo)):
                nll[name] += F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), target, reduction="sum").item()
            count += target.numel()
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    n_logits = windows.numel() * lx.shape[-1]
    return {"out": str(out_dir), "data": str(data_path), "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "tokens": count, "ppl_executable": ppl["executable"], "ppl_onnx": ppl["onnx"],
            "ppl_rel_diff": abs(ppl["onnx"] - ppl["executable"]) / ppl["executable"],
            "max_abs_logit_diff": max_diff, "mean_abs_logit_diff": sum_diff / n_logits,
            "max_abs_logit": max_logit, "top1_agreement": agree / windows.numel(),
            "executable_dtype": exe.info.get("dtype"), "onnx_compute_dtype": onx.info.get("dtype")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qcompiler.backends.onnx.crosscheck",
                                description="Executable graph (Ascend emulation) vs onnxruntime on one compiled OUT.")
    p.add_argument("out", type=Path, help="compiled OUT folder (OUT/onnx is exported when missing)")
    p.add_argument("--data", type=Path, required=True, help=".jsonl or .txt evaluation text")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--onnx-dir", type=Path, default=None, help="ONNX model folder (default OUT/onnx)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        require_file("--data", a.data)
        r = crosscheck(a.out, a.data, a.seq_len, a.max_windows, onnx_dir=a.onnx_dir)
    except QCError as e:
        print(f"crosscheck: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{a.out}: ppl executable {r['ppl_executable']:.4f} ({r['executable_dtype']}) vs onnxruntime "
              f"{r['ppl_onnx']:.4f} ({r['onnx_compute_dtype']}), rel diff {100 * r['ppl_rel_diff']:.3f}%; "
              f"max |logit diff| {r['max_abs_logit_diff']:.4g} (max |logit| {r['max_abs_logit']:.3g}), mean "
              f"{r['mean_abs_logit_diff']:.3g}, top-1 agreement {100 * r['top1_agreement']:.2f}% over {r['tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
