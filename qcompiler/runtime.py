"""Running models: `load_model` picks how a folder runs for `qcompile eval` / `run` / `inspect`.

- an ONNX model (an onnx folder, or an OUT compiled with --target onnx): onnxruntime (backends/onnx/runner.py);
- a compiled OUT folder: its executable graph (executable.py `load_compiled_model`, kind "executable");
- an HF checkpoint folder or alias: its float layers captured as the compiler captures them (model.py
  `load_float_model`, kind "float"), so float and quantized numbers come from one code path.
What a loaded model is (`Head`, `LoadedModel`, batching helpers): model.py. This module sits above executable.py,
model.py and the backends' loaders; none of them imports it.
Nothing is run from a model folder or an OUT folder (trust.py): `trust_remote_code` is the user's
--trust-remote-code, which never executes code.
"""
from pathlib import Path

from .model import LoadedModel


def load_model(path: str | Path, dtype: str | None = None, runtime: str = "auto",
               trust_remote_code: bool = False) -> LoadedModel:
    """An OUT folder (its executable graph) or an HF folder / alias (float, captured) for eval and run.

    `runtime`: "executable", "onnx" (OUT/onnx or an onnx folder, run by onnxruntime) or "auto" (onnx for
    an onnx folder or an OUT compiled with --target onnx, else the executable graph).
    `trust_remote_code`: --trust-remote-code (trust.py; never executes anything)."""
    from .executable import is_compiled, load_compiled_model
    from .model import load_float_model
    from .model_zoo import resolve_model_dir
    path = Path(path) if Path(path).is_dir() else resolve_model_dir(str(path))
    if runtime != "executable":
        from .backends.onnx.runtime_hook import pick_onnx
        onnx_model = pick_onnx(path, dtype, runtime, trust_remote_code)
        if onnx_model is not None:
            return onnx_model
    if is_compiled(path):
        return load_compiled_model(path, dtype, trust_remote_code)
    return load_float_model(path, dtype, trust_remote_code)
