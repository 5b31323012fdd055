"""The numbers behind a quantization spec: one definition of qmax, scales, codes, fake-quant and the
deq_scale codec, for every integer width 2..8 (every other module calls these; none re-derives them).

Symmetric integer codes of `bits` bits use the narrow range [-qmax, qmax], qmax = 2**(bits-1) - 1 (the
most negative code is never produced: symmetric kernels assume it, and the artifact checker reads -128 / -8
as asymmetric). Codes of any width 2..8 are stored in an int8 container (`storage_dtype`); 4-bit and narrower
codes may also be packed two per byte by a backend (backends/ascend/int4.py), which is the backend's choice.

    scale  = absmax(x over the channel / group) * ratio / qmax     (ratio 1: min-max; clipping searches < 1)
             a zero scale (all-zero channel or group, or an underflow) becomes 1.0: any scale codes 0 as 0
    q      = clamp(round(x / scale), -qmax, qmax)                  (round half to even, torch.round)
    x_hat  = q * scale                                             (fake_quant = dequantize(quantize(x)))

Shapes: weights are [n, k]; a scale is [n, G] (G = 1 per-channel, k / group per-group); `group_view`
gives [n, G, k / G] so one broadcasting formula serves both. Math is float32 (callers pass float32).
"""
import numpy as np
import torch

#: integer widths a spec may ask for (TensorQuant.bits)
BITS = range(2, 9)


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be an integer in {BITS.start}..{BITS.stop - 1}, got {bits!r}")
    return bits


def qmax(bits: int) -> int:
    """Largest symmetric code: 127 (8 bits), 31 (6), 7 (4), 1 (2)."""
    return 2 ** (check_bits(bits) - 1) - 1


def code_range(bits: int, narrow: bool = True) -> tuple[int, int]:
    """(lowest, highest) code: symmetric narrow [-qmax, qmax], or the full two's-complement range."""
    top = qmax(bits)
    return (-top if narrow else -top - 1), top


def storage_dtype(bits: int) -> torch.dtype:
    """The unpacked container of `bits`-bit codes (int8 for every width 2..8)."""
    check_bits(bits)
    return torch.int8


