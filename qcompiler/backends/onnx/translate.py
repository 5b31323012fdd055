"""onnxscript translations of the `qc::*` ops for `torch.onnx.export(dynamo=True)`: placeholders.

Each `qc::<op>` becomes one node `<op>` in the ONNX domain `qc` with the same inputs (an absent
optional input is the empty name) and its int arguments as attributes. The real ONNX ops are chosen
afterwards by `lower.py`, which sees the weights' values (int4 repacking for MatMulNBits, the int64
`deq_scale` encoding, zero offsets) that a translation function, tracing symbolic values, cannot.
"""
from __future__ import annotations

import onnxscript
import torch

DOMAIN = "qc"


def _register_schemas() -> None:
    """ONNX schemas for the placeholder ops (onnxscript's tracer needs one per op it emits)."""
    from onnx.defs import OpSchema, has
    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    opt = OpSchema.FormalParameterOption.Optional
    any_t = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(int8)", "tensor(int32)", "tensor(int64)"]
    INT = OpSchema.AttrType.INT
    I8, F32 = "tensor(int8)", "tensor(float)"  # the exported model computes in float32 (prepare.py)
    specs = {  # name: (inputs, outputs as (name, type), int attributes)
        "quantize": (["x", "input_scale", "input_offset"], [("y", I8)], []),
        "quant_matmul": (["x", "weight", "deq_scale", "quant_bias"], [("y", F32)], []),
        "dynamic_quant": (["x"], [("y", I8), ("scale", F32)], []),
        "quant_matmul_pertoken": (["x", "weight", "weight_scale", "pertoken_scale", "bias?"], [("y", F32)],
                                  ["packing"]),
        "quant_matmul_pergroup": (["x", "weight", "weight_scale", "weight_scale_second", "pertoken_scale"],
                                  [("y", F32)], ["group_size"]),
        "weight_quant_matmul": (["x", "weight", "antiquant_scale", "antiquant_offset", "bias?"], [("y", F32)],
                                ["group_size", "packing"]),
        "kv_quant": (["x", "scale"], [("y", I8)], ["head_dim"]),
        "kv_dequant": (["q", "scale"], [("y", F32)], ["head_dim"]),
        "fa_quant": (["x", "scale"], [("y", I8)], []),
        "fa_dequant": (["q", "scale"], [("y", F32)], []),
    }
    for name, (ins, outs, attrs) in specs.items():
        if has(name, DOMAIN):
            continue
        # inputs are typed per position (T0, T1, ...) so that any mix of dtypes traces
        inputs = [P(i.rstrip("?"), f"T{j}", "", param_option=opt) if i.endswith("?") else P(i, f"T{j}", "")
                  for j, i in enumerate(ins)]
        constraints = [(f"T{j}", any_t, "any") for j in range(len(ins))]
        OpSchema_ = OpSchema(name, DOMAIN, 1, inputs=inputs, outputs=[P(o, t, "") for o, t in outs],
                             type_constraints=constraints, attributes=[A(a, INT, "", required=True) for a in attrs])
        onnx.defs.register_schema(OpSchema_)


import onnx  # noqa: E402

_register_schemas()
QC = onnxscript.values.Opset(DOMAIN, 1)


def _quantize(x, input_scale, input_offset):
    return QC.quantize(x, input_scale, input_offset)


def _quant_matmul(x, weight, deq_scale, quant_bias, output_dtype):
    return QC.quant_matmul(x, weight, deq_scale, quant_bias)


def _dynamic_quant(x):
    return QC.dynamic_quant(x, _num_outputs=2)


def _quant_matmul_pertoken(x, weight, weight_scale, pertoken_scale, bias, packing, output_dtype):
    if bias is None:
        return QC.quant_matmul_pertoken(x, weight, weight_scale, pertoken_scale, packing=packing)
    return QC.quant_matmul_pertoken(x, weight, weight_scale, pertoken_scale, bias, packing=packing)


def _quant_matmul_pergroup(x, weight, weight_scale, weight_scale_second, pertoken_scale, group_size, output_dtype):
    return QC.quant_matmul_pergroup(x, weight, weight_scale, weight_scale_second, pertoken_scale,
                                    group_size=group_size)


def _weight_quant_matmul(x, weight, antiquant_scale, antiquant_offset, bias, group_size, packing):
    if bias is None:
        return QC.weight_quant_matmul(x, weight, antiquant_scale, antiquant_offset,
                                      group_size=group_size, packing=packing)
    return QC.weight_quant_matmul(x, weight, antiquant_scale, antiquant_offset, bias,
                                  group_size=group_size, packing=packing)


def _head_dim(x) -> int:
    d = x.shape[-1] if x.shape is not None else None
    if not isinstance(d, int):
        raise ValueError(f"KV quantization needs a static head_dim, got {d!r}")
    return d


def _kv_quant(x, scale):
    return QC.kv_quant(x, scale, head_dim=_head_dim(x))


def _kv_dequant(q, scale, dtype):
    return QC.kv_dequant(q, scale, head_dim=_head_dim(q))


def _fa_quant(x, scale):
    return QC.fa_quant(x, scale)


def _fa_dequant(q, scale, dtype):
    return QC.fa_dequant(q, scale)


def translation_table() -> dict:
    from .. import ascend  # noqa: F401  registers torch.ops.qc.* (ops + attention)
    q = torch.ops.qc
    return {
        q.quantize.default: _quantize,
        q.quant_matmul.default: _quant_matmul,
        q.dynamic_quant.default: _dynamic_quant,
        q.quant_matmul_pertoken.default: _quant_matmul_pertoken,
        q.quant_matmul_pergroup.default: _quant_matmul_pergroup,
        q.weight_quant_matmul.default: _weight_quant_matmul,
        q.kv_quant.default: _kv_quant,
        q.kv_dequant.default: _kv_dequant,
        q.fa_quant.default: _fa_quant,
        q.fa_dequant.default: _fa_dequant,
    }
