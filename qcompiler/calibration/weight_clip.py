"""Weight scales other than absmax: MSE-optimal clipping (`weight_observer=mse`) and outlier split (w8a8s).

Contract: `mse_weight_scale(w, bits, group_size, clip)` -> float32 scale [n, G] (G = 1 per-channel, k / g
per-group), for `ir/model_dtype.quantize_weight(w, bits, group_size, scale=...)`. Per row (or row-group) it tries
scale = r * absmax / qmax for r on `clip.grid` equal steps from 1.0 down to `clip.min_ratio` and keeps the
r with the least sum of squared quantization error sum((w - s * clamp(round(w / s), -qmax, qmax))^2).
r = 1.0 (min-max) is tried first and replaced only by a strictly smaller error, so the result never has a
larger MSE than min-max and equals min-max exactly when no clipping helps. Zero rows/groups get scale 1.0
(as the encoder does). The error is the weight's own error, not weighted by activations (awq does that).
Cost: grid + 1 fake-quantizations of the weight, in row chunks to bound memory, on one torch thread
(many medium element-wise ops: on the shared 2-core machine two threads were about 10x slower).
"""
import torch

from ..ir import qnumerics as qn
from ..ir.model_dtype import engine_scale
from ..ir.qspec import MSEClip, OutlierSplit


def mse_weight_scale(w: torch.Tensor, bits: int, group_size: int = 0, clip: MSEClip = MSEClip(),
                     chunk_elems: int = 1 << 22) -> torch.Tensor:
    """Per-channel/per-group MSE-optimal symmetric scale, float32 [n, G] (see the module docstring)."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [n, k], got shape {list(w.shape)}")
    if clip.grid < 1 or not 0.0 < clip.min_ratio < 1.0:
        raise ValueError(f"MSE clip search needs grid >= 1 and 0 < min_ratio < 1, got {clip}")
    qmax = qn.qmax(bits)
    n, k = w.shape
    g = 1 if group_size == 0 else k // group_size
    if group_size and k % group_size:
        raise ValueError(f"k={k} is not a multiple of group_size={group_size}")
    groups = w.detach().float().reshape(n, g, k // g)
    absmax = groups.abs().amax(-1)                                   # [n, G]
    ratios = [1.0 - (1.0 - clip.min_ratio) * i / clip.grid for i in range(clip.grid + 1)]
    best_scale = absmax / qmax
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _search(groups, absmax, ratios, bits, best_scale, max(1, chunk_elems // k))
    finally:
        torch.set_num_threads(threads)
    # zero row/group: any scale codes it as 0; 1.0 keeps it finite (the encoder's rule)
    return torch.where(absmax > 0, best_scale, torch.ones_like(best_scale)).contiguous()


@torch.no_grad()
def _search(groups, absmax, ratios, bits, best_scale, rows):
    """Fill best_scale [n, G] in place with the least-error candidate scale of each row/group."""
    n, qmax = groups.shape[0], qn.qmax(bits)
    for r0 in range(0, n, rows):
        x = groups[r0:r0 + rows]
        amax = absmax[r0:r0 + rows]
        best_err = None
        best = None
        for r in ratios:
            s = (amax * r / qmax).clamp_min(torch.finfo(torch.float32).tiny)
            s3 = s.unsqueeze(-1)
            err = (x - qn.quantize(x, s3, bits) * s3).pow_(2).sum(-1)
            if best_err is None:
                best_err, best = err, s.clone()
            else:
                better = err < best_err                             # strict: ties keep the larger ratio
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, s, best)
        best_scale[r0:r0 + rows] = best


def weight_mse(w: torch.Tensor, scale: torch.Tensor, bits: int) -> float:
    """Mean squared quantization error of `w` with the given per-channel/per-group scale [n, G]."""
    n, k = w.shape
    g = scale.shape[1]
    x = w.detach().float().reshape(n, g, k // g)
    s3 = scale.float().unsqueeze(-1)
    return float((x - qn.quantize(x, s3, bits) * s3).pow(2).mean())


def outlier_split_codes(w: torch.Tensor, bits: int, split: OutlierSplit,
                        model_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [n, k], float32 scale [n, 1]) per `OutlierSplit` (qspec.py): the scale comes from each row's
    inliers, inliers keep to [-qmax, qmax], outliers use the rest of the int8 range (+-127). With `model_dtype`
    the scale is first rounded as the engines hold it (ir/model_dtype.engine_scale) and the codes computed against it."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [n, k], got shape {list(w.shape)}")
    w32 = w.detach().float()
    n, k = w32.shape
    outlier = torch.zeros(n, k, dtype=torch.bool)
    if split.sigma is not None:
        mean, std = w32.mean(1, keepdim=True), w32.std(1, keepdim=True, unbiased=False)
        outlier = (w32 - mean).abs() > split.sigma * std
    else:
        count = int(split.fraction * k + 0.5)
        if count:
            idx = torch.topk(w32.abs(), count, dim=1).indices
            outlier.scatter_(1, idx, True)
    inlier_absmax = w32.abs().masked_fill(outlier, 0.0).amax(1, keepdim=True)
    scale = inlier_absmax / qn.qmax(bits)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if model_dtype is not None:
        scale = engine_scale(scale, model_dtype)
    q = torch.round(w32 / scale).clamp(-127, 127)
    q = torch.where(outlier, q, q.clamp(-qn.qmax(bits), qn.qmax(bits)))
    return q.to(torch.int8), scale
