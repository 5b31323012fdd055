"""oneDNN's int8 linear on a weight packed once at load: the full-sequence int8 products with their first epilogue
step fused, bit-identical to the written-out kernels (kernels.py).

`torch.ops.onednn.qlinear_prepack(w_int8 [n, k], None)` re-lays an int8 weight into oneDNN's blocked format once;
`torch.ops.onednn.qlinear_pointwise(x_int8 [m, k], 1.0, 0, packed, w_scale f32 [n], 0, bias, 1.0, 0, float32, "none",
[], "")` then computes, in one call, the exact int32 sums `acc = x @ W^T` and the float32 output
`f32(f32(acc) * w_scale)` (plus an f32 bias, which here is only ever used with w_scale 1: `f32(acc) + bias`). That
is the first step of each epilogue the NPU kernels define (spec sec. 4): W8A8_DYNAMIC's `f32(acc) * ws` and, where
`bias_fits`, W8A8's `f32(acc + quant_bias)` (every value an integer within 2**24, so exact). The
signed int8 activation is passed with zero point 0 (oneDNN computes s8 x s8 directly; a u8 activation with zero
point 128 was measured inexact past 2**24, so it is not used). PyTorch's implementation:
aten/src/ATen/native/quantized/cpu/qlinear.cpp, `linear_int8_with_onednn_weight` (torch 2.13; these are the ops
Inductor's x86 int8 lowering calls).

Why: `torch._int_mm` re-lays the weight on every call and returns int32, and the int32 -> float32 conversion and
the scale are two more passes. Measured on the AMX host, one thread, x [512, 576] @ W [1536, 576]:
`_int_mm` + convert + `* ws` 1.05-1.26 ms, this 0.38-0.40 ms; [512, 1536] @ [576, 1536] 0.56 against 0.35 ms; at
2048 rows 5.0 against 1.5 ms (`/tmp` probe, stop 31).

`applies()` decides once per process: QC_INT8_GEMM (knobs.py) "onednn", or "auto" where `_int_mm` is native
(`qnumerics.int8_gemm_native`), and in both cases only if `_is_exact()` passes on adversarial operands; a forced
"onednn" that fails it is a QCError. Decode steps keep their row-wise kernels (layouts.py), so only full-sequence
layers read packed weights.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...errors import QCError
from ...ir import qnumerics as qn

#: fewest token rows a full-sequence layer must be going to run before its weights are packed (layouts.py
#: `prepare_layer(rows=...)`): packing re-lays every weight once, ~300 MB/s on one core (SmolLM2: 12 ms a layer,
#: 0.35 s for 30; one Qwen2.5-7B layer ~0.6 s; W4A8_DYNAMIC's per-group packs 23 ms a SmolLM2 layer), which the faster
#: products repay after about 1000 rows (W8A8_DYNAMIC, SmolLM2: 11.7 us a row a layer), 270 (W4A8_DYNAMIC) and 3400
#: (W8A8_DYNAMIC at Qwen2.5-7B widths: 0.18 ms a row saved, bench layer7b stop 31). Below it, e.g. `qcompile eval` of
#: a few short windows, the weights stay int8 for `_int_mm`; the default eval (40 x 512 rows) packs.
PACK_FROM_ROWS = 4096

# torch.ops namespaces are created on first access, so ask for the ops themselves: None on a build without them
_ONEDNN = torch.ops.onednn if all(hasattr(torch.ops.onednn, op) for op in ("qlinear_prepack", "qlinear_pointwise")) \
    else None
_DECIDED: list = []  # [bool] once decided (`applies`)
_ONES: dict = {}  # n -> float32 ones [n]: the weight scale of a bias-only product
_ZERO_POINTS: dict = {}  # n -> int32 zeros [n]: the weight zero points (symmetric int8 weights)


def _ops():
    return _ONEDNN.qlinear_prepack.default, _ONEDNN.qlinear_pointwise.default, _ONEDNN.qlinear_pointwise.binary


def is_packed(weight: Tensor) -> bool:
    """True for a weight `pack` returned (an opaque oneDNN tensor), False for any plain tensor."""
    return weight.layout == torch._mkldnn


def packed_k_n(weight: Tensor) -> tuple[int, int]:
    """(k, n) of a packed weight: oneDNN reports its shape as [k, n]."""
    return weight.shape[0], weight.shape[1]


def pack(weight: Tensor) -> Tensor:
    """The int8 weight [n, k] in oneDNN's layout (opaque; `unpack` inverts it)."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"onednn_linear.pack takes an int8 [n, k] weight, got {weight.dtype} {tuple(weight.shape)}")
    return _ops()[0](weight.contiguous(), None)


def _cached(table: dict, n: int, make) -> Tensor:
    t = table.get(n)
    if t is None:
        t = table[n] = make(n)
    return t


def scales_apply(scale: Tensor) -> bool:
    """True when `product` may take this weight scale: every element positive. A zero sum times a negative scale
    is -0 in the written-out math, and oneDNN's small-row kernels return +0 there (measured: 1 and 5 rows); with
    positive scales both are +0. Symmetric weight scales (max |w| / 127) are positive; a hand-made artifact's
    negative scale keeps the `_int_mm` path. Depends on no activation: layouts.py decides once at load."""
    return bool((scale > 0).all())


def bias_fits(k: int, bias: Tensor) -> bool:
    """True when `product(x, packed, bias=f32(bias))` equals `f32(x @ W^T + bias)` for any int8 x of width k:
    oneDNN converts the whole sum to float32 before adding the bias, so |x @ W^T| <= k * 128 * 128 and the bias
    must both be float32-exact integers and their sum too (<= 2**24; k <= 1024 at most). Stricter than
    `kernels.exact_bias_fits`, whose float32 product sums k in two slices past 1024. Depends on no activation."""
    bias_max = int(bias.to(torch.int64).abs().max()) if bias.numel() else 0
    return k * 128 * 128 + bias_max <= 2 ** 24


