"""Export a compiled OUT folder's executable graph to one ONNX model run by onnxruntime.

    export_onnx(OUT) -> OUT/onnx/{model.onnx, model.onnx.data, onnx_model.json, tokenizer files}

Route (chosen because it keeps the graph the compiler produced as the single source of truth: every
pass that rewrites aten ops, e.g. smoothing folded into norms or a norm bias, exports with no ONNX
code here): each decoder layer's program (executable.py) is loaded with its tensors, converted to float32
(`prepare.py`), wrapped with the head into one `WholeModel`, exported by `torch.onnx.export(dynamo=True)`
with the `qc::*` ops as placeholders (`translate.py`), and the placeholders are lowered to standard
ONNX / com.microsoft ops with the weights' values at hand (`lower.py`). The alternative, a hand-built
graph from the artifact tensors, would have to re-implement every architecture and pass in ONNX.

Model contract: input `input_ids` int64 [batch, seq]; output `logits` float32 [batch, seq, vocab];
positions 0..seq-1, causal, no KV cache. Computes in float32 (ORT's CPU provider has no bfloat16
kernels for these ops); the integer parts of W8A8/W8A8_DYNAMIC matmuls are exact (MatMulInteger).
Weights are stored as external data (`model.onnx.data`) so model.onnx stays small. The folder is written as
`.NAME.tmp-PID` beside it and renamed into place; paths that are not valid UTF-8 reach onnx through
utf8_path.utf8_name.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
import time
from pathlib import Path

import torch

from ...errors import QCError
from ...utf8_path import utf8_name

ONNX_DIR = "onnx"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "onnx_model.json"
FORMAT = "qcompiler-onnx"
FORMAT_VERSION = 1
OPSET = 20
#: ONNX IR version written (onnxruntime 1.31 reads up to 13; the exporter may write newer)
IR_VERSION = 10
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "chat_template*",
                      "config.json")


def check_available() -> None:
    """QCError unless the packages the ONNX backend needs import (the `onnx` extra)."""
    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise QCError(f"--target onnx needs {', '.join(missing)} (pip install 'qcompiler[onnx]')")


def build_whole_model(out_dir: Path):
    """(WholeModel in float32, executable model.json) of a compiled OUT folder."""
    from ...executable import EXECUTABLE_DIR, MODEL_FILE, ExecutableLayers, load_head, read_info
    from .prepare import WholeModel, float32_layer
    folder = Path(out_dir) / EXECUTABLE_DIR
    if not (folder / MODEL_FILE).is_file():
        raise QCError(f"{out_dir}: no executable graph ({folder / MODEL_FILE} is missing); compile it first")
    info = read_info(folder)
    head = load_head(folder, info)
    layers = ExecutableLayers(folder, info)
    modules = [float32_layer(layers.get(i)) for i in range(layers.num_layers)]
    return WholeModel(head, modules, bool(info["tie_word_embeddings"])).eval(), info


def build_float_model(model_dir):
    """(WholeModel in float32, info) of a float HF checkpoint (folder or alias), through the same captured
    layers as `qcompile eval MODEL_DIR`: the unquantized reference for benchmarks."""
    from ...ir.capture import LayerInputs
    from ...model import load_float_model
    from ...model_zoo import resolve_model_dir
    from .prepare import WholeModel, float32_layer
    m = load_float_model(Path(model_dir) if Path(model_dir).is_dir() else resolve_model_dir(str(model_dir)))
    sample = LayerInputs(m.head.embed(torch.zeros(2, 8, dtype=torch.long)), m.head.rope(8))
    modules = [float32_layer(m.layers.get(i, sample)) for i in range(m.layers.num_layers)]
    ckpt = m.layers.ckpt
    info = {"num_layers": ckpt.num_layers, "vocab_size": ckpt.config["vocab_size"], "dtype": m.info["dtype"],
            "model_type": ckpt.model_type, "architecture": ckpt.architecture, "passes": [], "target": None,
            "tie_word_embeddings": ckpt.tie_word_embeddings}
    # no .eval(): exported layer modules refuse train(); nothing here depends on the mode
    return WholeModel(m.head, modules, ckpt.tie_word_embeddings), info, Path(ckpt.path)


def export_onnx(out_dir: Path, dest: Path | None = None, log=None) -> dict:
    """Write OUT/onnx (or `dest`) from OUT's executable graph; returns the metadata (onnx_model.json)."""
    out_dir = Path(out_dir)
    model, info = build_whole_model(out_dir)
    return export_model(model, info, Path(dest) if dest is not None else out_dir / ONNX_DIR, out_dir, log)


def export_model(model, info: dict, dest: Path, files_from: Path, log=None) -> dict:
    """Export a WholeModel to dest/model.onnx (+ data, tokenizer files copied from `files_from`)."""
    import onnx

    from .lower import lower_qc_nodes
    from .translate import translation_table
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    ids = torch.randint(0, int(info["vocab_size"]), (2, 16))
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    log(f"exporting {info['num_layers']} layers to ONNX (torch.onnx dynamo exporter)")
    # The exporter prints progress lines on stdout and logs/warns about things that do not concern us
    # (torchvision ops it skips, deprecations): keep qcompile's output clean.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (ids,), dynamo=True, custom_translation_table=translation_table(),
                                        dynamic_shapes=(dims,), input_names=["input_ids"], output_names=["logits"],
                                        opset_version=OPSET, optimize=True, verbose=False)
    finally:
        quiet.setLevel(level)
    proto = program.model_proto
    del program, model
    stats = lower_qc_nodes(proto, info["dtype"])
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    for node in proto.graph.node:  # exporter debug metadata (stack traces): large and not needed
        del node.metadata_props[:]
    # Built aside and renamed into place (rule 3): an export stopped half way never reads as an ONNX model.
    # Replacing an existing `dest` is the caller's decision (crosscheck.check_onnx_dir: only its own export).
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # a dead process had our pid
    tmp.mkdir()
    try:
        with utf8_name(tmp) as folder:  # onnx's external-data writer takes UTF-8 paths only (utf8_path.py)
            onnx.save_model(proto, f"{folder}/{MODEL_FILE}", save_as_external_data=True,
                            all_tensors_to_one_file=True, location=DATA_FILE, size_threshold=1024)
        for pattern in TOKENIZER_PATTERNS:
            for f in sorted(Path(files_from).glob(pattern)):
                if f.is_file():
                    shutil.copyfile(f, tmp / f.name)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "model_file": MODEL_FILE, "opset": OPSET,
                "compute_dtype": "float32", "source_dtype": info["dtype"], "source_target": info.get("target"),
                "architecture": info.get("architecture"), "model_type": info.get("model_type"),
                "num_layers": info["num_layers"], "vocab_size": info["vocab_size"], "passes": info.get("passes"),
                "lowered_ops": stats, "inputs": {"input_ids": "int64 [batch, seq]"},
                "outputs": {"logits": "float32 [batch, seq, vocab]"},
                "export_seconds": round(time.perf_counter() - t0, 1)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
