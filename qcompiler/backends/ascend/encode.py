"""Encode quantized Linears into the exact tensors of the Ascend artifact (shared/spec/ascend-artifact.md, section 3).

Contract
- Pure tensor functions on CPU tensors; nothing here touches files. Float math is done in float32 (weights may
  arrive in bf16/fp16/fp32); integer-exact quantities (`quant_bias`) are computed in float64.
- Each `encode_<type>` returns `dict[suffix, Tensor]` (`weight`, `bias`, `input_scale`, ...) with the spec's
  exact dtypes and shapes; the caller prefixes the Linear's HF path and types every tensor with the quant type
  except `bias`, which is "FLOAT" (`tensor_quant_type` says which).
- Numerics as loaded: every float tensor an engine holds in the model dtype (`ENGINE_MODEL_DTYPE` says which,
  with the engine code it was read in) is stored as float32 holding a value exactly representable in the model
  dtype (`engine_scale`, `engine_float`), and weight codes are computed against that rounded scale; so the
  engines' cast on load changes nothing and the executable graph computes with the very values the NPU uses.
- Weights are symmetric and never use the most negative code: int8 codes lie in [-127, 127] and int4 codes in
  [-7, 7] (the checker reports -128 / -8 as asymmetric, and symmetric kernels assume it).
- A zero row (per-channel) or zero group gets scale 1.0, so every stored scale is finite and > 0.
- Every encoder takes either the float `weight` (quantized here with absmax scales), or `weight` plus a given
  `scale=` (clipping searches pick their own scale; it is rounded to the model dtype here), or precomputed
  integer codes `q=` plus `scale=` (error-compensating passes such as GPTQ do their own rounding against
  `quantize_weight(..., model_dtype=)`'s rounded scale; `weight` may then be None; a scale that is not
  representable in the model dtype is then an error, since the codes were not computed against what runs).

Limits
- Model dtype must be float16 or bfloat16 (what the engines run); it decides the rounding of the scales and the
  `deq_scale` encoding (int64 bit-copy for fp16, float32 for bf16).
- q/k/v (and gate/up) of one layer must share `input_scale`/`input_offset`: the caller passes the same values.
- W8A8S uses `encode_w8a8` on sparsified codes (`q=`); W8A8SC, W16A16S, C8 and FA3 tensors are not encoded here.
- W4A8_DYNAMIC is per-group only (the two-stage form both engines load) and refuses a Linear bias (neither engine
  adds it; `engines.py`).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from qcompiler.backends.ascend.int4 import PACK_FACTOR_INT32, pack_int4, pack_int4_int32
from qcompiler.errors import QCError
from qcompiler.ir import model_dtype as md
from qcompiler.ir import qnumerics as qn
# the model dtype and its rounding are target-neutral (passes compute codes against them too); encode's callers
# and this module's docstring name them here
from qcompiler.ir.model_dtype import (as_model_dtype, check_2d, check_scale, engine_float, engine_scale,  # noqa: F401
                                      is_engine_exact, model_dtype_name, num_groups)

# ---- quant type strings (spec section 2) -------------------------------------------------------------------------
FLOAT = "FLOAT"
W16A16S = "W16A16S"
W8A16 = "W8A16"
W8A8_DYNAMIC = "W8A8_DYNAMIC"
W8A8_MIX = "W8A8_MIX"
W8A8 = "W8A8"
W8A8S = "W8A8S"
W8A8SC = "W8A8SC"
W4A16 = "W4A16"
W4A8_DYNAMIC = "W4A8_DYNAMIC"
C8 = "C8"
FAQUANT = "FAQuant"

QUANT_TYPES = (FLOAT, W8A8, W8A8_DYNAMIC, W8A8_MIX, W8A16, W4A16, W4A8_DYNAMIC, W8A8S, W8A8SC, W16A16S, C8, FAQUANT)
# Types a Linear's weight can carry (C8 / FAQuant type attention side tensors only).
LINEAR_QUANT_TYPES = (FLOAT, W16A16S, W8A16, W8A8_DYNAMIC, W8A8_MIX, W8A8, W8A8S, W8A8SC, W4A16, W4A8_DYNAMIC)

# model_quant_type order, weakest first. The first six are the spec's priority. The spec only says that
# W8A8S-only / W4-only models use that type; we extend it so that a model *containing* such Linears is named
# by them, with everything else read as fallbacks: W8A8S(C) beats every dense int8 type (a sparse model with
# dense fallbacks is still deployed as a sparse model), and the int4 types beat everything (an int4 model with
# int8/float fallbacks is still an int4 model; W4A8_DYNAMIC over W4A16 because, as in the spec's order,
# the activation-quantized type wins).
_MODEL_TYPE_ORDER = (FLOAT, W16A16S, W8A16, W8A8_DYNAMIC, W8A8_MIX, W8A8, W8A8S, W8A8SC, W4A16, W4A8_DYNAMIC)


def tensor_quant_type(suffix: str, linear_type: str) -> str:
    """Description type of one encoded tensor: the Linear's type, except its float `bias` (spec section 2)."""
    return FLOAT if suffix == "bias" else linear_type