def product(x: Tensor, packed: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """float32 [m, n]: `f32(f32(x @ W^T) * scale)` (scale float32 [n], `scales_apply`), or with `bias` (float32
    [n] of integers) and no scale `f32(x @ W^T) + bias`, which equals `f32(x @ W^T + bias)` where `bias_fits` (the
    caller checks). x: int8 [m, k] with row-major rows (a row slice of a contiguous tensor will do)."""
    if scale is not None and bias is not None:
        raise ValueError("onednn_linear.product: a scale or a bias, not both (the order of the two would differ "
                         "from the NPU epilogue's)")
    n = packed.shape[1]
    if scale is None:
        scale = _cached(_ONES, n, torch.ones)
    zero_points = _cached(_ZERO_POINTS, n, lambda m: torch.zeros(m, dtype=torch.int32))
    return _ops()[1](x, 1.0, 0, packed, scale, zero_points, bias, 1.0, 0, torch.float32, "none", [], "")


def accumulate(x: Tensor, packed: Tensor, scale: Tensor, out: Tensor) -> Tensor:
    """`out = f32(out + f32(f32(x @ W^T) * scale))` in place, returned: oneDNN's "sum" post-op adds the scaled
    product into out in the same call (`_is_exact` checks that it rounds the product and the sum separately, as
    the written-out `out.add_(product(x, packed, scale))` does). x: int8 [m, k]; out: float32 [m, n], contiguous
    (ValueError otherwise: oneDNN reads and writes it as a dense block whatever its strides, so a strided view would
    get wrong sums and the memory beside it overwritten)."""
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"onednn_linear.accumulate: out must be a contiguous float32 tensor, got {out.dtype} "
                         f"strides {out.stride()}")
    zero_points = _cached(_ZERO_POINTS, packed.shape[1], lambda m: torch.zeros(m, dtype=torch.int32))
    res = _ops()[2](x, 1.0, 0, packed, scale, zero_points, out, None, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0,
                    "none", [], "")
    if res.data_ptr() != out.data_ptr():  # in place on this build (checked); a copy would still be the same sum
        out.copy_(res)
    return out


def unpack(packed: Tensor) -> Tensor:
    """The int8 weight [n, k] a packed weight holds, computed from it: the product of the identity codes
    (each output row one weight column, |w| <= 128: exact in float32). For tests and the prepared-vs-artifact
    check; not a fast path."""
    k, _ = packed_k_n(packed)
    return product(torch.eye(k, dtype=torch.int8), packed).t().to(torch.int8)


def _is_exact() -> bool:
    """oneDNN's product and both epilogues above equal the written-out math bit for bit on adversarial operands,
    checked once: int8 extremes (rows of -128 against -128, 127 against 127: sums past 2**24, where the float32
    conversion rounds), k past oneDNN's blocking, row counts of 1, 5 and 40, zero sums (+0), an integer bias at
    the exactness limit and `accumulate`'s two roundings; against float64 sums (exact below 2**53)."""
    try:
        g = torch.Generator().manual_seed(0)
        for m, k, n in ((40, 1100, 67), (5, 64, 16), (1, 576, 9)):
            x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
            w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
            x[0], w[0] = -128, -128
            if m > 1:
                x[1], w[1] = 127, 127
            w[2] = 0  # exact zero sums: +0 * scale, -0 for a negative scale
            acc = (x.double() @ w.double().t()).float()  # exact integers (below 2**53), rounded once to float32
            scale = torch.rand(n, generator=g) * 0.02 + 1e-4  # positive (`scales_apply`)
            packed = pack(w)
            got = product(x, packed, scale)
            want = acc * scale
            if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
                return False
            # the sum post-op: running sums of wide magnitudes (where an fma would round differently), exact
            # cancellations and zeros
            running = torch.randn(m, n, generator=g) * torch.exp2(torch.randint(-20, 20, (m, n), generator=g).float())
            running[:, :2] = -want[:, :2]
            running[:, 2] = 0.0
            summed = accumulate(x, packed, scale, running.clone())
            if not torch.equal(summed.view(torch.int32), (running + want).view(torch.int32)):
                return False
            limit = 2 ** 24 - k * 128 * 128  # the largest bias `bias_fits` admits for this k
            if limit > 0:
                bias = torch.randint(-limit, limit + 1, (n,), generator=g).float()
                bias[0] = float(limit)
                got = product(x, packed, bias=bias)
                if not torch.equal(got.view(torch.int32), (acc + bias).view(torch.int32)):
                    return False
            if not torch.equal(unpack(packed), w):
                return False
        return True
    except Exception:  # noqa: BLE001 - no oneDNN int8 linear in this build / on this CPU: the other paths run
        return False


def applies() -> bool:
    """True when the full-sequence int8 products read packed weights (module docstring); decided once per process.
    Raises QCError when QC_INT8_GEMM=onednn but oneDNN's product is missing or inexact here."""
    if not _DECIDED:
        from ...knobs import int8_gemm
        choice = int8_gemm()
        if choice == "onednn":
            if _ONEDNN is None or not _is_exact():
                raise QCError("QC_INT8_GEMM=onednn: this torch build's oneDNN int8 linear "
                              "(torch.ops.onednn.qlinear_pointwise) is missing or not exact on this CPU; "
                              "use auto, native or float32")
            _DECIDED.append(True)
        else:
            _DECIDED.append(choice == "auto" and _ONEDNN is not None and qn.int8_gemm_native() and _is_exact())
    return _DECIDED[0]
