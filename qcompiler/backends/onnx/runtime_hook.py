"""How `runtime.load_model` decides to run a folder with onnxruntime (kept here, out of runtime.py; nothing here
imports runtime.py).

`pick_onnx` only looks at files until it finds an ONNX model to load (onnxruntime is imported then).
"""
from __future__ import annotations

from pathlib import Path

from ...errors import QCError

from .export import META_FILE, MODEL_FILE, ONNX_DIR


def _onnx_folder(path: Path) -> Path | None:
    for folder in (path, path / ONNX_DIR):
        if (folder / MODEL_FILE).is_file() and (folder / META_FILE).is_file():
            return folder
    return None


def _compiled_for_onnx(path: Path) -> bool:
    from ...executable import compiled_target
    return compiled_target(path) == "onnx"


def pick_onnx(path: Path, dtype: str | None, runtime: str, trust_remote_code: bool = False):
    """A LoadedModel(kind="onnx") when `runtime` asks for it (or "auto" finds one), else None.
    `trust_remote_code`: --trust-remote-code for the folder's tokenizer (trust.py; never runs code)."""
    if runtime not in ("auto", "onnx"):
        raise QCError(f"--runtime {runtime!r}: expected auto, executable or onnx")
    folder = _onnx_folder(path)
    direct = folder is not None and folder == path
    if runtime == "auto" and not (direct or (folder is not None and _compiled_for_onnx(path))):
        return None
    if folder is None:
        raise QCError(f"{path}: no ONNX model (expected {path / ONNX_DIR / MODEL_FILE}); compile with "
                      "--target onnx or export one with `python -m qcompiler.backends.onnx.crosscheck`")
    if dtype:
        raise QCError("--dtype applies to float models only; an ONNX model computes in float32")
    from .runner import load_onnx_model
    return load_onnx_model(folder, trust_remote_code)