def _qmax(bits: int) -> int:
    """qmax of the widths the Ascend artifact stores (8: int8, 4: int4); others are refused before any work
    (capability.py), and here again rather than written at another width."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    return qn.qmax(bits)


def _container_qmax(bits: int, container: int) -> int:
    """qmax of `bits`-bit codes stored in a `container`-bit weight (8: int8, 4: packed int4): any width 2..container
    (a narrower symmetric code is a valid code of the wider container: W8A16's kernel computes (w + offset) * scale
    for any int8 w, so 6-bit codes in [-31, 31] are stored and computed exactly; capability.py HONOURED)."""
    if not (isinstance(bits, int) and 2 <= bits <= container):
        raise ValueError(f"bits must be in 2..{container} for a {container}-bit weight, got {bits}")
    return qn.qmax(bits)


# ---- numerics as loaded (the rounding itself: ir/model_dtype.py) -----------------------------------------------
#: Per quant type, the stored float tensors the engines hold in the model dtype (so they round the file's float32
#: on load). vLLM-Ascend 0.23.0 / 0.26.0rc1 create them as `params_dtype` parameters and `copy_` the file into
#: them: methods/w8a8_static.py (`get_pertensor_param`: input_scale; `get_perchannel_param`: weight_scale,
#: weight_offset; deq_scale is float32 for bf16 / int64 for fp16, quant_bias int32, input_offset int8),
#: w8a8_pdmix.py (same, via the static method), w8a8_dynamic.py and w8a16.py (`get_perchannel_param`),
#: w4a8.py (`get_pergroup_param`: weight_scale, weight_offset, weight_scale_second, weight_offset_second in
#: params_dtype, scale_bias float32), _310p/.../w8a8_base.py (input_scale), vLLM's Linear `bias` (params_dtype),
#: kv_c8.py (C8 scales in `torch.get_default_dtype()`, the model dtype while the model is built; fa_*.scale too).
#: MindIE atb casts every non-integer tensor to the model dtype except bf16-mode deq_scale and scale_bias
#: (atb_llm/utils/weights.py `Weights.correct_tensor_dtype`). deq_scale and scale_bias stay float32.
ENGINE_MODEL_DTYPE = {
    W8A8: ("input_scale", "input_offset", "weight_scale", "weight_offset", "bias"),
    W8A8_MIX: ("input_scale", "input_offset", "weight_scale", "weight_offset", "bias"),
    W8A8S: ("input_scale", "input_offset", "bias"),
    W8A8_DYNAMIC: ("weight_scale", "weight_offset", "bias"),
    W8A16: ("weight_scale", "weight_offset", "bias"),
    W4A16: ("weight_scale", "weight_offset", "bias"),
    W4A8_DYNAMIC: ("weight_scale", "weight_offset", "weight_scale_second", "weight_offset_second"),
    C8: ("kv_cache_scale", "kv_cache_offset"),
    FAQUANT: ("scale",),
}

#: Per quant type, the dtypes a routed MoE expert's per-group weight scale is cast through after the model dtype,
#: on load, by both engines' fused-MoE methods, and only there:
#: - vLLM-Ascend 0.23.0 / 0.26.0rc1 methods/w4a8.py `AscendW4A8DynamicFusedMoEMethod.process_scale`:
#:   `scale_fp32 = (scale * per_group_scale).to(torch.float16).to(torch.float32)` (float32 parameters:
#:   `get_dynamic_quant_param_modelslim`), then the uint64 scale of npu_grouped_matmul;
#: - MindIE atb (MindIE-LLM 3.0.0, examples/atb_models/atb_llm/utils/quantize/w4a8.py
#:   `W4A8LinearDynamic.process_scale`, the path of a 3-D [experts, ...] weight from
#:   `TensorParallelColumnLinear.load_moe` / `TensorParallelRowLinear.load_moe`): the same expression on the
#:   model-dtype tensors (`Weights.correct_tensor_dtype`).
#: (MindIE's Qwen MoE layer then refuses W4A8_DYNAMIC experts at load, engines.py; the cast is listed for the models
#: whose MoE layer takes them.) Their dense paths do not (vLLM-Ascend
#: `AscendW4A8DynamicLinearMethod.process_scale_second` / `apply`: the product in x's dtype; MindIE
#: `W4A8LinearDynamic.__init__` 2-D branch: npu_trans_quant_param of the product).
#: A bfloat16 group scale below 2**-17 would lose bits there (or flush to 0 below 2**-25), so the expert's scale
#: is chosen exact in float16 as well (`ir.model_dtype.engine_scale(..., also=)`): the engines' float16 value is
#: then the graph's `kernels.two_stage_scale`. A scale above float16's range (a group absmax over ~4.6e5) is a
#: ValueError. The driver hands this table to the passes that choose codes (LayerContext.expert_scale_also).
EXPERT_SCALE_ALSO = {W4A8_DYNAMIC: (torch.float16,)}


# ---- weights ------------------------------------------------------------------------------------------------------
def quantize_weight(w: Tensor, bits: int = 8, group_size: int = 0, scale: Tensor | None = None,
                    model_dtype: torch.dtype | str | None = None, also: tuple = ()) -> tuple[Tensor, Tensor]:
    """`ir/model_dtype.quantize_weight` for the widths the Ascend artifact stores (8: int8, 4: int4; others are a
    ValueError, `_qmax`): (int8 codes [n, k], float32 scale [n, 1] or [n, k/group_size])."""
    _qmax(bits)
    return md.quantize_weight(w, bits, group_size, scale, model_dtype, also)


def _resolve_weight(weight: Tensor | None, q: Tensor | None, scale: Tensor | None,
                    bits: int, group_size: int, model_dtype: torch.dtype,
                    container: int | None = None, also: tuple = ()) -> tuple[Tensor, Tensor]:
    """(int8 codes, float32 scale rounded to the model dtype, then to each dtype of `also`) from a float weight
    or from precomputed codes. `container`: the stored width when it is wider than `bits` (W8A16's int8 holding
    narrower codes)."""
    if container is not None:
        _container_qmax(bits, container)
    if q is None:
        if weight is None:
            raise ValueError("pass a float `weight`, or precomputed codes `q=` with `scale=`")
        if container is not None:
            return md.quantize_weight(weight, bits, group_size, scale, model_dtype)
        return quantize_weight(weight, bits, group_size, scale, model_dtype, also)
    if scale is None:
        raise ValueError("precomputed codes `q=` need their `scale=`")
    n, k = check_2d(q, "q")
    if weight is not None and tuple(weight.shape) != (n, k):
        raise ValueError(f"weight shape {list(weight.shape)} != q shape {[n, k]}")
    qmax = _qmax(bits) if container is None else _container_qmax(bits, container)
    if q.is_floating_point() and not torch.equal(q, torch.round(q)):
        raise ValueError("q must hold integer codes")
    if q.numel() and (q.min() < -qmax or q.max() > qmax):
        raise ValueError(f"q must lie in the symmetric range [-{qmax}, {qmax}] for {bits}-bit weights, "
                         f"got [{int(q.min())}, {int(q.max())}]")
    scale = check_scale(scale, n, k, group_size)
    if not is_engine_exact(scale, model_dtype, also):
        held = " and ".join(str(d) for d in (model_dtype, *also))
        raise ValueError(f"precomputed codes `q=` were computed against a scale that is not representable in "
                         f"{held} (the engines round it on load): quantize with model_dtype= (and also=) first")
    return q.detach().to(torch.int8).contiguous(), scale


def _bias(bias: Tensor | None, n: int, model_dtype: torch.dtype) -> Tensor | None:
    """The float bias as stored: float32 [n], rounded to the model dtype (both engines hold it so)."""
    if bias is None:
        return None
    b = bias.detach().float().reshape(-1).contiguous()
    if b.shape != (n,):
        raise ValueError(f"bias shape {list(bias.shape)}, expected {[n]}")
    if not torch.isfinite(b).all():
        raise ValueError("bias contains NaN or Inf")
    return engine_float(b, model_dtype)


def _weight_tensors(q: Tensor, scale: Tensor, bias: Tensor | None, model_dtype: torch.dtype) -> dict[str, Tensor]:
    """weight, weight_scale, weight_offset (zeros: symmetric) and the optional float bias."""
    out = {"weight": q, "weight_scale": scale, "weight_offset": torch.zeros_like(scale)}
    b = _bias(bias, q.shape[0], model_dtype)
    if b is not None:
        out["bias"] = b
    return out


def _pack(q: Tensor, dim: int, what: str) -> Tensor:
    """int4 codes -> packed int8 along `dim`; the spec's shapes (n/2 or k/2) need an even size there."""
    if q.shape[dim] % 2:
        raise ValueError(f"{what}: packing int4 along dim {dim} needs an even size, got shape {list(q.shape)}")
    return pack_int4(q, dim).contiguous()


