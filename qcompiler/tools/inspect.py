"""`qcompile inspect`: the readable graph of one decoder layer, with per-node quantization specs.

For an HF folder / alias: the layer as captured (before any pass). For a compiled OUT: the lowered
executable layer (fused qc.* ops and their tensors) plus the artifact description's types for that layer.
"""
import json

import torch

from ..errors import QCError
from ..ir.capture import LayerInputs
from ..runtime import load_model
from .graph_text import graph_text


def inspect_layer(path: str, layer: int, trust_remote_code: bool = False) -> str:
    model = load_model(path, trust_remote_code=trust_remote_code)
    n = model.layers.num_layers
    if not 0 <= layer < n:
        raise QCError(f"--layer {layer} out of range: the model has layers 0..{n - 1}")
    ids = torch.zeros(1, 4, dtype=torch.long)
    sample = LayerInputs(model.head.embed(ids), model.head.rope(4))
    gm = model.layers.get(layer, sample)
    title = f"{path}: layer {layer} ({model.kind}, {model.info.get('dtype')})"
    text = graph_text(gm, title=title)
    if model.kind == "executable":
        from pathlib import Path
        desc_path = Path(path) / "quant_model_description.json"
        if desc_path.is_file():
            desc = json.loads(desc_path.read_text())
            prefix = f"model.layers.{layer}."
            rows = [f"#   {k[len(prefix):]}: {v}" for k, v in desc.items() if k.startswith(prefix)]
            text += "\n# artifact types (quant_model_description.json)\n" + "\n".join(rows) + "\n"
    return text
