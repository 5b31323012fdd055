"""qc::cached_attention against plain causal attention over the whole sequence (float32, so the only
difference is summation order: tolerance 1e-5), for every way of splitting the sequence into chunks;
and the int8-cache path against dequantize-then-attend."""
import pytest
import torch
import torch.nn.functional as F

import qcompiler.backends.ascend  # noqa: F401  registers torch.ops.qc.*


def _qkv(seed=0, B=2, H=4, KVH=2, L=9, D=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, D, generator=g), torch.randn(B, KVH, L, D, generator=g),
            torch.randn(B, KVH, L, D, generator=g))


@pytest.mark.parametrize("chunks", [[9], [1] * 9, [4, 1, 1, 3], [2, 7]])
def test_chunked_cached_attention_equals_full_causal(chunks):
    q, k, v = _qkv()
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    k_cache, v_cache = torch.zeros_like(k), torch.zeros_like(v)
    outs, pos = [], 0
    for n in chunks:
        sl = slice(pos, pos + n)
        outs.append(torch.ops.qc.cached_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], k_cache, v_cache,
                                                  torch.tensor(pos), None, None, 0.3, torch.float32))
        k_cache[:, :, sl], v_cache[:, :, sl] = k[:, :, sl], v[:, :, sl]
        pos += n
    torch.testing.assert_close(torch.cat(outs, dim=2), want, atol=1e-5, rtol=1e-5)


def test_int8_cache_is_dequantized_per_channel():
    q, k, v = _qkv(1)
    ks, vs = k.abs().amax(dim=(0, 2)).flatten() / 127, v.abs().amax(dim=(0, 2)).flatten() / 127
    kq, vq = torch.ops.qc.kv_quant(k, ks), torch.ops.qc.kv_quant(v, vs)
    kd, vd = (torch.ops.qc.kv_dequant(c, s, torch.float32) for c, s in ((kq, ks), (vq, vs)))
    want = F.scaled_dot_product_attention(q[:, :, 5:], kd, vd, attn_mask=torch.ones(4, 9, dtype=torch.bool).tril(5),
                                          enable_gqa=True)
    k_cache, v_cache = torch.zeros_like(kq), torch.zeros_like(vq)
    k_cache[:, :, :5], v_cache[:, :, :5] = kq[:, :, :5], vq[:, :, :5]
    got = torch.ops.qc.cached_attention(q[:, :, 5:], kq[:, :, 5:], vq[:, :, 5:], k_cache, v_cache, torch.tensor(5),
                                        ks, vs, None, torch.float32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