# ---- activations --------------------------------------------------------------------------------------------------
def _round_to_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to the model dtype, as a Python float (exactly representable in float32 and in dtype)."""
    return torch.tensor(value, dtype=torch.float64).to(dtype).float().item()


def min_activation_scale(model_dtype: torch.dtype | str) -> float:
    """Smallest activation scale we store: the largest power of two 2**-e whose reciprocal 2**e is finite in
    the model dtype (2**-15 for float16, 2**-127 for bfloat16), since the engine multiplies by dtype(1/s)."""
    return 2.0 ** -math.floor(math.log2(torch.finfo(as_model_dtype(model_dtype)).max))


def static_activation_params(xmin: float, xmax: float, model_dtype: torch.dtype | str) -> tuple[Tensor, Tensor]:
    """Per-tensor asymmetric int8 activation parameters: (input_scale [1] f32, input_offset [1] f32).

    Convention (spec 3, W8A8): x_q = clamp(round(x / s + o), -128, 127), x ~ (x_q - o) * s.
    The range is widened to include 0; s = (xmax - xmin) / 255 rounded to the model dtype (the engine rounds it
    anyway, so the stored float32 is exactly what runs), floored at `min_activation_scale(dtype)` so that s > 0
    and the engine's reciprocal dtype(1/s) stays finite (degenerate or tiny range: for float16 any range below
    about 0.0078 gets the floor 2**-15); o = round(-128 - xmin / s) clamped to [-128, 127].
    """
    dtype = as_model_dtype(model_dtype)
    xmin, xmax = float(xmin), float(xmax)
    if not (np.isfinite(xmin) and np.isfinite(xmax)) or xmin > xmax:
        raise ValueError(f"activation range must be finite with xmin <= xmax, got [{xmin}, {xmax}]")
    xmin, xmax = min(xmin, 0.0), max(xmax, 0.0)
    s = max(_round_to_dtype((xmax - xmin) / 255.0, dtype), min_activation_scale(dtype))
    if not np.isfinite(s):
        raise QCError(f"activation range [{xmin}, {xmax}] is too wide for {dtype}: its scale overflows")
    o = min(max(round(-128.0 - xmin / s), -128), 127)  # Python round: half to even, like torch.round
    return torch.tensor([s], dtype=torch.float32), torch.tensor([float(o)], dtype=torch.float32)


def _activation_param(value: Tensor | float, what: str) -> Tensor:
    """A per-tensor activation parameter as float32 [1]."""
    t = torch.as_tensor(value).detach().float().reshape(-1)
    if t.shape != (1,):
        raise ValueError(f"{what} must be per-tensor (one value), got shape {list(torch.as_tensor(value).shape)}")
    return t.contiguous()


def _static_params(input_scale: Tensor | float, input_offset: Tensor | float,
                   model_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(input_scale rounded to the model dtype, input_offset) as float32 [1]: the engines hold input_scale in the
    model dtype and quantize with dtype(1 / dtype(s)), so deq_scale must be formed from the rounded value."""
    s_x = _activation_param(input_scale, "input_scale")
    o_x = _activation_param(input_offset, "input_offset")
    if not (torch.isfinite(s_x).all() and (s_x > 0).all()):
        raise ValueError(f"input_scale must be finite and > 0, got {s_x.item()}")
    s_x = engine_float(s_x, model_dtype)
    if not (s_x > 0).all() or not torch.isfinite((1 / s_x.to(model_dtype)).to(model_dtype)).all():
        raise ValueError(f"input_scale {s_x.item()!r} is out of range for {model_dtype}: the engine's reciprocal "
                         "dtype(1 / s) is not finite (see min_activation_scale)")
    o = o_x.item()
    if o != round(o) or not -128 <= o <= 127:
        raise ValueError(f"input_offset must be an integer in [-128, 127], got {o}")
    return s_x, o_x