def group_view(w: torch.Tensor, group: int) -> torch.Tensor:
    """[n, k] -> [n, G, k / G] with G = k / group (group 0: one group per row, per-channel)."""
    n, k = w.shape
    return w.reshape(n, k // (group or k), -1)


def absmax_scale(absmax: torch.Tensor, bits: int, ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """absmax * ratio / qmax, with 1.0 where that is not > 0 (zero channel or group)."""
    scale = absmax * ratio / qmax(bits)  # ratio 1.0: x * 1.0 == x exactly, so min-max is absmax / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def weight_scale(w: torch.Tensor, bits: int, group: int = 0) -> torch.Tensor:
    """Min-max symmetric scale [n, G] of weight w [n, k] (float32 math)."""
    return absmax_scale(group_view(w, group).abs().amax(-1), bits)


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, narrow: bool = True) -> torch.Tensor:
    """Codes clamp(round(x / scale), lowest, qmax) as floats (x and scale broadcast); lowest = -qmax (narrow,
    weights) or -qmax - 1 (activations: the full two's-complement range)."""
    low, high = code_range(bits, narrow)
    return torch.round(x / scale).clamp_(low, high)


def quantize_weight(w: torch.Tensor, bits: int, group: int = 0,
                    scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [n, k] in the storage dtype, scale [n, G]): `scale` given, or min-max (`weight_scale`)."""
    n, k = w.shape
    groups = group_view(w, group)
    if scale is None:
        scale = absmax_scale(groups.abs().amax(-1), bits)
    q = quantize(groups, scale.unsqueeze(-1), bits)
    return q.to(storage_dtype(bits)).reshape(n, k), scale


def column_scale(scale: torch.Tensor, k: int) -> torch.Tensor:
    """Scale [n, G] expanded to one value per weight element [n, k]."""
    return scale.repeat_interleave(k // scale.shape[1], dim=1)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 q * scale, scale [n, G] per-channel or per-group over q [n, k]."""
    return q.float() * column_scale(scale, q.shape[1])


def fake_quant(w: torch.Tensor, bits: int, group: int = 0,
               scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weight [n, k], scale [n, G]) = dequantize(quantize_weight(...)) in one pass over the
    weight (no integer codes), for searches that try many candidate scales."""
    n, k = w.shape
    groups = group_view(w, group)
    if scale is None:
        scale = absmax_scale(groups.abs().amax(-1), bits)
    s3 = scale.unsqueeze(-1)
    return (quantize(groups, s3, bits) * s3).reshape(n, k), scale


# ---- bounded temporaries ---------------------------------------------------------------------------------------
#: elements per row chunk of a full-size temporary. Code that works on a [rows, width] tensor one row at a time
#: (per-row operations: chunking changes no bit) runs `row_slices` of max(1, ROW_CHUNK_ELEMENTS // width) rows, so its
#: float32 temporaries stay near 64 MiB whatever the row count (issue 15: memory at real widths). One value for
#: the quantized kernels' token rows (backends/ascend/kernels.py) and smooth's alpha search over weight rows
#: (passes/smooth.py); each reads it at call time, so a test can monkeypatch the module that uses it.
ROW_CHUNK_ELEMENTS = 1 << 24


def row_step(width: int, elements: int | None = None, multiple: int = 1) -> int:
    """Rows per chunk of a [rows, width] temporary, the one rule: elements // width (elements: ROW_CHUNK_ELEMENTS
    unless given), rounded down to a multiple of `multiple` (at least `multiple`). `row_slices` cuts by it; the
    quantized kernels (backends/ascend/kernels.py) step their token rows by it."""
    step = (ROW_CHUNK_ELEMENTS if elements is None else int(elements)) // max(int(width), 1)
    return max(multiple, step // multiple * multiple)


def row_slices(rows: int, width: int, elements: int | None = None, multiple: int = 1) -> list[slice]:
    """[0, rows) in slices of `row_step(width, elements, multiple)` rows; one slice when rows * width <= elements
    (one empty slice when rows is 0)."""
    step = row_step(width, elements, multiple)
    return [slice(r, min(r + step, rows)) for r in range(0, max(int(rows), 1), step)]


# ---- exact int8 matrix products -------------------------------------------------------------------------------
#: float32 holds every partial sum of int8 x int8 products exactly while k * 128 * 128 <= 2**24
F32_EXACT_K = 2 ** 24 // (128 * 128)  # 1024


def _float32_matmul_is_ieee() -> bool:
    """True when CPU float32 matmuls run in float32 (not lowered to bf16 / tf32 by a precision setting)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


_INT8_NATIVE: list = []  # [bool] once decided (`int8_gemm_native`)


