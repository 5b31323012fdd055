"""The `qc` op vocabulary: every op the compiler writes into a graph, as `torch.ops.qc.*` (torch.library custom ops).

Target-neutral: this module defines each op's name, schema and fake (meta) kernel (output shape and dtype,
symbolic token dims included), so passes and ir/ can build, export, serialize and verify graphs calling them
without any backend. The kernels that run them come from a backend: importing `qcompiler.backends.ascend`
registers the Ascend CPU kernels (the NPU's integer math, backends/ascend/kernels.py) and the torch_npu
dispatch (backends/ascend/ops.py, attention.py). Until a backend registers its kernel, running an op raises
RuntimeError naming the op and the backend to import; fake tensors and torch.export never need one.

Linear ops (the lowered quantized Linears; arguments are the artifact's tensors as stored):

| op | schema |
|---|---|
| qc::quantize | (Tensor x, Tensor input_scale, Tensor input_offset) -> Tensor |
| qc::quant_matmul | (Tensor x, Tensor weight, Tensor deq_scale, Tensor quant_bias, ScalarType output_dtype) -> Tensor |
| qc::dynamic_quant | (Tensor x) -> (Tensor, Tensor) |
| qc::quant_matmul_pertoken | (Tensor x, Tensor weight, Tensor weight_scale, Tensor pertoken_scale, Tensor? bias, int packing, ScalarType output_dtype) -> Tensor |
| qc::quant_matmul_pergroup | (Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_scale_second, Tensor pertoken_scale, int group_size, ScalarType output_dtype) -> Tensor |
| qc::weight_quant_matmul | (Tensor x, Tensor weight, Tensor antiquant_scale, Tensor antiquant_offset, Tensor? bias, int group_size, int packing) -> Tensor |

weight [n, k] HF layout, scales [n, 1] (per-group [n, k / group]), deq_scale in its dtype-dependent encoding
(ascend-artifact.md sec. 3-4). `packing`: 0 int8 [n, k]; 1 int4 packed along k [n, ceil(k/2)]; 2 int4 packed
along n [ceil(n/2), k]; 3 (weight_quant_matmul only: W4A16 MoE experts) int4 in int32 words along k, offset-binary
[n, k/8] (backends/ascend/int4.py pack_int4_int32).

Attention ops (KV cache int8 "C8", FA3 per-head Q/K/V, decode-step attention), in the attention layout
[B, N, L, D] (N heads, L tokens, D head_dim; K after RoPE):

| op | math |
|---|---|
| qc::kv_quant(x, scale) | `clamp(round(f32(x) / scale[c]), -128, 127)` int8; scale [N*D] per channel c = n*D + d |
| qc::kv_dequant(q, scale, dtype) | `dtype(f32(q) * scale[c])` |
| qc::fa_quant(x, scale) | `clamp(round(f32(x) / scale[n]), -128, 127)` int8; scale [N, 1] per head |
| qc::fa_dequant(q, scale, dtype) | `dtype(f32(q) * scale[n])` |
| qc::cached_attention(q, k, v, k_cache, v_cache, pos, k_scale?, v_scale?, scale, dtype) | attention of the L new queries over cache[:pos] ++ the new keys/values (backends/ascend/attention.py) |
"""
from __future__ import annotations

import torch
from torch import Tensor


def _no_kernel(name: str):
    raise RuntimeError(f"qc::{name} has no kernel for this device: import the target's backend "
                       "(qcompiler.backends.ascend registers the CPU and NPU kernels)")


def _out_shape(x: Tensor, n) -> list:
    return [*x.shape[:-1], n]


# ---- Linear ops ------------------------------------------------------------------------------------------------
@torch.library.custom_op("qc::quantize", mutates_args=(),
                         schema="(Tensor x, Tensor input_scale, Tensor input_offset) -> Tensor")
def quantize(x: Tensor, input_scale: Tensor, input_offset: Tensor) -> Tensor:
    """Static per-tensor int8 activation quantization (W8A8); int8 with x's shape."""
    _no_kernel("quantize")