# ---- deq_scale ----------------------------------------------------------------------------------------------------
def encode_deq_scale(deq: Tensor, model_dtype: torch.dtype | str) -> Tensor:
    """deq_scale as stored: float32 [n] for bfloat16 models, int64 [n] bit-copy for float16 models.

    The int64 holds the float32's IEEE-754 bits in its low 32 bits, high 32 bits zero (deq > 0, so the sign
    extension of the spec's `np.frombuffer(f32.tobytes(), np.int32).astype(np.int64)` is zero too).
    """
    dtype = as_model_dtype(model_dtype)
    d = deq.detach().float().reshape(-1).contiguous()
    if not (torch.isfinite(d).all() and (d > 0).all()):
        raise ValueError("deq_scale must be finite and > 0 (input_scale * weight_scale underflowed?)")
    if dtype == torch.bfloat16:
        return d
    return qn.float32_bits_to_int64(d)


def decode_deq_scale(t: Tensor) -> Tensor:
    """Inverse of `encode_deq_scale`: the float32 deq_scale values from either stored form."""
    return qn.int64_bits_to_float32(t)


def _quant_bias(q: Tensor, bias: Tensor | None, deq: Tensor, o_x: Tensor) -> Tensor:
    """int32 [n] = round(b / deq - o_x * sum_k W_q), exact in float64 (b = 0 without bias)."""
    n = q.shape[0]
    b = torch.zeros(n, dtype=torch.float64) if bias is None else bias.double()
    qb = torch.round(b / deq.double() - o_x.double() * q.sum(dim=1, dtype=torch.int64).double())
    limit = torch.iinfo(torch.int32)
    if qb.min() < limit.min or qb.max() > limit.max:
        raise ValueError("quant_bias overflows int32 (bias too large for input_scale * weight_scale)")
    return qb.to(torch.int32)


