"""`qcompile inspect`: the readable graph of one decoder layer, and for a compiled OUT what each Linear is.

For an HF folder / alias: the layer as captured (before any pass). For a compiled OUT (any target: an
OUT built with `--target onnx` holds the same executable graph beside OUT/onnx): the lowered executable
layer (fused qc.* ops and their tensors), preceded by one block per Linear:

    # self_attn.q_proj: W8A8 | weight int8 per-channel | activation int8 per-tensor static | kernel qc.quant_matmul
    #     weight int8[64, 64] -127..127
    #     input_scale float32[1] = 0.0123
    #     deq_scale int64[64] (float32 bits) 1.2e-05..3.4e-05

The Linear's type is the artifact's (quant_model_description.json); its spec is read off the tensors the
executable layer computes with (weight dtype, code range, scale shape: per-channel [n, 1] or per-group
[n, k/g] with the artifact's group_size; static activation = it has an input_scale); values are those
tensors' (a scale of at most 4 elements printed whole, else its range). Only JSON and safetensors are read.
"""
import json
from pathlib import Path

import torch

from ..errors import QCError
from ..ir.capture import LayerInputs
from ..runtime import load_model
from .graph_text import graph_text

DESCRIPTION = "quant_model_description.json"


def _fmt(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def _values(name: str, t: torch.Tensor) -> str:
    """`= v` / `= [a, b]` for at most 4 elements, else `min..max`; int64 deq_scale decoded (float32 bits)."""
    note = ""
    if name == "deq_scale" and t.dtype == torch.int64:
        from ..backends.ascend.encode import decode_deq_scale
        t, note = decode_deq_scale(t), " (float32 bits)"
    if t.numel() == 0:
        return f"{note} empty"
    flat = t.detach().double().flatten()
    if flat.numel() <= 4:
        shown = [f"{v:.6g}" for v in flat.tolist()]
        return f"{note} = {shown[0] if len(shown) == 1 else '[' + ', '.join(shown) + ']'}"
    return f"{note} {flat.min().item():.6g}..{flat.max().item():.6g}"


def _op_name(node) -> str:
    return getattr(getattr(node.target, "_schema", None), "name", str(node.target)).replace("::", ".")


def linear_kernels(gm: torch.fx.GraphModule) -> dict[str, tuple[str, str | None]]:
    """{linear: (kernel op, the Linear whose input_scale/offset quantize its input, or None)} from the
    lowered graph: the op that reads `<linear>.weight`, and the `qc.quantize` node feeding it (q/k/v and
    gate/up share one: engines fuse them)."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        reads = [a.target for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        weights = [t for t in reads if t.endswith(".weight")]
        if len(weights) != 1 or not _op_name(node).startswith("qc."):
            continue
        source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        owner = None
        if source is not None and _op_name(source) == "qc.quantize":
            scale = source.args[1]
            if isinstance(scale, torch.fx.Node) and scale.op == "get_attr":
                owner = scale.target.rsplit(".", 1)[0]
        found[weights[0][:-len(".weight")]] = (_op_name(node), owner)
    return found


def linear_spec(quant_type: str, tensors: dict[str, torch.Tensor], group_size: int,
                kernel: tuple[str, str | None] | None = None) -> str:
    """One line: the artifact type, then the weight and activation spec read off the Linear's tensors and
    (when given) its kernel in the lowered graph."""
    if quant_type == "FLOAT":
        return "FLOAT | weight float | activation float"
    weight = tensors.get("weight")
    scale = tensors.get("weight_scale")
    bits = 4 if quant_type.startswith("W4") else 8
    if weight is None or weight.is_floating_point():
        bits_text = f"int{bits}"
    elif bits == 4:
        bits_text = f"int4 packed in {str(weight.dtype).replace('torch.', '')}"
    else:
        low, high = int(weight.min()), int(weight.max())
        bits_text = "int8" + ("" if max(-low, high) >= 64 else f" storage, codes {low}..{high}")  # w8a8s: [-7, 7]
    if scale is None:
        gran = "per-channel (in deq_scale)"
    elif scale.dim() == 2 and scale.shape[-1] > 1:
        gran = f"per-group (group_size {group_size}, {scale.shape[-1]} groups)"
    else:
        gran = "per-channel"
    op, owner = kernel or (None, None)
    if owner is not None or "input_scale" in tensors:
        act = "activation int8 per-tensor static" + (f" (input_scale of {owner})" if owner else "")
    elif "DYNAMIC" in quant_type or op == "qc.quant_matmul_pertoken":
        act = "activation int8 per-token dynamic"
    else:
        act = "activation float"
    return f"{quant_type} | weight {bits_text} {gran} | {act}" + (f" | kernel {op}" if op else "")


def linear_table(layer: int, desc: dict, gm: torch.fx.GraphModule) -> list[str]:
    """Lines describing each Linear of `layer` (artifact type from `desc`, tensors and kernels of its
    executable graph `gm`)."""
    tensors = gm.state_dict()
    kernels = linear_kernels(gm)
    prefix = f"model.layers.{layer}."
    linears = sorted(k[len(prefix):-len(".weight")] for k in desc
                     if k.startswith(prefix) and k.endswith("_proj.weight"))
    group_size = int(desc.get("group_size") or 0)
    lines = ["Linears (type: quant_model_description.json; spec and values: the executable layer's tensors)"]
    for linear in linears:
        own = {k[len(linear) + 1:]: v for k, v in tensors.items() if k.startswith(linear + ".")}
        spec = linear_spec(desc[prefix + linear + ".weight"], own, group_size, kernels.get(linear))
        lines.append(f"  {linear}: {spec}")
        for suffix, t in sorted(own.items()):
            shown = _values(suffix, t) if (suffix != "weight" or not t.is_floating_point()) and t.numel() else ""
            lines.append(f"      {suffix} {_fmt(t)}{shown}")
    others = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in linears)}
    extra = {k: v for k, v in desc.items() if k.startswith(prefix) and not k.endswith(".weight")
             and not any(k[len(prefix):].startswith(n + ".") for n in linears)}
    if others:
        lines.append("other tensors of the layer")
        for name, t in sorted(others.items()):
            kind = desc.get(prefix + name)
            lines.append(f"  {name} {_fmt(t)}{_values(name.rsplit('.', 1)[-1], t)}" + (f"   ({kind})" if kind else ""))
    for key, kind in sorted(extra.items()):
        if key[len(prefix):] not in others:
            lines.append(f"  {key[len(prefix):]}: {kind} (artifact only)")
    return lines


def inspect_layer(path: str, layer: int, trust_remote_code: bool = False) -> str:
    model = load_model(path, runtime="executable", trust_remote_code=trust_remote_code)
    n = model.layers.num_layers
    if not 0 <= layer < n:
        raise QCError(f"--layer {layer} out of range: the model has layers 0..{n - 1}")
    ids = torch.zeros(1, 4, dtype=torch.long)
    sample = LayerInputs(model.head.embed(ids), model.head.rope(4))
    gm = model.layers.get(layer, sample)
    title = f"{path}: layer {layer} ({model.kind}, {model.info.get('dtype')})"
    header = []
    if model.kind == "executable":
        out = Path(path)
        header.append(f"target {model.info.get('target')}, passes {','.join(model.info.get('passes', []))}"
                      + ("; OUT/onnx/model.onnx beside it" if (out / "onnx" / "model.onnx").is_file() else ""))
        desc_path = out / DESCRIPTION
        if desc_path.is_file():
            try:
                desc = json.loads(desc_path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise QCError(f"{desc_path}: not JSON ({e})") from None
            if not isinstance(desc, dict):
                raise QCError(f"{desc_path}: expected a JSON object")
            header += linear_table(layer, desc, gm)
        else:
            header.append(f"({DESCRIPTION} is missing: no artifact types)")
    return graph_text(gm, title=title, header=header)