@quantize.register_fake
def _(x, input_scale, input_offset):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op(
    "qc::quant_matmul", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor deq_scale, Tensor quant_bias, ScalarType output_dtype) -> Tensor")
def quant_matmul(x: Tensor, weight: Tensor, deq_scale: Tensor, quant_bias: Tensor,
                 output_dtype: torch.dtype) -> Tensor:
    """W8A8 static: `dtype((x @ W^T + quant_bias) * deq_scale)`, x int8 [..., k] -> [..., n]."""
    _no_kernel("quant_matmul")


@quant_matmul.register_fake
def _(x, weight, deq_scale, quant_bias, output_dtype):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "quant_matmul: x [..., k] vs weight [n, k]")
    return x.new_empty(_out_shape(x, weight.shape[0]), dtype=output_dtype)


@torch.library.custom_op("qc::dynamic_quant", mutates_args=(), schema="(Tensor x) -> (Tensor, Tensor)")
def dynamic_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8: `(y int8 [..., k], scale float32 [...])`."""
    _no_kernel("dynamic_quant")


@dynamic_quant.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(
    "qc::quant_matmul_pertoken", mutates_args=(),
    schema=("(Tensor x, Tensor weight, Tensor weight_scale, Tensor pertoken_scale, Tensor? bias, "
            "int packing, ScalarType output_dtype) -> Tensor"))
def quant_matmul_pertoken(x: Tensor, weight: Tensor, weight_scale: Tensor, pertoken_scale: Tensor,
                          bias: Tensor | None, packing: int, output_dtype: torch.dtype) -> Tensor:
    """W8A8_DYNAMIC / W4A8_DYNAMIC: float32 `((acc * weight_scale) * pertoken_scale) + bias`, then
    `output_dtype`; weight int8 [n, k] (packing 0) or int4 along n [ceil(n/2), k] (packing 2)."""
    _no_kernel("quant_matmul_pertoken")


@quant_matmul_pertoken.register_fake
def _(x, weight, weight_scale, pertoken_scale, bias, packing, output_dtype):
    torch._check(packing in (0, 2), lambda: f"quant_matmul_pertoken: packing {packing} not in (0, 2)")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "quant_matmul_pertoken: x [..., k] vs weight")
    return x.new_empty(_out_shape(x, weight_scale.shape[0]), dtype=output_dtype)


@torch.library.custom_op(
    "qc::quant_matmul_pergroup", mutates_args=(),
    schema=("(Tensor x, Tensor weight, Tensor weight_scale, Tensor weight_scale_second, Tensor pertoken_scale, "
            "int group_size, ScalarType output_dtype) -> Tensor"))
def quant_matmul_pergroup(x: Tensor, weight: Tensor, weight_scale: Tensor, weight_scale_second: Tensor,
                          pertoken_scale: Tensor, group_size: int, output_dtype: torch.dtype) -> Tensor:
    """W4A8_DYNAMIC two-stage per-group: x int8 [..., k], weight int4 along n [n/2, k], weight_scale [n, 1],
    weight_scale_second [n, k/group_size], pertoken_scale [...] -> [..., n] in output_dtype."""
    _no_kernel("quant_matmul_pergroup")


@quant_matmul_pergroup.register_fake
def _(x, weight, weight_scale, weight_scale_second, pertoken_scale, group_size, output_dtype):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "quant_matmul_pergroup: x [..., k] vs weight")
    return x.new_empty(_out_shape(x, weight_scale.shape[0]), dtype=output_dtype)


@torch.library.custom_op(
    "qc::weight_quant_matmul", mutates_args=(),
    schema=("(Tensor x, Tensor weight, Tensor antiquant_scale, Tensor antiquant_offset, Tensor? bias, "
            "int group_size, int packing) -> Tensor"))
def weight_quant_matmul(x: Tensor, weight: Tensor, antiquant_scale: Tensor, antiquant_offset: Tensor,
                        bias: Tensor | None, group_size: int, packing: int) -> Tensor:
    """W8A16 / W4A16: `x @ ((w + offset) * scale)^T (+ bias)` in x's dtype; [..., k] -> [..., n]."""
    _no_kernel("weight_quant_matmul")