# ---- one encoder per quant type (spec section 3) ------------------------------------------------------------------
def encode_w8a8(weight: Tensor | None, bias: Tensor | None, input_scale: Tensor | float,
                input_offset: Tensor | float, model_dtype: torch.dtype | str, *,
                q: Tensor | None = None, scale: Tensor | None = None) -> dict[str, Tensor]:
    """W8A8 static: weight i8 [n,k] per-channel, input_scale/input_offset f32 [1], deq_scale [n] (int64 for fp16,
    f32 for bf16) = input_scale * weight_scale, quant_bias i32 [n], weight_scale/weight_offset f32 [n,1],
    bias f32 [n] only when the Linear has one (already folded into quant_bias; typed FLOAT).
    weight_scale is rounded to the model dtype before the codes are computed (the PD-mix prefill path of
    W8A8_MIX runs with it as the engines hold it), input_scale too (the engines quantize with dtype(1/dtype(s)));
    deq_scale is their float32 product, which both engines keep in float32 (int64 bit-copy for fp16)."""
    dtype = as_model_dtype(model_dtype)
    wq, ws = _resolve_weight(weight, q, scale, bits=8, group_size=0, model_dtype=dtype)
    s_x, o_x = _static_params(input_scale, input_offset, dtype)
    out = _weight_tensors(wq, ws, bias, dtype)
    deq = s_x * ws[:, 0]  # float32 product: what the checker and the engine compare against
    out.update(input_scale=s_x, input_offset=o_x, deq_scale=encode_deq_scale(deq, dtype),
               quant_bias=_quant_bias(wq, out.get("bias"), deq, o_x))
    return out


def encode_w8a8_mix(weight: Tensor | None, bias: Tensor | None, input_scale: Tensor | float,
                    input_offset: Tensor | float, model_dtype: torch.dtype | str, *,
                    q: Tensor | None = None, scale: Tensor | None = None) -> dict[str, Tensor]:
    """W8A8_MIX (PD-mix): the W8A8 tensors with weight_scale/weight_offset [n,1] (required here, optional in
    W8A8; `encode_w8a8` always writes them, so the tensor set is the same)."""
    return encode_w8a8(weight, bias, input_scale, input_offset, model_dtype, q=q, scale=scale)


def encode_w8a8s(weight: Tensor | None, bias: Tensor | None, input_scale: Tensor | float,
                 input_offset: Tensor | float, model_dtype: torch.dtype | str, *,
                 q: Tensor | None = None, scale: Tensor | None = None) -> dict[str, Tensor]:
    """W8A8S (sparse W8A8, 310P): the W8A8 tensors without weight_scale / weight_offset. vLLM-Ascend's 310P
    W8A8S scheme creates only weight, input_scale, input_offset, quant_bias and deq_scale (and the float
    bias) and its loader aborts on any other tensor (`_310p/quantization/methods/w8a8_base.py`); msModelSlim
    does not write them for W8A8S either."""
    out = encode_w8a8(weight, bias, input_scale, input_offset, model_dtype, q=q, scale=scale)
    del out["weight_scale"], out["weight_offset"]
    return out


