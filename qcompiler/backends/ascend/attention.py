"""Kernels of the attention ops of the `qc` vocabulary (KV cache int8 "C8", FA3 per-head Q/K/V, cached
attention; schemas and fake kernels: ir/qc_ops.py), registered when this module is imported (spec:
ascend-artifact.md sec. 3 "KV cache int8", "Attention (FA3) quant", sec. 4 `npu_fused_infer_attention_score`
with `key/value_antiquant_scale`).

All tensors are in the attention layout `[B, N, L, D]` (N heads, L tokens, D head_dim), i.e. K after RoPE.

| op | math |
|---|---|
| qc::kv_quant(x, scale) | `clamp(round(f32(x) / scale[c]), -128, 127)` int8; scale [N*D] per channel c = n*D + d |
| qc::kv_dequant(q, scale, dtype) | `dtype(f32(q) * scale[c])` |
| qc::fa_quant(x, scale) | `clamp(round(f32(x) / scale[n]), -128, 127)` int8; scale [N, 1] per head |
| qc::fa_dequant(q, scale, dtype) | `dtype(f32(q) * scale[n])` |
| qc::cached_attention(q, k, v, k_cache, v_cache, pos, k_scale?, v_scale?, scale, dtype) | see below |

`cached_attention` is the decode-step attention: `k`/`v` are the new tokens' keys/values in cache storage
form (int8 codes of `kv_quant` when `k_scale`/`v_scale` are given, else model dtype), `k_cache`/`v_cache`
[B, KVH, S, D] static buffers whose first `pos` positions hold earlier tokens. It attends the L new queries
(absolute positions pos..pos+L-1, causal) over cache[:pos] ++ new, dequantizing int8 rows with the same
`kv_dequant` math, so a cached decode computes what recomputing the whole sequence computes. The op does
not write the cache (the graph outputs the new rows and the runtime stores them): programs stay free of
mutation and export cleanly.

These are plain tensor math (no CPU-only fast path), registered for every device; on an NPU the engines
fuse them into the attention kernel (antiquant scales), which is not dispatched here.
Rounding is round-half-to-even (`torch.round`); a zero scale is the caller's error (calibration maps an
all-zero channel to scale 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...ir import qc_ops


# --------------------------------------------------------------------------------------------------
# reference kernels


def _channel_view(scale: Tensor, x: Tensor) -> Tensor:
    """scale [N*D] as [N, 1, D] (broadcasts over [B, N, L, D])."""
    return scale.float().reshape(x.shape[1], 1, x.shape[3])


def _head_view(scale: Tensor, x: Tensor) -> Tensor:
    """scale [N, 1] as [N, 1, 1]."""
    return scale.float().reshape(x.shape[1], 1, 1)


def quant_sym(x: Tensor, scale: Tensor) -> Tensor:
    """`clamp(round(f32(x) / scale), -128, 127)` as int8; `scale` already broadcastable to x."""
    return torch.clamp(torch.round(x.float() / scale), -128, 127).to(torch.int8)


def kv_quant_ref(x: Tensor, scale: Tensor) -> Tensor:
    return quant_sym(x, _channel_view(scale, x))


def kv_dequant_ref(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.float() * _channel_view(scale, q)).to(dtype)


def fa_quant_ref(x: Tensor, scale: Tensor) -> Tensor:
    return quant_sym(x, _head_view(scale, x))


def fa_dequant_ref(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return (q.float() * _head_view(scale, q)).to(dtype)


def cached_attention_ref(q, k, v, k_cache, v_cache, pos, k_scale, v_scale, scale, dtype):
    p = int(pos)
    keys = torch.cat([k_cache[:, :, :p], k], dim=2)
    values = torch.cat([v_cache[:, :, :p], v], dim=2)
    if k_scale is not None:
        keys = kv_dequant_ref(keys, k_scale, dtype)
    if v_scale is not None:
        values = kv_dequant_ref(values, v_scale, dtype)
    L = q.shape[2]
    if p == 0:  # same call as the recomputing graph's attention
        return F.scaled_dot_product_attention(q, keys, values, is_causal=L > 1, scale=scale, enable_gqa=True)
    if L == 1:  # one new token sees every cached one
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True)
    mask = torch.ones(L, p + L, dtype=torch.bool).tril(diagonal=p)  # query i (position p+i) sees keys <= p+i
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)


# --------------------------------------------------------------------------------------------------
# kernels of the attention ops (ir/qc_ops.py): plain tensor math, registered for every device

qc_ops.kv_quant.register_kernel(None)(kv_quant_ref)
qc_ops.kv_dequant.register_kernel(None)(kv_dequant_ref)
qc_ops.fa_quant.register_kernel(None)(fa_quant_ref)
qc_ops.fa_dequant.register_kernel(None)(fa_dequant_ref)
qc_ops.cached_attention.register_kernel(None)(cached_attention_ref)
