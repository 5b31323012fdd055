"""Lower the `qc.*` placeholder nodes of an exported ONNX model to standard / com.microsoft ONNX ops.

Runs on the ModelProto that `torch.onnx.export` produced with `translate.py` (float32 activations, see
`prepare.py`), with the weights' values at hand (they are graph initializers). Mapping, per op:

| qc op | ONNX | numerics vs the Ascend kernel (ascend-artifact.md sec. 4) |
|---|---|---|
| quantize (W8A8 static) | QuantizeLinear(x, 1/recip, zp=o_x) int8 | engine: `rint(x * recip + o_x)` with `recip = dtype(1/dtype(s_x))`; ORT divides by the float32 `1/recip` instead of multiplying by `recip`: the two can differ by one ulp before rounding, so a value within an ulp of a .5 tie may round the other way (float noise) |
| quant_matmul | MatMulInteger(int8, int8) + int32 quant_bias, Cast, Mul(deq_scale) | exact integer part; the float epilogue is float32 (no rounding to the model dtype) |
| dynamic_quant (W8A8_DYNAMIC) | symmetric per-token int8 from primitives: ReduceMax(Abs) / 127 (0 -> 1), Round(x / s), Clip, Cast | same formula as npu_dynamic_quant (ONNX Round is half-to-even). Not DynamicQuantizeLinear: that is *per-tensor asymmetric uint8* (one scale and zero point for the whole tensor), a different and coarser quantizer than the NPU's per-token symmetric int8 |
| quant_matmul_pertoken | MatMulInteger + Cast + Mul(weight_scale) + Mul(pertoken_scale) (+ bias) | exact integer part, float32 epilogue in the kernel's order (weight_scale and bias are stored rounded to the model dtype) |
| quant_matmul_pergroup (W4A8_DYNAMIC) | Reshape/Transpose x to [G, M, g], batched MatMulInteger with the [G, g, n] int8 weight, Cast, Mul(two-stage scale [G, 1, n]), ReduceSum over G, Mul(pertoken_scale) | exact integer group sums; the scale is the engines' dtype(dtype(weight_scale) * dtype(weight_scale_second)); ReduceSum adds the groups in ORT's order, the kernel in group order (float32 noise) |
| weight_quant_matmul int8 (W8A16) | com.microsoft MatMulNBits (bits 8, uint8 + zero point 128) | scale rounded to the model dtype first (the NPU takes antiquant_scale in x's dtype); the dequantized weight and the matmul stay float32 (the NPU rounds them to bf16/fp16). Not DequantizeLinear + MatMul: ORT's default graph optimizer rewrites an int8 DQ feeding MatMul into a *dynamically activation-quantized* integer matmul (measured: 0.29 max error on a 64-wide dot product vs 1e-5), i.e. it silently turns W8A16 into W8A8 |
| kv_quant / kv_dequant (C8), fa_quant / fa_dequant (FAQuant) | Div, Round, Clip, Cast int8 / Cast, Mul | same formula (`clamp(round(x / s))`, `q * s`); from primitives because the scale spans two axes ([KVH, 1, D] for K/V per channel), which QuantizeLinear's per-axis form cannot express; the dequantized K/V stay float32 (the NPU rounds them to the model dtype) |
| weight_quant_matmul int4 (W4A16) | com.microsoft MatMulNBits (bits 4, uint4 + zero point 8) | same integers: signed int4 `q` is stored as `q + 8` with MatMulNBits' default zero point 8, so `(u - 8) * s = q * s`; per-channel scales are repeated per block; scales in the model dtype as for W8A16 |
| weight_quant_matmul, other (group size not a power of two >= 16, or non-zero offsets) | (Cast(w) + offset) * scale per group from primitives + MatMul | same formula; ORT folds the constant subgraph into a float32 weight at load time (4x the memory) |

Every weight-side input must be an initializer (it is in graphs the compiler lowers); otherwise QCError.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...errors import QCError
from ..ascend.int4 import unpack_int4, unpack_int4_int32
from .translate import DOMAIN

MS_DOMAIN = "com.microsoft"


def _round_to(a: np.ndarray, dtype_name: str) -> np.ndarray:
    """float32 values rounded to the model dtype (torch's rounding) and back."""
    import torch
    return torch.from_numpy(np.array(a, dtype=np.float32)).to(getattr(torch, dtype_name)).float().numpy()


class _Builder:
    def __init__(self, model: onnx.ModelProto, dtype_name: str):
        self.model, self.graph, self.dtype = model, model.graph, dtype_name
        self.inits = {t.name: t for t in self.graph.initializer}
        self.new_inits: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self.used_ms = False
        self.drop: set[str] = set()
        self.stats: dict[str, int] = {}

    def value(self, name: str, node, what: str) -> np.ndarray:
        if name not in self.inits:
            raise QCError(f"ONNX lowering: {what} of {node.op_type} ({node.name}) is not a constant weight; "
                          "expected an initializer")
        self.drop.add(name)
        return numpy_helper.to_array(self.inits[name])

    def const(self, base: str, array: np.ndarray) -> str:
        name = f"{base}"
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op, inputs, outputs, name, domain="", **attrs):
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))

    def count(self, what):
        self.stats[what] = self.stats.get(what, 0) + 1