def encode_w8a8_dynamic(weight: Tensor | None, bias: Tensor | None, model_dtype: torch.dtype | str, *,
                        q: Tensor | None = None, scale: Tensor | None = None) -> dict[str, Tensor]:
    """W8A8_DYNAMIC: weight i8 [n,k], weight_scale f32 [n,1] > 0, weight_offset zeros [n,1], optional bias;
    weight_scale and bias rounded to the model dtype (the engines pass both to npu_quant_matmul in it)."""
    dtype = as_model_dtype(model_dtype)
    wq, ws = _resolve_weight(weight, q, scale, bits=8, group_size=0, model_dtype=dtype)
    return _weight_tensors(wq, ws, bias, dtype)


def encode_w8a16(weight: Tensor | None, bias: Tensor | None, group_size: int, model_dtype: torch.dtype | str, *,
                 q: Tensor | None = None, scale: Tensor | None = None, bits: int = 8) -> dict[str, Tensor]:
    """W8A16: weight i8 [n,k]; weight_scale/weight_offset (zeros) f32 [n,1], or [n,k/g] per-group (MindIE only;
    the description's top-level group_size must then equal `group_size`); optional bias. Scales and bias rounded
    to the model dtype (npu_weight_quant_batchmatmul takes antiquant_scale in x's dtype). `bits` 2..8: codes in
    [-qmax(bits), qmax(bits)] stored in the int8 weight (scale = absmax / qmax(bits)): the same tensors and
    kernel, exact for any int8 code."""
    dtype = as_model_dtype(model_dtype)
    wq, ws = _resolve_weight(weight, q, scale, bits=bits, group_size=group_size, model_dtype=dtype, container=8)
    return _weight_tensors(wq, ws, bias, dtype)


def encode_w4a16(weight: Tensor | None, bias: Tensor | None, group_size: int, model_dtype: torch.dtype | str, *,
                 q: Tensor | None = None, scale: Tensor | None = None) -> dict[str, Tensor]:
    """W4A16 (version 1.0.0 packing): codes in [-7,7]; per-channel (scale [n,1]) packs along k -> i8 [n,k/2],
    per-group (scale [n,k/g]) packs along n -> i8 [n/2,k]; weight_scale/weight_offset (zeros) f32; optional bias.
    group_size == k gives a [n,1] scale and is therefore packed (and read by the engines) as per-channel."""
    dtype = as_model_dtype(model_dtype)
    wq, ws = _resolve_weight(weight, q, scale, bits=4, group_size=group_size, model_dtype=dtype)
    out = _weight_tensors(wq, ws, bias, dtype)
    out["weight"] = _pack(wq, dim=1 if ws.shape[1] == 1 else 0, what="W4A16 weight")
    return out


def encode_w4a16_moe(weight: Tensor | None, bias: Tensor | None, group_size: int, model_dtype: torch.dtype | str, *,
                     q: Tensor | None = None, scale: Tensor | None = None) -> dict[str, Tensor]:
    """W4A16 on a routed MoE expert Linear, in the layout vLLM-Ascend's W4A16 fused-MoE method loads (0.23.0 /
    0.26.0rc1 vllm_ascend/quantization/methods/w4a16.py AscendW4A16FusedMoEMethod: docstring, get_weight,
    get_dynamic_quant_param, process_weights_after_loading; LLM-Compressor's pack-quantized expert tensors):
    weight_packed int32 [n, k/8] (int4 codes in [-7, 7], eight per word along k, offset-binary: int4.py
    `pack_int4_int32`, the inverse of its `unpack_from_int32`), weight_scale [n, k/g] in the model dtype (its
    params_dtype parameter), weight_offset zeros [n, k/g] in the model dtype (the parameter it creates as zeros;
    stored so every parameter is fed), weight_shape int32 [2] = [n, k] (its `w13_weight_shape` / `w2_weight_shape`,
    loaded by vLLM's FusedMoE.weight_loader `_load_single_value`). No `weight` tensor: the description's
    `<linear>.weight` entry (no tensor) is what its quant config reads to pick the scheme (ArtifactWriter.describe).
    The NPU dequantizes (w + offset) * scale in the model dtype per group (npu_grouped_matmul antiquant_scale /
    antiquant_offset): the math of `qc.weight_quant_matmul` with packing 3. Per-group only (group_size > 0: the
    method divides by group_size), k % 8 == 0 and k % group_size == 0; no bias (experts have none)."""
    dtype = as_model_dtype(model_dtype)
    if group_size <= 0:
        raise ValueError("W4A16 on MoE experts is per-group only (group_size > 0): vLLM-Ascend's W4A16 fused-MoE "
                         "method divides by the description's group_size")
    if bias is not None:
        raise ValueError("W4A16 MoE expert with a bias: the fused-MoE method has no bias parameter")
    wq, ws = _resolve_weight(weight, q, scale, bits=4, group_size=group_size, model_dtype=dtype)
    n, k = wq.shape
    if k % PACK_FACTOR_INT32:
        raise ValueError(f"W4A16 MoE weight needs k % 8 == 0 (eight int4 per int32), got k={k}")
    return {"weight_packed": pack_int4_int32(wq), "weight_scale": ws.to(dtype).contiguous(),
            "weight_offset": torch.zeros(ws.shape, dtype=dtype), "weight_shape": torch.tensor([n, k], dtype=torch.int32)}