def _int_mm_is_exact() -> bool:
    """`torch._int_mm` returns the exact integer sums on codes at the int8 extremes, checked once: 40 rows (past
    oneDNN's small-M kernels) of k = 1024 against a float64 reference, with rows of -128 against -128 and 127
    against 127 (a kernel that widens pairs in saturating int16, as AVX2's vpmaddubsw does, fails there)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (40, 1024), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (1024, 24), generator=g, dtype=torch.int8)
    a[0], a[1], b[:, 0], b[:, 1] = -128, 127, -128, 127
    try:
        got = torch._int_mm(a, b)
    except (RuntimeError, NotImplementedError):  # no CPU kernel in this build
        return False
    return bool(torch.equal(got.to(torch.int64), (a.double() @ b.double()).to(torch.int64)))


def int8_gemm_native() -> bool:
    """True when `int8_matmul` (the int8 products of every prepared matmul and of smooth's search) runs
    `torch._int_mm` on the CPU rather than exact float32 GEMMs; decided once per process.

    "auto" (QC_INT8_GEMM unset): when the CPU has int8 dot-product instructions, which oneDNN's `_int_mm` uses
    (AVX512-VNNI or AMX tiles: torch.cpu._is_vnni_supported / _is_amx_tile_supported) and `_int_mm_is_exact`.
    Measured (one thread, 512 x 576 @ 576 x 3072, `bench/probe_int8_gemm.py`): on a Xeon with AMX, `_int_mm`
    1.7 ms against 8.7 ms for the float32 GEMM; on an AVX2-only Xeon `_int_mm` is 5-20x slower than the float32
    GEMM. QC_INT8_GEMM=native / float32 forces a side (benchmarks, tests). Both give the same integers, so the
    choice changes speed only, never a bit."""
    if not _INT8_NATIVE:
        from ..knobs import int8_gemm
        choice = int8_gemm()
        if choice == "auto":
            cpu = getattr(torch, "cpu", None)
            fast = any(bool(getattr(cpu, f, lambda: False)()) for f in ("_is_vnni_supported", "_is_amx_tile_supported"))
            native = fast and _int_mm_is_exact()
        else:
            native = choice in ("native", "onednn")  # onednn: full-sequence layers only; `_int_mm` elsewhere
        _INT8_NATIVE.append(native)
    return _INT8_NATIVE[0]


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`torch._int_mm(a, b)`: int8 [m, k] @ int8 [k, n] -> int32 [m, n], the same integers, the faster way here.

    `_int_mm` itself off the CPU, on CPUs with int8 dot products (`int8_gemm_native`), and when float32 matmuls
    may be lowered (`torch.set_float32_matmul_precision` other than "highest", or mkldnn's fp32 precision).
    Otherwise exact float32 GEMMs: without int8 dot-product instructions (AVX2 only) `_int_mm` is 5-20x slower
    than a float32 GEMM of the same shape (measured on SmolLM2's Linear shapes, 4096 rows). Every product of two
    int8 values is an integer of magnitude <= 2**14 and every partial sum of k <= F32_EXACT_K of them stays
    <= 2**24, so float32 represents each of them exactly: a float32 matmul returns the exact integer sums whatever
    its summation order or blocking. k > F32_EXACT_K is split into slices of at most F32_EXACT_K, each exact,
    summed in int32 (as `_int_mm` accumulates; callers keep k * 2**14 within int32, kernels.INT_MM_MAX_K)."""
    if a.device.type != "cpu" or not _float32_matmul_is_ieee() or int8_gemm_native():
        return torch._int_mm(a, b)
    k = a.shape[1]
    if k <= F32_EXACT_K:
        return torch.mm(a.float(), b.float()).to(torch.int32)
    slices = -(-k // F32_EXACT_K)
    step = -(-k // slices)  # even slices (1536 -> 768 + 768)
    out = None
    for k0 in range(0, k, step):
        part = torch.mm(a[:, k0:k0 + step].float(), b[k0:k0 + step].float()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


# ---- deq_scale codec: a float32 carried in an int64 (its IEEE-754 bits in the low 32 bits) ---------------------
def float32_bits_to_int64(values: torch.Tensor) -> torch.Tensor:
    """int64 [n] whose low 32 bits are the float32 bits of `values` (positive: high bits zero), i.e.
    `np.frombuffer(f32.tobytes(), np.int32).astype(np.int64)` (spec section 3, fp16 deq_scale)."""
    d = values.detach().float().reshape(-1).contiguous()
    return torch.from_numpy(np.frombuffer(d.numpy().tobytes(), dtype=np.int32).astype(np.int64).copy())


def int64_bits_to_float32(t: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Inverse of `float32_bits_to_int64` in torch ops only (kernels call it on every matmul); a float tensor
    is returned as float32. `check`: ValueError when the high 32 bits are not zero (not a float32 bit-copy of
    a positive value)."""
    if t.dtype != torch.int64:
        return t.float()
    if check and bool((t >> 32).any()):
        raise ValueError("int64 deq_scale has non-zero high 32 bits: not a float32 bit-copy")
    low = t & 0xFFFFFFFF
    # the unsigned 32-bit pattern as the signed int32 with the same bits, then reinterpreted as float32
    low = torch.where(low >= 2 ** 31, low - 2 ** 32, low)
    return low.to(torch.int32).contiguous().view(torch.float32)