def _int8_weight(b: _Builder, node, name: str, packing: int, n: int, k: int) -> np.ndarray:
    """int8 [n, k] from the stored packing (0 int8, 1 int4 along k, 2 int4 along n, 3 int4 in int32 along k)."""
    import torch
    w = torch.from_numpy(b.value(name, node, "weight").copy())
    if packing == 1:
        w = unpack_int4(w, dim=1, size=k)
    elif packing == 2:
        w = unpack_int4(w, dim=0, size=n)
    elif packing == 3:  # W4A16 MoE experts: int4 in int32 words along k (backends/ascend/int4.py)
        w = unpack_int4_int32(w, k)
    elif packing != 0:
        raise QCError(f"ONNX lowering: unknown weight packing {packing} in {node.name}")
    if tuple(w.shape) != (n, k):
        raise QCError(f"ONNX lowering: weight of {node.name} is {tuple(w.shape)}, expected [{n}, {k}]")
    return w.numpy()


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _lower_quantize(b: _Builder, node):
    x, s_name, o_name = node.input
    p = node.name
    s = b.value(s_name, node, "input_scale").astype(np.float32).reshape(-1)
    o = b.value(o_name, node, "input_offset").astype(np.float32).reshape(-1)
    if s.size != 1 or o.size != 1 or o[0] != np.round(o[0]) or not -128 <= o[0] <= 127:
        raise QCError(f"ONNX lowering: {node.name}: expected a per-tensor scale and an integer offset in [-128, 127]")
    recip = _round_to(1.0 / _round_to(s, b.dtype), b.dtype)  # dtype(1 / dtype(s_x)), as the engines do
    scale = b.const(f"{p}.scale", np.array(1.0 / recip[0], dtype=np.float32))
    zp = b.const(f"{p}.zero_point", np.array(int(o[0]), dtype=np.int8))
    b.node("QuantizeLinear", [x, scale, zp], [node.output[0]], p)
    b.count("QuantizeLinear")


def _matmul_integer(b: _Builder, node, x: str, w: np.ndarray) -> str:
    p = node.name
    wt = b.const(f"{p}.weight_t", w.T.astype(np.int8))
    b.node("MatMulInteger", [x, wt], [f"{p}.acc"], f"{p}.mmi")
    b.count("MatMulInteger")
    return f"{p}.acc"


def _lower_quant_matmul(b: _Builder, node):
    import torch
    from ..ascend.kernels import decode_deq_scale
    x, w_name, deq_name, qb_name = node.input
    p = node.name
    w = b.value(w_name, node, "weight")
    n, k = w.shape
    deq = decode_deq_scale(torch.from_numpy(b.value(deq_name, node, "deq_scale").copy())).numpy().reshape(n)
    qb = b.value(qb_name, node, "quant_bias").astype(np.int32).reshape(n)
    acc = _matmul_integer(b, node, x, w)
    b.node("Add", [acc, b.const(f"{p}.quant_bias", qb)], [f"{p}.acc_b"], f"{p}.add_bias")
    b.node("Cast", [f"{p}.acc_b"], [f"{p}.accf"], f"{p}.cast", to=TensorProto.FLOAT)
    b.node("Mul", [f"{p}.accf", b.const(f"{p}.deq_scale", deq.astype(np.float32))], [node.output[0]], f"{p}.deq")