def split_two_stage_scale(scale: Tensor, model_dtype: torch.dtype | str) -> tuple[Tensor, Tensor]:
    """W4A8_DYNAMIC's two-stage scales (weight_scale [n,1], weight_scale_second [n,G]) whose product, as the
    engines form it, is exactly the per-group scale `scale` [n,G] (already representable in the model dtype).

    msModelSlim's two-stage quantization (llm_ptq save/complex_quantifier.py, W4A8_DYNAMIC branch of
    `generate_weight_of_linear_module`) quantizes the weight per channel to int8 (weight_scale) and those int8
    values per group to int4 (weight_scale_second); the engines only ever use the product: MindIE
    `W4A8LinearDynamic.__init__` (atb_llm/utils/quantize/w4a8.py) multiplies the two model-dtype tensors
    (`scale_in_k_n * scale_second_in_k_n`, a model-dtype product) before `npu_trans_quant_param`; vLLM-Ascend
    `AscendW4A8DynamicLinearMethod.process_scale_second` (methods/w4a8.py) multiplies float32(weight_scale) by
    the model-dtype weight_scale_second and casts the product to x's dtype in `apply`. Here weight_scale is the
    power of two nearest the stage-one int8 scale (absmax_row / 127 = max_g scale * 7 / 127), so
    weight_scale_second = scale / weight_scale is exact and both engines' products give `scale` back bit for bit
    (a row where that would leave the dtype's range gets weight_scale 1 and weight_scale_second = scale)."""
    dtype = as_model_dtype(model_dtype)
    s = torch.as_tensor(scale).detach().float()
    stage_one = s.amax(dim=1, keepdim=True) * 7 / 127
    s1 = torch.exp2(torch.round(torch.log2(stage_one)))
    s2 = s / s1
    good = (s1.to(dtype).float() == s1).all(1, keepdim=True) & (s2.to(dtype).float() == s2).all(1, keepdim=True) \
        & (_two_stage_product(s1, s2, dtype) == s).all(1, keepdim=True)
    s1 = torch.where(good, s1, torch.ones_like(s1))
    s2 = torch.where(good, s2, s)
    if not torch.equal(_two_stage_product(s1, s2, dtype), s):
        raise ValueError("W4A8_DYNAMIC per-group scale is not representable in the model dtype")
    return s1.contiguous(), s2.contiguous()


def _two_stage_product(s1: Tensor, s2: Tensor, dtype: torch.dtype) -> Tensor:
    """dtype(dtype(s1) * dtype(s2)) as float32: the per-group scale both engines form (see split_two_stage_scale);
    for values exactly representable in dtype, float32(s1) * s2 is exact, so MindIE's model-dtype product and
    vLLM-Ascend's float32 product cast to x's dtype agree."""
    return (s1.to(dtype) * s2.to(dtype)).float()


