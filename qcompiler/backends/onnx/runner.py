"""Run an exported ONNX model (OUT/onnx) with onnxruntime's CPU provider, for `qcompile eval` / `run`.

`OrtModel` is the callable `ids [B, L] int64 -> logits [B, L, V] float32` that `model.LoadedModel.forward` holds.
The model takes whole sequences (no KV cache), like the executable graph's runtime.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...errors import QCError
from ...utf8_path import utf8_name
from .export import FORMAT, FORMAT_VERSION, META_FILE, MODEL_FILE


class OrtModel:
    """An onnxruntime CPU session of model.onnx; calling it maps token ids to float32 logits."""

    def __init__(self, folder: Path, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise QCError("running an ONNX model needs onnxruntime (pip install 'qcompiler[onnx]')") from None
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        with utf8_name(folder) as name:  # onnxruntime takes UTF-8 paths only (utf8_path.py); it reads them here
            self.session = ort.InferenceSession(f"{name}/{MODEL_FILE}", so, providers=["CPUExecutionProvider"])

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(torch.int64).contiguous().numpy()
        return torch.from_numpy(self.session.run(["logits"], {"input_ids": ids})[0])


def load_onnx_model(folder: Path, trust_remote_code: bool = False):
    """LoadedModel(kind="onnx") for eval / run: tokenizer from the folder (trust.py), forward = OrtModel."""
    from ... import knobs
    from ...loading import load_tokenizer
    from ...model import LoadedModel
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise QCError(f"{folder / META_FILE}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise QCError(f"{folder / META_FILE}: not a {FORMAT} v{FORMAT_VERSION} model")
    info = {"dtype": meta["compute_dtype"], "num_layers": meta["num_layers"], "model_type": meta.get("model_type"),
            "vocab_size": meta.get("vocab_size")}
    return LoadedModel(head=None, layers=None, tokenizer=load_tokenizer(folder, trust_remote_code), kind="onnx",
                       info=info, forward=OrtModel(folder, knobs.threads()))
