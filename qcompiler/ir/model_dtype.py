"""The model dtype, and numbers as a runtime that holds them in it sees them ("numerics as loaded").

Inference engines hold scales, offsets and biases as model-dtype parameters: they copy the file's float32 value
into a float16 / bfloat16 tensor, which rounds it. A weight code computed against the unrounded scale is then
off by that rounding; so every quantizer computes its codes against the scale as held (`engine_scale`), and a
stored value is exactly representable in the model dtype (`is_engine_exact`). Which tensors a given backend's
engines hold in the model dtype is that backend's fact (backends/ascend/encode.py `ENGINE_MODEL_DTYPE`, with the
engine code it was read in); the rounding itself is here, target-neutral, for passes and backends alike.

- `as_model_dtype(d)` / `model_dtype_name(d)`: torch.float16 / torch.bfloat16 (QCError for anything else);
- `engine_float(t, d)`: float32 copy of t rounded to d; `engine_scale(s, d)`: the same, kept > 0;
  `is_engine_exact(t, d)`; each takes `also`: further dtypes an engine casts the value through after d (a scale
  held exactly in all of them is what the engines and the executable graph both compute with);
- `quantize_weight(w, bits, group_size, scale=None, model_dtype=None, also=())`: checked symmetric weight codes
  (int8 container, any width 2..8 of ir/qnumerics.py) against the scale as held; `check_2d`, `num_groups`,
  `check_scale`: its argument checks (ValueError naming what was expected).
Math in float32 (weights may arrive in bf16/fp16/fp32); round half to even (torch's cast and torch.round).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import QCError
from . import qnumerics as qn

_MODEL_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def as_model_dtype(model_dtype: torch.dtype | str) -> torch.dtype:
    """torch.float16 / torch.bfloat16 (also accepts "float16", "bfloat16", "torch.float16"); else QCError."""
    if isinstance(model_dtype, str):
        model_dtype = _MODEL_DTYPES.get(model_dtype.replace("torch.", ""), model_dtype)
    if model_dtype not in (torch.float16, torch.bfloat16):
        raise QCError(f"model dtype {model_dtype!r} is not supported: models run in float16 or bfloat16")
    return model_dtype


def model_dtype_name(model_dtype: torch.dtype | str) -> str:
    """The model dtype as config.json spells it: "float16" or "bfloat16"."""
    return str(as_model_dtype(model_dtype)).replace("torch.", "")


def check_2d(t: Tensor, what: str) -> tuple[int, int]:
    if t.dim() != 2:
        raise ValueError(f"{what} must be 2-D [n, k], got shape {list(t.shape)}")
    return t.shape[0], t.shape[1]


def num_groups(k: int, group_size: int) -> int:
    """Scale columns: 1 per-channel (group_size 0), k / group_size per-group."""
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0, got {group_size}")
    if group_size == 0:
        return 1
    if k % group_size:
        raise ValueError(f"k={k} is not a multiple of group_size={group_size}")
    return k // group_size


def check_scale(scale: Tensor, n: int, k: int, group_size: int) -> Tensor:
    """A given weight scale as float32 [n, G]; per-channel also accepts [n]. Finite and > 0."""
    g = num_groups(k, group_size)
    scale = torch.as_tensor(scale).detach().float()
    if g == 1 and scale.shape == (n,):
        scale = scale.reshape(n, 1)
    if tuple(scale.shape) != (n, g):
        raise ValueError(f"weight scale shape {list(scale.shape)}, expected {[n, g]} (group_size={group_size})")
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("weight scale must be finite and > 0")
    return scale.contiguous()


def _held_dtypes(model_dtype, also) -> tuple[torch.dtype, ...]:
    return (as_model_dtype(model_dtype),) + tuple(as_model_dtype(d) for d in also)


def engine_float(t: Tensor, model_dtype: torch.dtype | str, also: tuple = ()) -> Tensor:
    """float32 copy of `t` with every value rounded to the model dtype (round-half-to-even, torch's cast): what an
    engine holds after copying the file's value into a model-dtype parameter; then to each dtype of `also` in
    turn (an engine that casts the held value again: the W4A8_DYNAMIC fused-MoE scale through float16,
    ir/moe.py `EXPERT_SCALE_ALSO`). bfloat16 then float16 gives a value exact in both (float16's subnormal grid
    only drops low bits). Non-finite results are an error."""
    r = torch.as_tensor(t).detach().float()
    for dtype in _held_dtypes(model_dtype, also):
        r = r.to(dtype).float()
        if not torch.isfinite(r).all():
            raise ValueError(f"value out of range for {dtype} (an engine holding it in {dtype} overflows)")
    return r.contiguous()


def engine_scale(scale: Tensor, model_dtype: torch.dtype | str, also: tuple = ()) -> Tensor:
    """A positive scale as the engines hold it (`engine_float`), kept > 0: a value that rounds to 0 becomes the
    smallest positive (subnormal) value all the held dtypes represent instead, so codes computed against it stay
    finite (they clamp; such a row or group is all but zero anyway)."""
    dtypes = _held_dtypes(model_dtype, also)
    r = engine_float(scale, model_dtype, also)
    # 2**-24 (fp16), 2**-133 (bf16): the largest of them is a power of two, exact in every one
    tiniest = max(torch.finfo(d).smallest_normal * torch.finfo(d).eps for d in dtypes)
    return torch.where(r > 0, r, torch.full_like(r, tiniest))


def is_engine_exact(t: Tensor, model_dtype: torch.dtype | str, also: tuple = ()) -> bool:
    """True when every value of `t` is exactly representable in the model dtype and in each dtype of `also` (the
    engines' casts keep it)."""
    tf = torch.as_tensor(t).detach().float()
    return all(torch.equal(tf.to(d).float(), tf) for d in _held_dtypes(model_dtype, also))


def quantize_weight(w: Tensor, bits: int = 8, group_size: int = 0, scale: Tensor | None = None,
                    model_dtype: torch.dtype | str | None = None, also: tuple = ()) -> tuple[Tensor, Tensor]:
    """Symmetric weight quantization: returns (int8 codes [n, k], float32 scale [n, 1] or [n, k/group_size]).

    scale = absmax / qmax per row (group_size 0) or per group of `group_size` along k, qmax = 2**(bits-1) - 1
    (qnumerics.qmax: 127 for 8 bits, 7 for 4); zero rows/groups get scale 1.0. A given `scale` ([n, G], or [n]
    per-channel) is used as is (finite, > 0). With `model_dtype` the scale is first rounded to it, then to each dtype of
    `also` (`engine_scale`: what the engines hold), and the codes are computed against the rounded scale.
    q = clamp(round(w / scale), -qmax, qmax): -128 / -8 never occur. Codes of every width 2..8 are stored in int8
    (qnumerics.storage_dtype).
    """
    qmax = qn.qmax(bits)
    n, k = check_2d(w, "weight")
    g = num_groups(k, group_size)
    groups = w.detach().float().reshape(n, g, k // g)
    if scale is None:
        absmax = groups.abs().amax(dim=-1)
        # the weight's finiteness from its group maxima (abs and amax propagate NaN and Inf): no pass of its own
        if not torch.isfinite(absmax).all():
            raise ValueError("weight contains NaN or Inf")
        scale = absmax / qmax
        # zero group (or an absmax so small that /qmax underflows): any scale codes it as 0; 1.0 keeps it finite
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    else:
        if not torch.isfinite(groups).all():  # before the scale's checks, as for a computed scale
            raise ValueError("weight contains NaN or Inf")
        scale = check_scale(scale, n, k, group_size)
    if model_dtype is not None:
        scale = engine_scale(scale, model_dtype, also)
    elif also:
        raise ValueError("`also` rounds after the model dtype: pass model_dtype too")
    q = (groups / scale.unsqueeze(-1)).round_().clamp_(-qmax, qmax)  # rounded in place: one float32 [n, k] temporary
    return q.to(torch.int8).reshape(n, k), scale.contiguous()