def w4a8_scale_bias(q: Tensor, scale: Tensor, row_parallel: bool) -> Tensor:
    """scale_bias float32 [n,1] (column-parallel) or [n,16] (row-parallel: o_proj, down_proj), as msModelSlim's
    saver computes it (llm_ptq save/complex_quantifier.py `process_scale(name, bias, 16)` on the dequantized
    weight q * scale): 8 * sum over k, or 8 * the sums over 16 equal chunks of k (column j covers inputs
    j*k/16 .. (j+1)*k/16, so each of up to 16 tensor-parallel ranks sums its own chunks: MindIE
    `Weights.get_multi_weights_row` shards it along dim 1). The NPU kernel adds it inside the int4 matmul
    (aclnnQuantMatmulV5 `yOffset`, MindIE `W4A8LinearDynamic`: scale_bias.sum(1)); the math it completes is the
    plain dequantized product, which is what the executable graph computes."""
    n, k = q.shape
    deq = (q.float().reshape(n, scale.shape[1], -1) * scale.unsqueeze(-1)).reshape(n, k)
    if row_parallel:
        if k % 16:
            raise ValueError(f"W4A8_DYNAMIC row-parallel scale_bias needs k % 16 == 0, got k={k}")
        return (8 * deq.reshape(-1, k // 16).sum(dim=1, keepdim=True)).reshape(n, 16).contiguous()
    return (8 * deq.sum(dim=1, keepdim=True)).contiguous()


def encode_w4a8_dynamic(weight: Tensor | None, bias: Tensor | None, row_parallel: bool, group_size: int,
                        model_dtype: torch.dtype | str, *, q: Tensor | None = None,
                        scale: Tensor | None = None, expert: bool = False) -> dict[str, Tensor]:
    """W4A8_DYNAMIC in msModelSlim's two-stage per-group form (version 1.0.0), the only dense form an engine loads:
    weight i8 [n/2,k] (int4 codes in [-7,7] packed along n, rows 2i/2i+1 in the low/high nibble),
    weight_scale f32 [n,1] and weight_scale_second f32 [n,k/g] (`split_two_stage_scale`: their product is the
    per-group scale the codes were computed against, rounded to the model dtype), weight_offset [n,1] and
    weight_offset_second [n,k/g] zeros (symmetric; vLLM-Ascend creates both parameters), scale_bias f32
    (`w4a8_scale_bias`). n must be a multiple of 8 (both engines view the packed [k, n/2] int8 weight as int32:
    vLLM-Ascend `process_weights_after_loading`, MindIE `weight_compact.reshape(-1, n // 8)`).
    A Linear bias is an error: neither engine adds it (vLLM-Ascend's dense `apply` ignores `bias`; MindIE's
    `get_linear` W4A8 branch replaces the Linear's bias by scale_bias)."""
    dtype = as_model_dtype(model_dtype)
    if group_size <= 0:
        raise ValueError("W4A8_DYNAMIC is per-group only (group_size > 0): the per-channel form loads in no engine "
                         "for a dense Linear")
    if bias is not None:
        raise ValueError("W4A8_DYNAMIC Linear with a bias: neither vLLM-Ascend nor MindIE adds it")
    also = EXPERT_SCALE_ALSO[W4A8_DYNAMIC] if expert else ()
    wq, s = _resolve_weight(weight, q, scale, bits=4, group_size=group_size, model_dtype=dtype, also=also)
    n, k = wq.shape
    if n % 8:
        raise ValueError(f"W4A8_DYNAMIC needs n % 8 == 0 (the engines read the packed weight as int32), got n={n}")
    s1, s2 = split_two_stage_scale(s, dtype)
    return {"weight": _pack(wq, dim=0, what="W4A8_DYNAMIC weight"), "weight_scale": s1,
            "weight_offset": torch.zeros_like(s1), "weight_scale_second": s2,
            "weight_offset_second": torch.zeros_like(s2), "scale_bias": w4a8_scale_bias(wq, s, row_parallel)}


# ---- model-level names --------------------------------------------------------------------------------------------
def model_quant_type(types: Iterable[str]) -> str:
    """The description's model_quant_type from the types present (C8 / FAQuant are ignored).

    Spec priority, later wins: FLOAT < W16A16S < W8A16 < W8A8_DYNAMIC < W8A8_MIX < W8A8. Extension (the spec
    only covers models made of one such type): any W8A8S / W8A8SC Linear makes it that type (dense Linears are
    fallbacks), and any int4 Linear makes it W4A16 or W4A8_DYNAMIC (W4A8_DYNAMIC if both occur). No Linear
    quantized -> "FLOAT".
    """
    present = set()
    for t in types:
        if t not in QUANT_TYPES:
            raise ValueError(f"unknown quant type {t!r}; known: {', '.join(QUANT_TYPES)}")
        if t in _MODEL_TYPE_ORDER:
            present.add(t)
    return max(present, key=_MODEL_TYPE_ORDER.index, default=FLOAT)


def mindie_quantize_name(model_type: str) -> str | None:
    """config.json "quantize" for older MindIE builds: model_quant_type.lower() (what the checker accepts and
    MindIE's QuantType spells: w8a8, w8a8_dynamic, w8a8_mix, w8a16, w4a16, w4a8_dynamic, w8a8s, ...);
    None for an unquantized ("FLOAT") model, where the key is left out."""
    if model_type not in _MODEL_TYPE_ORDER:
        raise ValueError(f"{model_type!r} is not a model quant type")
    return None if model_type == FLOAT else model_type.lower()