def _lower_dynamic_quant(b: _Builder, node):
    x = node.input[0]
    p = node.name
    axes = b.const(f"{p}.axes", np.array([-1], dtype=np.int64))
    b.node("Abs", [x], [f"{p}.abs"], f"{p}.abs")
    b.node("ReduceMax", [f"{p}.abs", axes], [f"{p}.amax"], f"{p}.amax", keepdims=1)
    b.node("Div", [f"{p}.amax", b.const(f"{p}.c127", np.array(127, dtype=np.float32))], [f"{p}.s0"], f"{p}.s0")
    b.node("Equal", [f"{p}.s0", b.const(f"{p}.c0", np.array(0, dtype=np.float32))], [f"{p}.zero"], f"{p}.eq")
    b.node("Where", [f"{p}.zero", b.const(f"{p}.c1", np.array(1, dtype=np.float32)), f"{p}.s0"], [f"{p}.s"],
           f"{p}.where")
    b.node("Div", [x, f"{p}.s"], [f"{p}.xs"], f"{p}.div")
    b.node("Round", [f"{p}.xs"], [f"{p}.r"], f"{p}.round")
    b.node("Clip", [f"{p}.r", b.const(f"{p}.lo", np.array(-128, dtype=np.float32)),
                    b.const(f"{p}.hi", np.array(127, dtype=np.float32))], [f"{p}.c"], f"{p}.clip")
    b.node("Cast", [f"{p}.c"], [node.output[0]], f"{p}.cast", to=TensorProto.INT8)
    b.node("Squeeze", [f"{p}.s", axes], [node.output[1]], f"{p}.squeeze")
    b.count("dynamic_quant")


def _lower_pertoken(b: _Builder, node):
    x, w_name, ws_name, pts = node.input[:4]
    bias = node.input[4] if len(node.input) > 4 and node.input[4] else None
    p = node.name
    ws = b.value(ws_name, node, "weight_scale").astype(np.float32)  # stored rounded to the model dtype (encode.py)
    n = ws.shape[0]
    w = _int8_weight(b, node, w_name, int(_attr(node, "packing", 0)), n, _stored_k(b, w_name, node))
    acc = _matmul_integer(b, node, x, w)
    axes = b.const(f"{p}.axes", np.array([-1], dtype=np.int64))
    b.node("Cast", [acc], [f"{p}.accf"], f"{p}.cast", to=TensorProto.FLOAT)
    b.node("Mul", [f"{p}.accf", b.const(f"{p}.weight_scale", ws.reshape(n))], [f"{p}.y0"], f"{p}.mul_w")
    b.node("Unsqueeze", [pts, axes], [f"{p}.pts"], f"{p}.unsq")
    out = node.output[0] if bias is None else f"{p}.y1"
    b.node("Mul", [f"{p}.y0", f"{p}.pts"], [out], f"{p}.mul_t")
    if bias is not None:
        b.node("Add", [out, bias], [node.output[0]], f"{p}.add_bias")


def _lower_pergroup(b: _Builder, node):
    """W4A8_DYNAMIC: per-group int8 x int4 sums (batched MatMulInteger), scaled and summed over groups."""
    import torch

    from ..ascend.kernels import two_stage_scale
    x, w_name, ws_name, wss_name, pts = node.input[:5]
    p = node.name
    g = int(_attr(node, "group_size"))
    ws = b.value(ws_name, node, "weight_scale").astype(np.float32)
    wss = b.value(wss_name, node, "weight_scale_second").astype(np.float32)
    n, groups = wss.shape
    k = groups * g
    s = two_stage_scale(torch.from_numpy(ws), torch.from_numpy(wss), getattr(torch, b.dtype)).numpy()
    w = _int8_weight(b, node, w_name, 2, n, k)
    w3 = np.ascontiguousarray(w.reshape(n, groups, g).transpose(1, 2, 0))            # [G, g, n]
    b.node("Shape", [x], [f"{p}.xshape"], f"{p}.shape")
    b.node("Slice", [f"{p}.xshape", b.const(f"{p}.s0", np.array([0], np.int64)),
                     b.const(f"{p}.s1", np.array([-1], np.int64))], [f"{p}.lead"], f"{p}.lead")
    b.node("Reshape", [x, b.const(f"{p}.shape3", np.array([-1, groups, g], np.int64))], [f"{p}.x3"], f"{p}.rx")
    b.node("Transpose", [f"{p}.x3"], [f"{p}.xt"], f"{p}.tx", perm=[1, 0, 2])               # [G, M, g]
    b.node("MatMulInteger", [f"{p}.xt", b.const(f"{p}.W", w3)], [f"{p}.acc"], f"{p}.mmi")  # [G, M, n] int32
    b.node("Cast", [f"{p}.acc"], [f"{p}.accf"], f"{p}.cast", to=TensorProto.FLOAT)
    b.node("Mul", [f"{p}.accf", b.const(f"{p}.S", np.ascontiguousarray(s.T.reshape(groups, 1, n)))],
           [f"{p}.scaled"], f"{p}.muls")
    b.node("ReduceSum", [f"{p}.scaled", b.const(f"{p}.axis0", np.array([0], np.int64))], [f"{p}.y2"], f"{p}.sum",
           keepdims=0)
    b.node("Concat", [f"{p}.lead", b.const(f"{p}.n", np.array([n], np.int64))], [f"{p}.oshape"], f"{p}.cat", axis=0)
    b.node("Reshape", [f"{p}.y2", f"{p}.oshape"], [f"{p}.y"], f"{p}.ry")
    b.node("Unsqueeze", [pts, b.const(f"{p}.axes", np.array([-1], dtype=np.int64))], [f"{p}.pts"], f"{p}.unsq")
    b.node("Mul", [f"{p}.y", f"{p}.pts"], [node.output[0]], f"{p}.mul_t")
    b.count("MatMulInteger(per-group)")