@weight_quant_matmul.register_fake
def _(x, weight, antiquant_scale, antiquant_offset, bias, group_size, packing):
    torch._check(packing in (0, 1, 2, 3), lambda: f"weight_quant_matmul: packing {packing} not in (0, 1, 2, 3)")
    return x.new_empty(_out_shape(x, antiquant_scale.shape[0]))


# ---- attention ops -----------------------------------------------------------------------------------------------
@torch.library.custom_op("qc::kv_quant", mutates_args=(), schema="(Tensor x, Tensor scale) -> Tensor")
def kv_quant(x: Tensor, scale: Tensor) -> Tensor:
    """C8 cache quantization of K (after RoPE) or V [B, KVH, L, D], per channel scale [KVH*D]."""
    _no_kernel("kv_quant")


@kv_quant.register_fake
def _(x, scale):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("qc::kv_dequant", mutates_args=(),
                         schema="(Tensor q, Tensor scale, ScalarType dtype) -> Tensor")
def kv_dequant(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """C8 dequantization inside attention: `q * scale` per channel, in the model dtype."""
    _no_kernel("kv_dequant")


@kv_dequant.register_fake
def _(q, scale, dtype):
    return torch.empty_like(q, dtype=dtype)


@torch.library.custom_op("qc::fa_quant", mutates_args=(), schema="(Tensor x, Tensor scale) -> Tensor")
def fa_quant(x: Tensor, scale: Tensor) -> Tensor:
    """FA3 per-head int8 quantization of Q, K or V [B, N, L, D], scale [N, 1]."""
    _no_kernel("fa_quant")


@fa_quant.register_fake
def _(x, scale):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("qc::fa_dequant", mutates_args=(),
                         schema="(Tensor q, Tensor scale, ScalarType dtype) -> Tensor")
def fa_dequant(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """FA3 dequantization (what the int8 attention kernel applies to its scores/outputs), per head."""
    _no_kernel("fa_dequant")


@fa_dequant.register_fake
def _(q, scale, dtype):
    return torch.empty_like(q, dtype=dtype)


@torch.library.custom_op(
    "qc::cached_attention", mutates_args=(),
    schema=("(Tensor q, Tensor k, Tensor v, Tensor k_cache, Tensor v_cache, Tensor pos, Tensor? k_scale, "
            "Tensor? v_scale, float? scale, ScalarType dtype) -> Tensor"))
def cached_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                     k_scale: Tensor | None, v_scale: Tensor | None, scale: float | None, dtype: torch.dtype) -> Tensor:
    """Attention of L new queries over cache[:pos] ++ the new keys/values (backends/ascend/attention.py)."""
    _no_kernel("cached_attention")


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, pos, k_scale, v_scale, scale, dtype):
    return q.new_empty([q.shape[0], q.shape[1], q.shape[2], v.shape[3]], dtype=dtype)


#: the Linear ops' overloads, for passes and verifiers that need to recognise them
QC_OPS = (
    torch.ops.qc.quantize.default,
    torch.ops.qc.quant_matmul.default,
    torch.ops.qc.dynamic_quant.default,
    torch.ops.qc.quant_matmul_pertoken.default,
    torch.ops.qc.quant_matmul_pergroup.default,
    torch.ops.qc.weight_quant_matmul.default,
)
#: the attention quantize / dequantize overloads (kv8, fa3)
ATTENTION_QUANT_OPS = (torch.ops.qc.kv_quant.default, torch.ops.qc.kv_dequant.default,
                       torch.ops.qc.fa_quant.default, torch.ops.qc.fa_dequant.default)