def _stored_k(b: _Builder, w_name: str, node) -> int:
    """k of a weight: its last dim, times 2 (packing 1) or 8 (packing 3) when int4 is packed along k."""
    dims = list(b.inits[w_name].dims) if w_name in b.inits else None
    if dims is None:
        raise QCError(f"ONNX lowering: weight of {node.name} is not an initializer")
    return dims[1] * {1: 2, 3: 8}.get(int(_attr(node, "packing", 0)), 1)


def _nbits_block(k: int, group: int) -> int | None:
    """MatMulNBits block size: the group size (a power of two >= 16), or for per-channel weights a
    power of two dividing k (the scale is repeated per block, which leaves the math unchanged)."""
    if group:
        return group if group >= 16 and group & (group - 1) == 0 else None
    for bs in (128, 64, 32, 16):
        if k % bs == 0:
            return bs
    return 32  # last block zero-padded


def _lower_weight_quant(b: _Builder, node):
    x, w_name, s_name, o_name = node.input[:4]
    bias = node.input[4] if len(node.input) > 4 and node.input[4] else None
    p = node.name
    group, packing = int(_attr(node, "group_size", 0)), int(_attr(node, "packing", 0))
    scale = _round_to(b.value(s_name, node, "antiquant_scale"), b.dtype)  # the NPU takes it in x's dtype
    offset = _round_to(b.value(o_name, node, "antiquant_offset"), b.dtype)
    n = scale.shape[0]
    k = _stored_k(b, w_name, node)
    w = _int8_weight(b, node, w_name, packing, n, k)
    groups = scale.shape[1]
    g = group or k
    out = node.output[0] if bias is None else f"{p}.y0"
    bits = 4 if packing in (1, 2, 3) else 8
    block = _nbits_block(k, group)
    if block is not None and not offset.any():
        # MatMulNBits stores unsigned codes with a default zero point of 2^(bits-1): signed q -> q + 2^(bits-1)
        zp = 1 << (bits - 1)
        nb = -(-k // block)
        u = np.full((n, nb * block), zp, dtype=np.uint8)
        u[:, :k] = (w.astype(np.int16) + zp).astype(np.uint8)
        u = u.reshape(n, nb, block)
        packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else u
        scales = np.repeat(scale, nb, axis=1) if group == 0 else scale
        b.node("MatMulNBits", [x, b.const(f"{p}.B", packed), b.const(f"{p}.scales", scales.astype(np.float32).reshape(-1))],
               [out], f"{p}.nbits", domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block)
        b.used_ms = True
        b.count(f"MatMulNBits{bits}")
    else:  # per-group int8 or non-zero offsets: (w + offset) * scale per group, from primitives
        kp = groups * g
        wp = np.zeros((n, kp), dtype=np.int8)
        wp[:, :k] = w
        shape3 = b.const(f"{p}.shape3", np.array([n, groups, g], dtype=np.int64))
        shape2 = b.const(f"{p}.shape2", np.array([n, kp], dtype=np.int64))
        b.node("Reshape", [b.const(f"{p}.weight", wp), shape3], [f"{p}.w3"], f"{p}.r3")
        b.node("Cast", [f"{p}.w3"], [f"{p}.w3f"], f"{p}.castw", to=TensorProto.FLOAT)
        b.node("Add", [f"{p}.w3f", b.const(f"{p}.offset", offset.reshape(n, groups, 1).astype(np.float32))],
               [f"{p}.w3o"], f"{p}.addo")
        b.node("Mul", [f"{p}.w3o", b.const(f"{p}.scale", scale.reshape(n, groups, 1).astype(np.float32))],
               [f"{p}.w3s"], f"{p}.muls")
        b.node("Reshape", [f"{p}.w3s", shape2], [f"{p}.w2"], f"{p}.r2")
        b.node("Slice", [f"{p}.w2", b.const(f"{p}.st", np.array([0], np.int64)),
                         b.const(f"{p}.en", np.array([k], np.int64)), b.const(f"{p}.ax", np.array([1], np.int64))],
               [f"{p}.wk"], f"{p}.slice")
        b.node("Transpose", [f"{p}.wk"], [f"{p}.wt"], f"{p}.tr", perm=[1, 0])
        b.node("MatMul", [x, f"{p}.wt"], [out], f"{p}.mm")
        b.count("dequant(primitives)+MatMul")
    if bias is not None:
        b.node("Add", [out, bias], [node.output[0]], f"{p}.add_bias")


def _attn_scale(b: _Builder, node, shape_of) -> str:
    scale = b.value(node.input[1], node, "scale").astype(np.float32).reshape(-1)
    return b.const(f"{node.name}.scale", scale.reshape(shape_of(scale)))


def _kv_shape(node):
    d = int(_attr(node, "head_dim"))
    return lambda s: (s.size // d, 1, d)  # [KVH*D] -> [KVH, 1, D]: per channel of [B, KVH, L, D]


def _lower_sym_quant(b: _Builder, node, shape_of):
    """`clamp(round(x / scale), -128, 127)` int8 with a scale over two axes (QuantizeLinear takes one)."""
    p = node.name
    b.node("Div", [node.input[0], _attn_scale(b, node, shape_of)], [f"{p}.xs"], f"{p}.div")
    b.node("Round", [f"{p}.xs"], [f"{p}.r"], f"{p}.round")
    b.node("Clip", [f"{p}.r", b.const(f"{p}.lo", np.array(-128, dtype=np.float32)),
                    b.const(f"{p}.hi", np.array(127, dtype=np.float32))], [f"{p}.c"], f"{p}.clip")
    b.node("Cast", [f"{p}.c"], [node.output[0]], f"{p}.cast", to=TensorProto.INT8)


def _lower_sym_dequant(b: _Builder, node, shape_of):
    """`f32(q) * scale` (a DequantizeLinear whose scale spans two axes)."""
    p = node.name
    b.node("Cast", [node.input[0]], [f"{p}.qf"], f"{p}.cast", to=TensorProto.FLOAT)
    b.node("Mul", [f"{p}.qf", _attn_scale(b, node, shape_of)], [node.output[0]], f"{p}.mul")


LOWERINGS = {
    "kv_quant": lambda b, n: _lower_sym_quant(b, n, _kv_shape(n)),
    "kv_dequant": lambda b, n: _lower_sym_dequant(b, n, _kv_shape(n)),
    "fa_quant": lambda b, n: _lower_sym_quant(b, n, lambda s: (s.size, 1, 1)),  # [N, 1] -> [N, 1, 1] per head
    "fa_dequant": lambda b, n: _lower_sym_dequant(b, n, lambda s: (s.size, 1, 1)),
    "quantize": _lower_quantize,
    "quant_matmul": _lower_quant_matmul,
    "dynamic_quant": _lower_dynamic_quant,
    "quant_matmul_pertoken": _lower_pertoken,
    "quant_matmul_pergroup": _lower_pergroup,
    "weight_quant_matmul": _lower_weight_quant,
}


def lower_qc_nodes(model: onnx.ModelProto, dtype_name: str) -> dict[str, int]:
    """Replace every `qc.*` node in place; returns counts of what was emitted."""
    b = _Builder(model, dtype_name)
    for node in model.graph.node:
        if node.domain != DOMAIN:
            b.nodes.append(node)
            continue
        if node.op_type not in LOWERINGS:
            raise QCError(f"ONNX lowering: no lowering for qc.{node.op_type}; supported: {', '.join(LOWERINGS)}")
        LOWERINGS[node.op_type](b, node)
        b.count(f"qc.{node.op_type}")
    # Drop the original weight initializers that the lowered nodes replaced (if nothing else reads them).
    still_read = {i for n in b.nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name not in b.drop or t.name in still_read]
    del model.graph.node[:]
    model.graph.node.extend(b.nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + b.new_inits)
    opsets = [o for o in model.opset_import if o.domain != DOMAIN]
    if b.used_ms and not any(o.domain == MS_DOMAIN for o in opsets):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    # Value infos of the placeholder outputs may carry stale types; let ORT infer them.
    del model.graph.value_info[:]
    return b.stats
