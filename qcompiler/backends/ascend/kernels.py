"""CPU kernels that reproduce the Ascend NPU quantized ops (spec: ascend-artifact.md sec. 3 and 4).

Purpose: the executable graph runs here with the numerics the NPU kernels have, so accuracy measured
on CPU is the accuracy the deployed artifact gets. Each `*_ref` function is the spec's math written
plainly; the functions without the suffix are the fast CPU paths `torch.ops.qc.*` call, and they are
bit-identical to the reference (tests/backends/ascend/test_kernels.py checks that).

Contract (shapes as the artifact stores them; `n` outputs, `k` inputs; "..." any leading dims):
- `quantize(x, input_scale, input_offset)`: static per-tensor activation quantization as the engines
  do it, with the reciprocal rounded to x's dtype first: `recip = dtype(1 / dtype(s_x))`.
- `quant_matmul(x int8 [..., k], weight int8 [n, k], deq_scale [n] f32 or int64-encoded, quant_bias
  int32 [n])`: W8A8 static, `dtype((x @ W^T + quant_bias) * deq_scale)`.
- `dynamic_quant(x)`: per-token symmetric int8, returns `(y int8 [..., k], scale f32 [...])`.
- `quant_matmul_pertoken(...)`: W8A8_DYNAMIC matmul with per-token and per-channel scales; the weight scale and
  the float bias as the engines hold them, in the model (output) dtype.
- `quant_matmul_pergroup(...)`: W4A8_DYNAMIC two-stage per-group matmul (int8 per-token x int4 per-group).
- `weight_quant_matmul(...)`: W8A16 / W4A16 weight-only matmul (`+ offset` NPU semantics).

Integer products are exact: the accumulator is int32 on the NPU; here it is computed exactly (int32
via `torch._int_mm` when |acc| provably fits, else float64, exact below 2^53) and not wrapped, so the
two agree whenever the NPU's int32 does not overflow (k <= 131071 keeps the product in range).
Rounding is round-half-to-even everywhere (`torch.round`).

Limits: NaN/inf inputs are not handled specially (the int8 cast of NaN is undefined, as on any device);
`dynamic_quant` needs k > 0.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...ir import qnumerics as qn
from . import onednn_linear
from .int4 import unpack_int4, unpack_int4_int32

# Weight packings, as the artifact stores them (spec sec. 3).
PACK_NONE = 0  # int8 [n, k]
PACK_INT4_K = 1  # int4 packed along k: [n, ceil(k/2)] (W4A16 per-channel)
PACK_INT4_N = 2  # int4 packed along n: [ceil(n/2), k] (W4A16 per-group, W4A8_DYNAMIC)
PACK_INT4_INT32_K = 3  # int4 in int32 words along k, offset-binary: [n, k/8] (W4A16 MoE experts; int4.py)

_MAX_PRODUCT = 128 * 128  # largest |int8 * int8|
_INT32_MAX = 2**31 - 1
# `torch._int_mm` accumulates in int32: exact while k * 128 * 128 cannot exceed int32.
INT_MM_MAX_K = _INT32_MAX // _MAX_PRODUCT  # 131071
# float64 sums of integer products are exact (in any order) below 2^53.
_FLOAT64_MAX_K = 2**53 // _MAX_PRODUCT

#: elements per row chunk of a fast path's full-size temporaries (int32 accumulator, float32 epilogue or quotient):
#: the quantized kernels run over token rows in chunks of max(1, ROW_CHUNK_ELEMENTS // width) rows. Every
#: operation is per row (exact integer product, elementwise float32), so chunking changes no bit; it bounds the
#: temporaries, which otherwise were [tokens, n] int32 + float32 per Linear (issue 15: a 7B gate_proj over one
#: 16 x 512 calibration batch is 8192 x 18944: 0.6 GiB each). Defined once in ir/qnumerics.py (smooth's search
#: chunks weight rows by it too); bound here at import, so tests monkeypatch `kernels.ROW_CHUNK_ELEMENTS`. The
#: rows per chunk are `qn.row_step(width, ROW_CHUNK_ELEMENTS)` (the rule `qn.row_slices` cuts by).
ROW_CHUNK_ELEMENTS = qn.ROW_CHUNK_ELEMENTS
#: the full-sequence int8 path (`quantize_prepared` / `dynamic_quant` and, where `_int_mm` is native
#: (`qn.int8_gemm_native`), the prepared matmuls' int32 accumulator and float32 epilogue) runs a [rows, width] tensor
#: of more than CACHE_BLOCK_FROM_ELEMENTS elements in row blocks of CACHE_BLOCK_ELEMENTS: a block's temporaries
#: (1 MiB of float32) stay in the core's cache and are reused, instead of fresh [tokens, width] tensors streamed
#: through memory once per operation. Smaller tensors run whole, in one call per operation. Every operation is per
#: row, so no bit changes. Measured on SmolLM2 (`/tmp` probe of a 512-token prefill, batch 1 and 4, BENCHMARKS.md
#: stop 30), w8a8d: batch 4 at 1 thread 2.50-2.69 s whole -> 1.69-1.78 s in blocks, at 2 threads 1.72 -> 0.97 s;
#: batch 1 at 2 threads 238-244 ms whole, 265-275 ms in blocks (hence the threshold). Tests move both with
#: ROW_CHUNK_ELEMENTS (`_block_elements`: never more than it).
CACHE_BLOCK_ELEMENTS = 1 << 18
CACHE_BLOCK_FROM_ELEMENTS = 1 << 20


def _block_elements(numel: int) -> int:
    """Elements per row block of a [rows, width] operand of `numel` elements (above)."""
    return max(1, min(numel if numel <= CACHE_BLOCK_FROM_ELEMENTS else CACHE_BLOCK_ELEMENTS, ROW_CHUNK_ELEMENTS))


# --------------------------------------------------------------------------------------------------
# helpers


def decode_deq_scale(deq_scale: Tensor) -> Tensor:
    """float32 deq_scale from either encoding: float32 as is, or int64 whose low 32 bits are the
    IEEE-754 bits of a float32 (fp16 artifacts: `np.frombuffer(f32.tobytes(), np.int32).astype(int64)`)."""
    if deq_scale.dtype == torch.float32:
        return deq_scale
    if deq_scale.dtype != torch.int64:
        raise ValueError(f"deq_scale must be float32 or int64-encoded, got {deq_scale.dtype}")
    return qn.int64_bits_to_float32(deq_scale, check=False)  # the one codec (ir/qnumerics.py)


def _check_int8_pair(x: Tensor, weight: Tensor, what: str) -> None:
    if x.dtype != torch.int8 or weight.dtype != torch.int8:
        raise ValueError(f"{what}: x and weight must be int8, got {x.dtype} and {weight.dtype}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{what}: x [..., k] and weight [n, k] disagree: {tuple(x.shape)} vs {tuple(weight.shape)}"
        )


def unpack_weight(weight: Tensor, packing: int, n: int, k: int) -> Tensor:
    """int8 [n, k] weight from its stored packing (PACK_NONE, PACK_INT4_K, PACK_INT4_N or PACK_INT4_INT32_K)."""
    if packing == PACK_NONE:
        w = weight
    elif packing == PACK_INT4_K:
        w = unpack_int4(weight, dim=1, size=k)
    elif packing == PACK_INT4_N:
        w = unpack_int4(weight, dim=0, size=n)
    elif packing == PACK_INT4_INT32_K:
        w = unpack_int4_int32(weight, k)
    else:
        raise ValueError(f"unknown weight packing {packing} (0 int8, 1 int4 along k, 2 int4 along n, "
                         "3 int4 in int32 along k)")
    if w.dtype != torch.int8 or tuple(w.shape) != (n, k):
        raise ValueError(
            f"weight {tuple(weight.shape)} {weight.dtype} with packing {packing} "
            f"is not an int8 [n={n}, k={k}]"
        )
    return w


# --------------------------------------------------------------------------------------------------
# integer matmul: reference and fast path


def int_matmul_ref(x: Tensor, weight: Tensor) -> Tensor:
    """Exact `x @ weight.T` as int64 ([..., k] x [n, k] -> [..., n]), via float64 (exact below 2^53)."""
    _check_int8_pair(x, weight, "int_matmul")
    if x.shape[-1] >= _FLOAT64_MAX_K:
        raise ValueError(f"k={x.shape[-1]} too large for an exact float64 accumulation")
    return (x.double() @ weight.double().T).to(torch.int64)


def int_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """Exact `x @ weight.T` ([..., k] x [n, k] -> [..., n]); int32 when `torch._int_mm` applies (computed by
    `qnumerics.int8_matmul`: the same integers from exact float32 GEMMs, much faster on CPUs without int8 dot
    products).

    On this torch (2.13 CPU) `_int_mm` takes any 2-D int8 shapes (M=1, odd k and n, non-contiguous
    operands were all checked exact); the M > 16 / multiple-of-8 limits are CUDA-only. The one limit
    that matters for exactness is its int32 accumulator, hence k <= INT_MM_MAX_K. `weight.t()` is
    passed as a view: no per-call copy of the weight.
    """
    _check_int8_pair(x, weight, "int_matmul")
    k, n = weight.shape[1], weight.shape[0]
    if x.device.type == "cpu" and k <= INT_MM_MAX_K:
        rows = math.prod(x.shape[:-1])  # explicit: reshape(-1, 0) is ambiguous when k == 0
        acc = qn.int8_matmul(x.reshape(rows, k), weight.t())  # == torch._int_mm, float32 GEMMs (exact)
        return acc.reshape(*x.shape[:-1], n)
    return int_matmul_ref(x, weight)


#: the largest k the exact float32 product takes: one slice of k <= F32_EXACT_K, or two (see `exact_product_f32`)
EXACT_F32_MAX_K = 2 * qn.F32_EXACT_K
_F32_EXACT_INT = 2 ** 24  # float32 holds every integer of magnitude <= 2**24
_ZEROS: dict = {}  # n -> float32 zeros [n]: the +0 start of every exact product (signed zero, see below)


def exact_slice_width(k: int) -> int:
    """Width of the first (largest) k-slice `exact_product_f32` sums: k, or ceil(k / 2) past F32_EXACT_K."""
    return k if k <= qn.F32_EXACT_K else -(-k // 2)


def exact_bias_fits(k: int, bias: Tensor) -> bool:
    """True when an integer bias can be added inside `exact_product_f32`'s first slice: every partial sum
    |bias| + exact_slice_width(k) * 128 * 128 stays within float32's exact integers (depends on no activation:
    layouts.py decides once at load)."""
    bias_max = int(bias.to(torch.int64).abs().max()) if bias.numel() else 0
    return k <= EXACT_F32_MAX_K and bias_max + exact_slice_width(k) * _MAX_PRODUCT <= _F32_EXACT_INT


def _weight_k_n(weight: Tensor) -> tuple[int, int]:
    """(k, n) of an int8 weight [n, k], of its `rowwise_codes` layout ([k, n + 8], or [parts, k, n / parts + 8])
    or of its oneDNN packing (`onednn_linear.pack`)."""
    if onednn_linear.is_packed(weight):
        return onednn_linear.packed_k_n(weight)
    if weight.dtype == torch.uint8:
        if weight.dim() == 3:
            return weight.shape[1], weight.shape[0] * (weight.shape[2] - 8)
        return weight.shape[0], weight.shape[1] - 8
    return weight.shape[1], weight.shape[0]


def rowwise_layout_pays(k: int, decode: bool = True) -> bool:
    """True when a prepared int8 weight of input width k is held as `rowwise_codes`: only up to EXACT_F32_MAX_K
    do the row-wise kernel and the exact float32 product read that layout; a wider weight takes the int32 path,
    which would flip a row-wise copy back to int8 [n, k] on every call (layouts.py keeps the int8 weight then).
    The same holds for a full-sequence layer (`decode` False: no one-row products) where the int8 GEMM is native
    (`qn.int8_gemm_native`): its products are all `_int_mm`'s, which reads int8 [n, k]."""
    return k <= EXACT_F32_MAX_K and (decode or not qn.int8_gemm_native())


def exact_product_applies(x: Tensor, k: int) -> bool:
    """`exact_product_f32` gives the exact result here: CPU, IEEE float32 matmuls, k <= EXACT_F32_MAX_K."""
    return x.device.type == "cpu" and k <= EXACT_F32_MAX_K and qn._float32_matmul_is_ieee()


#: fewest token rows in a native `_int_mm` row block (`_row_step`): oneDNN's AMX kernels work in tiles of 16 rows
#: and re-lay the weight on every call, so the cache-sized blocks of a wide layer (a 7B gate_proj, n 18944: 13 rows)
#: ran its GEMM at a fraction of its speed (bench layer7b, stop 30)
INT_MM_MIN_ROWS = 256


def _row_step(exact: bool, rows: int, n: int) -> int:
    """Token rows per chunk of a prepared matmul's general path (output [rows, n]): ROW_CHUNK_ELEMENTS // n
    (bounded temporaries) for the exact float32 product; for native `_int_mm` products `_block_elements` rows, but
    at least INT_MM_MIN_ROWS (never more than the bounded chunk)."""
    bounded = qn.row_step(n, ROW_CHUNK_ELEMENTS)
    if exact or not qn.int8_gemm_native():
        return bounded
    return min(bounded, max(qn.row_step(n, _block_elements(rows * n)), INT_MM_MIN_ROWS))


def exact_product_preferred(x: Tensor, k: int) -> bool:
    """The prepared matmuls' multi-row product is `exact_product_f32` rather than the int32 path (`int_matmul`):
    where it applies and the int8 GEMM is not native (`qn.int8_gemm_native`: with int8 dot products `_int_mm` is
    4-10x faster than this float32 GEMM). The same integers either way, so the same bits."""
    return exact_product_applies(x, k) and not qn.int8_gemm_native()


# Row-wise weight codes: the int8 weight [n, k] held as uint8 [k, n + 8], row j = W[:, j] + 128 followed by the
# float32 bytes of 1.0 and -128.0: fbgemm's "8-bit fused row-wise" layout (data, float32 scale, float32 bias), so
# `torch.ops.quantized.embedding_bag_byte_rowwise_offsets` with the activation codes as per-sample weights is a
# matrix-vector product that reads the int8-sized weight directly (decode: 2-3x faster on this AVX2 host than
# widening the weight to float32 and calling a float32 GEMM; `qnumerics.int8_matmul`). Same bytes per weight as
# the int8 layout (+ 8 per k).
# Split in parts along n: uint8 [parts, k, n / parts + 8], part p the same layout of output channels
# [p * n / parts, (p + 1) * n / parts). The kernel runs its bags (one per token row, k-slice and part) in parallel,
# one thread per bag, so a decode GEMV held in one part uses one thread however many torch has; split in parts it
# uses them all, and narrow bags stream the weight faster (`rowwise_parts` decides how many). Every output
# channel is still one bag's sum over the same codes in the same order: the split changes which thread computes
# a channel, not its value, and the parts' outputs lie side by side, so the kernel's output is the [rows, n]
# product with no combining step.
_ROWWISE_TAIL = torch.tensor([1.0, -128.0], dtype=torch.float32).view(torch.uint8)
#: token rows up to which the row-wise kernel is used (measured: 1 row 0.09 ms vs 0.25 ms for [576] x [576, 1536];
#: it re-reads the weight per row, so from ~8 rows the float32 GEMM is faster)
ROWWISE_MAX_ROWS = 4
_ROWWISE_OK: list = []  # [bool] once checked (`_rowwise_kernel_is_exact`)
_BYTE_BAG = torch.ops.quantized.embedding_bag_byte_rowwise_offsets.default
_BAGS: dict = {}  # (k, rows, step, parts) -> (indices, offsets) int32 (+ the per-sample weights' int64 gather index)


def rowwise_codes(weight: Tensor, parts: int = 1) -> Tensor:
    """Row-wise layout (above) of an int8 weight [n, k]: uint8 [k, n + 8], or [parts, k, n / parts + 8] for
    parts > 1 (n must divide); `rowwise_weight` inverts it."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"rowwise_codes takes an int8 [n, k] weight, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if parts < 1 or n % parts:
        raise ValueError(f"rowwise_codes: {n} output channels do not split into {parts} parts")
    m = n // parts
    out = torch.empty(parts, k, m + 8, dtype=torch.uint8)
    # w + 128 as uint8 is w's two's-complement byte with its top bit flipped: one pass over the bytes, no int16
    # copy (4.5x faster at load; tests/backends/ascend/test_exact_product.py checks all 256 values)
    src = weight.view(torch.uint8).t().reshape(k, parts, m).transpose(0, 1)  # [parts, k, m], a view
    torch.bitwise_xor(src, 0x80, out=out[:, :, :m])
    out[:, :, m:] = _ROWWISE_TAIL
    return out.view(k, n + 8) if parts == 1 else out


def _rowwise_part_codes(packed: Tensor) -> Tensor:
    """The uint8 codes W^T + 128 [k, n] of a row-wise layout (a view for one part, else a copy)."""
    if packed.dim() == 2:
        return packed[:, :-8]
    parts, k, m8 = packed.shape
    return packed[:, :, :-8].transpose(0, 1).reshape(k, parts * (m8 - 8))


def rowwise_weight(packed: Tensor) -> Tensor:
    """The int8 weight [n, k] (a transposed view) of a `rowwise_codes` layout (q - 128: the top bit flipped back)."""
    return _rowwise_part_codes(packed).bitwise_xor(0x80).view(torch.int8).t()


#: fewest output channels a part of `rowwise_parts` holds, and the most parts. Measured on this 2-core AVX2 host
#: by `bench/probe_rowwise_parts.py` (each call streams its weight from memory, as in a decode step; results in
#: bench/results/rowwise_parts.md), us per one-token GEMV for 1 / 2 / 4 / 8 parts and a bf16 linear, 2 threads:
#: [576] x [576, 576] 154 / 138 / 90 / 86 (bf16 98); x [576, 960] 284 / 202 / 165 / 115 (139); x [576, 3072]
#: 870 / 494 / 472 / 453 (419); [1536] x [1536, 576] 231 / 260 / 149 / 134 (198); 1 thread likewise (8 parts
#: 76 / 129 / 707 / 214 against 1 part 155 / 258 / 907 / 391). One wide bag streams its rows slowly; narrow
#: ones read the same bytes 1.3-2.3x faster, even one after another on one thread.
ROWWISE_PART_MIN_CHANNELS = 64
ROWWISE_MAX_PARTS = 8


def rowwise_parts(n: int, k: int) -> int:
    """The parts `layouts.py` splits an int8-activation weight [n, k] into (`rowwise_codes`): the most of 8, 4, 2
    that divides n with at least ROWWISE_PART_MIN_CHANNELS channels a part, else 1; 1 past EXACT_F32_MAX_K (no
    row-wise layout there). A one-token GEMV is then `parts` bags (times the k-slices) for the kernel to run in
    parallel."""
    if k > EXACT_F32_MAX_K:
        return 1
    parts = ROWWISE_MAX_PARTS
    while parts > 1 and (n % parts or n // parts < ROWWISE_PART_MIN_CHANNELS):
        parts //= 2
    return parts


def _widened(weight: Tensor, k0: int, k1: int) -> Tensor:
    """float32 [k1 - k0, n]: the weight codes of k-slice [k0, k1) from int8 [n, k] or a row-wise layout."""
    if weight.dtype == torch.uint8:
        if weight.dim() == 2:
            return weight[k0:k1, :-8].float().sub_(128)  # exact: integers in [0, 255] - 128
        parts, _, m8 = weight.shape
        part = weight[:, k0:k1, :-8].transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        return part.view(k1 - k0, parts * (m8 - 8)).sub_(128)
    return weight[:, k0:k1].t().float()


def _bag_operands(k: int, rows: int, step: int, parts: int) -> tuple:
    """The kernel's bags for `_rowwise_bag`, in output order (token row, k-slice, part): indices into the
    [parts * k, m + 8] table, bag offsets, and for parts > 1 the gather index of each index's per-sample weight
    (its token row's code at that k) in the flattened codes."""
    slices = range(0, k, step)
    starts, idx, widx = [], [], []
    pos = 0
    for r in range(rows):
        for k0 in slices:
            k1 = min(k0 + step, k)
            for p in range(parts):
                starts.append(pos)
                pos += k1 - k0
                idx.append(torch.arange(p * k + k0, p * k + k1, dtype=torch.int32))
                widx.append(torch.arange(r * k + k0, r * k + k1, dtype=torch.int64))
    return torch.cat(idx), torch.tensor(starts, dtype=torch.int32), torch.cat(widx) if parts > 1 else None


def _bags(k: int, rows: int, step: int, parts: int) -> tuple:
    """`_bag_operands`, made once per (k, rows, step, parts) and kept in _BAGS."""
    key = (k, rows, step, parts)
    bag = _BAGS.get(key)
    if bag is None:
        bag = _BAGS[key] = _bag_operands(k, rows, step, parts)
    return bag


def _rowwise_bag(codes_f32: Tensor, packed: Tensor, step: int) -> Tensor:
    """float32 [rows * slices, n] (rows: the product of codes_f32's leading dims): for every token row, the
    exact sums over each k-slice of width `step` (all parts of a split layout side by side: output channel c of
    part p is column p * n / parts + c)."""
    k = codes_f32.shape[-1]  # codes [..., k]: every leading dim a token row
    rows = codes_f32.numel() // k
    parts = 1 if packed.dim() == 2 else packed.shape[0]
    bag = _bags(k, rows, step, parts)
    flat = codes_f32.reshape(-1)
    if parts == 1:
        return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            packed, bag[0], bag[1], False, 0, False, flat, None, False)
    out = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        packed.view(-1, packed.shape[2]), bag[0], bag[1], False, 0, False, flat.index_select(0, bag[2]), None, False)
    return out.view(-1, parts * (packed.shape[2] - 8))  # [rows * slices * parts, m] -> [rows * slices, n]


def _rowwise_kernel_is_exact() -> bool:
    """Checked once per process: the row-wise kernel returns the exact integer sums, +0 for zero, on codes at
    the int8 extremes with k at the slice limit (fbgemm's kernel, src/EmbeddingSpMDM.cc and its autovec /
    reference twins, computes `out = fma(scale * w, q, out + bias * w)` from out = +0: with scale 1, bias -128,
    w = x each step adds the exact integer x * (q - 128), every partial sum an integer <= k * 2**14 <= 2**24,
    so every operation is exact and the result is +0 for zero). Any other kernel (another build, platform or
    version) that disagrees here is not used: the float32 GEMM runs instead."""
    if not _ROWWISE_OK:
        ok = False
        try:
            g = torch.Generator().manual_seed(0)
            k = qn.F32_EXACT_K
            w = torch.randint(-128, 128, (19, k), generator=g, dtype=torch.int8)
            w[:4] = torch.tensor([-128, 127, -128, 0], dtype=torch.int8)[:, None]
            x = torch.randint(-128, 128, (3, k), generator=g, dtype=torch.int8)
            x[0], x[1] = -128, 127
            x[2] = x[2].clamp(min=-127)
            x[2, : k // 2] = -x[2, k // 2:]  # exact zero sums against the constant rows 0-3
            got = _rowwise_bag(x.float(), rowwise_codes(w), k)
            want = int_matmul_ref(x, w).to(torch.float32)
            ok = bool(torch.equal(got, want)) and not bool(torch.signbit(got[got == 0]).any()) and bool(
                (got[2, 3] == 0).item())
        except Exception:  # noqa: BLE001 - no quantized engine in this build: the GEMM path runs
            ok = False
        _ROWWISE_OK.append(ok)
    return _ROWWISE_OK[0]


_RW_PLANS: dict = {}  # (x.shape, packed.shape) -> `_rowwise_plan`


def _rowwise_plan(x: Tensor, packed: Tensor) -> tuple:
    """What `_rowwise_product` computes once per shape: the bags of `_bag_operands` (indices, offsets); how
    the bags' per-sample weights (every index's code, in bag order: token row, k-slice, part) come from x: x itself
    for one part, else `parts` copies of each k-slice side by side, `torch.cat([x.view(*lead, slices, 1, step)] *
    parts, -2)` (equal slices; measured 4-10x faster than a gather along x's last dim), else the gather of
    `_bag_operands` over x's flattened codes; whether the kernel reads those weights in memory order as they
    come, in x's rank (checked here once against flattened ones, so a call needs no flattening); and the view of
    the bags' output as [*lead, n] or [*lead, 2, n] (two k-slices)."""
    k = x.shape[-1]
    rows = x.numel() // k
    parts = 1 if packed.dim() == 2 else packed.shape[0]
    step = exact_slice_width(k)
    bag = _bags(k, rows, step, parts)
    lead = tuple(x.shape[:-1])
    copies = lead + (k // step, 1, step) if parts > 1 and k % step == 0 else None
    table = packed if parts == 1 else packed.view(-1, packed.shape[2])
    codes = torch.arange(rows * k, dtype=torch.float32).remainder_(255).sub_(127)  # codes-like probe
    flat = codes if bag[2] is None else codes.index_select(0, bag[2])
    if copies is not None:
        shaped = torch.cat([codes.view(copies)] * parts, -2)
    else:
        shaped = codes.view(x.shape) if bag[2] is None else flat
    in_rank = torch.equal(_BYTE_BAG(table, bag[0], bag[1], False, 0, False, shaped, None, False),
                          _BYTE_BAG(table, bag[0], bag[1], False, 0, False, flat, None, False))
    n = _weight_k_n(packed)[1]
    return bag[0], bag[1], bag[2], copies, in_rank, lead + ((2, n) if step < k else (n,)), step < k


def _rowwise_product(x: Tensor, packed: Tensor, bias_f32: Tensor | None) -> Tensor:
    """`exact_product_f32` from the row-wise kernel: x float32 codes [*lead, k] (at most ROWWISE_MAX_ROWS token
    rows), k <= EXACT_F32_MAX_K, a `rowwise_codes` layout, `_rowwise_kernel_is_exact()` (the callers check:
    `_decode_rowwise`); float32 [*lead, n], the bags' exact sums over each k-slice, the bias joining the first,
    the second slice added once. Its per-shape work is planned once (`_rowwise_plan`): 3 torch calls a product in
    one part and one k-slice, 5 in parts, +2 for a second k-slice (a decode step is mostly per-call overhead)."""
    key = (x.shape, packed.shape)
    plan = _RW_PLANS.get(key)
    if plan is None:
        plan = _RW_PLANS[key] = _rowwise_plan(x, packed)
    idx, offsets, gather, copies, in_rank, shape, two = plan
    if gather is None:
        weights = x if in_rank and x.is_contiguous() else x.reshape(-1)
    elif copies is not None and in_rank:
        weights = torch.cat([x.reshape(copies)] * (packed.shape[0]), -2)
    else:
        weights = x.reshape(-1).index_select(0, gather)
    table = packed if packed.dim() == 2 else packed.view(-1, packed.shape[2])
    acc = _BYTE_BAG(table, idx, offsets, False, 0, False, weights, None, False).view(shape)
    if not two:
        return acc if bias_f32 is None else acc.add_(bias_f32)
    first, second = acc.unbind(-2)
    return torch.add(first if bias_f32 is None else first.add_(bias_f32), second)


def _decode_rowwise(x: Tensor, weight: Tensor, k: int) -> bool:
    """True when a prepared matmul's product is the row-wise kernel's (a decode step): the weight row-wise,
    at most ROWWISE_MAX_ROWS token rows of float32 codes on the CPU, k within the exact slices. The float32
    matmul precision setting does not matter here (no matmul runs), so `exact_product_applies` is not asked."""
    return (weight.dtype == torch.uint8 and x.dtype == torch.float32 and 0 < k <= EXACT_F32_MAX_K
            and x.numel() <= ROWWISE_MAX_ROWS * k and x.device.type == "cpu" and _rowwise_kernel_is_exact())


def exact_product_f32(codes: Tensor, weight: Tensor, bias_f32: Tensor | None = None) -> Tensor:
    """float32 [rows, n] equal, bit for bit, to `f32(x @ W.T (+ bias))` with the integer sum exact, i.e. to
    the int32/int64 accumulator of `int_matmul` (+ the integer bias) converted to float32, when
    `exact_product_applies(codes, k)` (and `exact_bias_fits(k, bias)` for a bias).

    codes: the activation codes [rows, k] as int8 or as integer-valued float32 (|code| <= 128, what
    `dynamic_quant_codes` / `quantize_codes` return); weight: int8 [n, k], or its `rowwise_codes` layout,
    which up to ROWWISE_MAX_ROWS rows runs the row-wise kernel (above) instead of widening the weight.
    Why exact: every product of two codes is an integer of magnitude <= 2**14 and every partial sum of the
    first k-slice (bias + at most exact_slice_width(k) products) or of the second stays an integer <= 2**24, so
    every float32 operation, in any order or blocking, with or without fma, is exact. With one slice the result
    is that integer. With two, `a + b` is one float32 addition of two exact integers: IEEE rounds the exact sum
    once, to nearest even, exactly as the int -> float32 conversion of the exact integer does (the bias joins the
    first slice, so there is still one rounding). Signed zero: every sum starts from +0 (`addmm`'s input, the
    row-wise kernel's accumulator) or the bias, and an IEEE sum with a +0 term is never -0, so an exact zero is
    +0 as `f32(int 0)` is (a plain mm could return -0 from products like -3 * 0).
    tests/backends/ascend/test_exact_product.py checks all of this bit for bit on adversarial codes."""
    rows, k = codes.shape
    xf = codes if codes.dtype == torch.float32 else codes.float()
    if weight.dtype == torch.uint8 and rows <= ROWWISE_MAX_ROWS and _rowwise_kernel_is_exact():
        return _rowwise_product(xf, weight, bias_f32)
    step = exact_slice_width(k)
    n = _weight_k_n(weight)[1]
    if bias_f32 is None:
        bias_f32 = _ZEROS.get(n)
        if bias_f32 is None:
            bias_f32 = _ZEROS[n] = torch.zeros(n)
    if step == k:
        return torch.addmm(bias_f32, xf, _widened(weight, 0, k))
    acc = torch.addmm(bias_f32, xf[:, :step], _widened(weight, 0, step))
    return acc.add_(torch.mm(xf[:, step:], _widened(weight, step, k)))


# --------------------------------------------------------------------------------------------------
# qc::quantize


def quantize_reciprocal(input_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 of `dtype(1 / dtype(s_x))`: the multiplier npu_quantize gets (depends on no activation)."""
    return (1 / input_scale.to(dtype)).to(dtype).float()


def quantize_prepared(x: Tensor, recip: Tensor, offset: Tensor) -> Tensor:
    """`quantize` with `recip = quantize_reciprocal(input_scale, x.dtype)` and `offset = f32(input_offset)`
    computed beforehand (layouts.py does it once at load)."""
    # torch.mul promotes x to float32 inside the kernel (exact): one pass instead of x.float() then *;
    # the in-place ops below keep the same float32 rounding steps as the written-out formula.
    k = x.shape[-1] if x.dim() else 1
    block = _block_elements(x.numel())
    if x.numel() <= block or x.dim() < 1:
        y = _float32_copy(x).mul_(recip)
        y.add_(offset).round_().clamp_(-128, 127)
        return y.to(torch.int8)
    x2 = x.reshape(math.prod(x.shape[:-1]), k)  # rows in cache-sized blocks: the float32 quotient of one at a time
    out = torch.empty(x2.shape, dtype=torch.int8)
    step = qn.row_step(k, block)
    for start in range(0, x2.shape[0], step):
        y = _float32_copy(x2[start:start + step]).mul_(recip)
        y.add_(offset).round_().clamp_(-128, 127)
        out[start:start + step] = y
    return out.reshape(x.shape)


def quantize_codes(x: Tensor, recip: Tensor, offset: Tensor) -> Tensor:
    """`quantize_prepared`'s codes without the int8 cast, as the float32 integers they are, when x has at most
    ROW_CHUNK_ELEMENTS elements (decode, short prefill); else its int8 result. Same operations, same values:
    for the prepared matmuls, which take either (layouts.py routes a quantize here when they are its only users)."""
    if x.numel() <= ROW_CHUNK_ELEMENTS or x.dim() < 1:
        y = torch.mul(x, recip)
        return y.add_(offset).round_().clamp_(-128, 127)
    return quantize_prepared(x, recip, offset)


def _float32_copy(x: Tensor) -> Tensor:
    """A new float32 tensor of x's values (exact: bfloat16 / float16 / float32 widen exactly), for the in-place
    float32 ops of `quantize_prepared` and `dynamic_quant`. Widening first is one vectorized conversion; a
    mixed-dtype `torch.mul(x_bf16, recip_f32)` / `torch.div(x_bf16, s_f32)` runs aten's casting loop over every
    element (`[512, 1536]` bfloat16 / float32 [512, 1] at 1 thread: 1.45 ms, against 0.1-0.2 ms for the conversion;
    `/tmp` probe, stop 31). The same float32 operands, so the same bits."""
    return x.to(torch.float32, copy=True)


def _f32(acc: Tensor) -> Tensor:
    """The float32 of an exact integer accumulator (int32 or int64), rounded once as `.to(float32)` does.

    The epilogues convert first and then run same-dtype float32 ops in place, ending with one `copy_` into the
    output dtype, rather than `torch.mul(acc_int32, scale_f32, out=out_bf16)`: the same roundings (int ->
    float32, each float32 product, float32 -> output dtype), but mixed-dtype operands send aten's elementwise
    kernels down their unvectorized casting loop. Measured on the AMX host, 1 thread, `[512, 1536]`: int32 *
    float32 [n] then * [rows, 1] into bfloat16 2.40 ms, convert-then-in-place 0.64 ms (`/tmp` probe, stop 31)."""
    return acc.to(torch.float32)


def _int8_codes(codes: Tensor) -> Tensor:
    """int8 codes from int8 or from the integer-valued float32 of `*_codes` (exact: integers in [-128, 127])."""
    return codes if codes.dtype == torch.int8 else codes.to(torch.int8)


def quantize(x: Tensor, input_scale: Tensor, input_offset: Tensor) -> Tensor:
    """Static per-tensor int8 quantization as npu_quantize runs it in the engines (spec sec. 3 W8A8).

    `recip = dtype(1 / dtype(s_x))` (the engines hold input_scale in the model dtype and pass its
    reciprocal, again in the model dtype), then `clamp(rint(f32(x) * f32(recip) + f32(o_x)), -128, 127)`.
    """
    return quantize_prepared(x, quantize_reciprocal(input_scale, x.dtype), input_offset.float())


# --------------------------------------------------------------------------------------------------
# qc::quant_matmul (W8A8 static)


def quant_matmul_ref(
    x: Tensor, weight: Tensor, deq_scale: Tensor, quant_bias: Tensor, output_dtype: torch.dtype
) -> Tensor:
    """`dtype(f32(x @ W^T + quant_bias) * deq_scale_f32)`, integer part exact (spec sec. 4)."""
    acc = int_matmul_ref(x, weight) + quant_bias.to(torch.int64)
    return (acc.to(torch.float32) * decode_deq_scale(deq_scale)).to(output_dtype)


def quant_bias_accumulator(k: int, quant_bias: Tensor) -> Tensor:
    """quant_bias in the integer dtype the fast path adds it in: int32 when `|x @ W^T| + |bias|` provably
    fits int32 for this k, else int64 (depends on no activation)."""
    return quant_bias.to(torch.int32 if _int32_sum_safe(k, quant_bias) else torch.int64)


def quant_matmul_prepared(
    x: Tensor, weight: Tensor, deq_scale_f32: Tensor, quant_bias_acc: Tensor, output_dtype: torch.dtype,
    quant_bias_f32: Tensor | None = None,
) -> Tensor:
    """`quant_matmul` with `deq_scale_f32 = decode_deq_scale(deq_scale)` and `quant_bias_acc =
    quant_bias_accumulator(k, quant_bias)` computed beforehand (layouts.py does it once at load); x: int8 codes
    or the float32 codes of `quantize_codes`; weight: int8 [n, k], its `rowwise_codes` layout or its oneDNN
    packing (`onednn_linear.pack`, which needs `quant_bias_f32` and `onednn_linear.bias_fits`: layouts.py checks).
    `quant_bias_f32` (the bias as float32, given only when `exact_bias_fits(k, quant_bias)`): the product and the
    bias come from `exact_product_f32` or `onednn_linear.product`, which equal f32(the exact integer sum) bit for
    bit, so `* deq_scale` rounds the same float32 value."""
    k, n = _weight_k_n(weight)
    packed = onednn_linear.is_packed(weight)
    if packed and quant_bias_f32 is None:
        raise ValueError("quant_matmul_prepared: a oneDNN-packed weight needs quant_bias_f32 (exact_bias_fits)")
    if quant_bias_f32 is not None and _decode_rowwise(x, weight, k):  # decode: no chunks, fewest calls
        # f32(acc * deq_scale) rounded to the output dtype once, as the general path's copy_ does
        return _rowwise_product(x, weight, quant_bias_f32).mul_(deq_scale_f32).to(output_dtype)
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, k)
    out = torch.empty(rows, n, dtype=output_dtype)
    exact = quant_bias_f32 is not None and not packed and exact_product_preferred(x, k)
    if not exact and weight.dtype == torch.uint8:
        weight = rowwise_weight(weight)
    step = _row_step(exact, rows, n)
    for start in range(0, rows, step):  # token rows in chunks: bounds the accumulator
        xs, os = (x2, out) if rows <= step else (x2[start:start + step], out[start:start + step])
        if exact:
            os.copy_(exact_product_f32(xs, weight, quant_bias_f32).mul_(deq_scale_f32))
            continue
        if packed:
            os.copy_(onednn_linear.product(_int8_codes(xs), weight, bias=quant_bias_f32).mul_(deq_scale_f32))
            continue
        acc = int_matmul(_int8_codes(xs), weight)
        if acc.dtype == torch.int32 and quant_bias_acc.dtype != torch.int32:
            acc = acc.to(torch.int64)
        acc.add_(quant_bias_acc)
        os.copy_(_f32(acc).mul_(deq_scale_f32))  # f32(acc * deq_scale), then one rounding to the output dtype
    return out.reshape(*x.shape[:-1], n)


def quant_matmul(
    x: Tensor, weight: Tensor, deq_scale: Tensor, quant_bias: Tensor, output_dtype: torch.dtype
) -> Tensor:
    """Fast path of `quant_matmul_ref`, bit-identical: `torch._int_mm` for the product, then the bias
    in int32 when the sum provably cannot overflow (else int64). Both integer sums are exact and the
    integer -> float32 conversion rounds the same exact value, so the result equals the reference."""
    return quant_matmul_prepared(x, weight, decode_deq_scale(deq_scale),
                                 quant_bias_accumulator(x.shape[-1], quant_bias), output_dtype)


def _int32_sum_safe(k: int, bias: Tensor) -> bool:
    """True when |x @ W^T| + |bias| <= int32 max for any int8 operands with this k."""
    bias_max = int(bias.to(torch.int64).abs().max()) if bias.numel() else 0
    return k * _MAX_PRODUCT + bias_max <= _INT32_MAX


# --------------------------------------------------------------------------------------------------
# qc::dynamic_quant


def _check_dynamic_input(x: Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"dynamic_quant needs a non-empty last dim, got shape {tuple(x.shape)}")


def dynamic_quant_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token symmetric int8 (npu_dynamic_quant): per row over the last dim
    `s = max|f32(x)| / 127` in float32 (s == 0 -> 1), `y = clamp(round(f32(x) / s), -128, 127)`.
    Returns `(y int8 [..., k], s float32 [...])`."""
    _check_dynamic_input(x)
    xf = x.float()
    s = xf.abs().amax(dim=-1) / 127
    s = torch.where(s == 0, torch.ones_like(s), s)  # all-zero rows quantize to zeros with scale 1
    y = torch.round(xf / s.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return y, s


_F32, _U8 = torch.float32, torch.uint8
_DQ_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_F127 = torch.tensor([127.0])


def dynamic_quant_codes(x: Tensor, column: bool = False) -> tuple[Tensor, Tensor]:
    """`dynamic_quant` with the codes left as the float32 integers they are (no int8 cast) when x has at most
    ROW_CHUNK_ELEMENTS elements (decode, short prefill); else `dynamic_quant` itself. Same operations, same
    values: for the prepared matmuls, which take either (layouts.py routes a dynamic_quant here when they are the
    only users of its codes). `column`: the scale as [..., 1] instead of [...] (the same values; layouts.py asks
    for it when only prepared matmuls read the scale, which broadcast it so: two shape calls fewer a Linear)."""
    _check_dynamic_input(x)
    if x.numel() > ROW_CHUNK_ELEMENTS:
        q, s = dynamic_quant(x)
        return (q, s.unsqueeze(-1)) if column else (q, s)
    if x.dtype not in _DQ_DTYPES:
        s = x.abs().amax(dim=-1).float().div_(127)
        s.masked_fill_(s == 0, 1.0)
        s = s.unsqueeze(-1)
        return torch.div(x, s).round_().clamp_(-128, 127), s if column else s.squeeze(-1)
    # 6 torch calls (bfloat16 / float16; 7 for float32) instead of 10, the same values: max|x| of one token row in
    # one reduction (the infinity norm: max of |x| with NaN propagated as amax does; exact in x's dtype, kept as a
    # [..., 1] column for the division; of several rows |x| then amax, as fast in one row and 18x faster in 42 rows
    # of 576 bf16, where the norm's kernel is slow); f32(max) / 127 in float32 in one call (_F127 has a dimension,
    # so torch.div promotes to float32 and divides the widened max as `.float().div_(127)` does)
    if x.numel() == x.shape[-1]:
        m = torch.linalg.vector_norm(x, math.inf, -1, True)
    else:
        m = x.abs().amax(-1, keepdim=True)
    s = torch.div(m, _F127)
    s.masked_fill_(s == 0, 1.0)  # all-zero rows quantize to zeros with scale 1
    q = torch.div(x, s).round_()
    if x.dtype is _F32:
        q.clamp_(-128, 127)
    # else the clamp changes no value: a nonzero bfloat16 / float16 max is >= 2**-133, so m / 127 >= 2**-140 is a
    # float32 with at most 2**-150 rounding error (relative <= 2**-10) and |x / s| <= 127 / (1 - 2**-10) < 127.5
    # rounds to at most 127; an infinite max gives s = inf and quotients +-0 or NaN, a NaN max NaN (clamp keeps NaN)
    return q, s if column else s.squeeze(-1)


def dynamic_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """Fast path of `dynamic_quant_ref`, bit-identical: no float32 copy of x. |x| and its row max are
    exact in x's dtype (so is their widening to float32), and torch.div promotes x to float32 inside
    the kernel, dividing the same float32 values; round/clamp run in place."""
    _check_dynamic_input(x)
    block = _block_elements(x.numel())
    if x.numel() <= block:
        s = x.abs().amax(dim=-1).float().div_(127)
        s.masked_fill_(s == 0, 1.0)  # all-zero rows quantize to zeros with scale 1
        y = _float32_copy(x).div_(s.unsqueeze(-1))
        return y.round_().clamp_(-128, 127).to(torch.int8), s
    k = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), k)
    out = torch.empty(x2.shape, dtype=torch.int8)
    s = torch.empty(x2.shape[0], dtype=torch.float32)
    step = qn.row_step(k, block)
    for start in range(0, x2.shape[0], step):  # |x|, its max and the float32 quotient of one row block at a time
        r = slice(start, start + step)
        sr = x2[r].abs().amax(dim=-1).float().div_(127)
        sr.masked_fill_(sr == 0, 1.0)
        s[r] = sr
        out[r] = _float32_copy(x2[r]).div_(sr.unsqueeze(-1)).round_().clamp_(-128, 127)
    return out.reshape(x.shape), s.reshape(x.shape[:-1])


# --------------------------------------------------------------------------------------------------
# qc::quant_matmul_pertoken (W8A8_DYNAMIC, W4A8_DYNAMIC)


def _pertoken_weight(weight: Tensor, weight_scale: Tensor, packing: int, k: int) -> Tensor:
    if packing not in (PACK_NONE, PACK_INT4_N):
        raise ValueError(f"quant_matmul_pertoken takes packing 0 (int8) or 2 (int4 along n), got {packing}")
    return unpack_weight(weight, packing, weight_scale.shape[0], k)


def pertoken_operands(
    weight_scale: Tensor, bias: Tensor | None, output_dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """(weight_scale float32 [n], bias float32 or None) as the epilogue reads them: as the engines hold them,
    in the model (output) dtype, widened to float32 (vLLM-Ascend W8A8_DYNAMIC passes its params_dtype
    weight_scale and Linear bias to npu_quant_matmul; MindIE casts both on load, atb_llm/utils/weights.py
    `correct_tensor_dtype`). Depends on no activation: layouts.py computes it once at load."""
    ws = weight_scale.to(output_dtype).float().reshape(weight_scale.shape[0])
    return ws, None if bias is None else bias.to(output_dtype).float()


def _pertoken_epilogue(
    acc: Tensor,
    weight_scale: Tensor,
    pertoken_scale: Tensor,
    bias: Tensor | None,
    output_dtype: torch.dtype,
) -> Tensor:
    # float32, left to right: ((f32(acc) * ws) * pertoken_scale) + b, then one rounding to the output dtype
    # (ws, b: pertoken_operands).
    ws, b = pertoken_operands(weight_scale, bias, output_dtype)
    y = acc.to(torch.float32) * ws * pertoken_scale.float().unsqueeze(-1)
    if b is not None:
        y = y + b
    return y.to(output_dtype)


def quant_matmul_pertoken_ref(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    pertoken_scale: Tensor,
    bias: Tensor | None,
    packing: int,
    output_dtype: torch.dtype,
) -> Tensor:
    """npu_quant_matmul with pertoken_scale, in float32 and in this order:
    `y = ((f32(x @ W^T) * ws[n]) * pertoken_scale[..., None]) + b`, then `y.to(output_dtype)`, with
    `ws = f32(dtype(weight_scale))`, `b = f32(dtype(bias))` (dtype = output_dtype, the model dtype).
    `x @ W^T` is exact (int); weight int8 [n, k] or int4 packed along n."""
    w = _pertoken_weight(weight, weight_scale, packing, x.shape[-1])
    return _pertoken_epilogue(int_matmul_ref(x, w), weight_scale, pertoken_scale, bias, output_dtype)


def quant_matmul_pertoken_prepared(
    x: Tensor,
    weight_int8: Tensor,
    weight_scale_f32: Tensor,
    pertoken_scale: Tensor,
    bias_f32: Tensor | None,
    output_dtype: torch.dtype,
) -> Tensor:
    """`quant_matmul_pertoken` with the weight unpacked to int8 [n, k] and `weight_scale_f32, bias_f32 =
    pertoken_operands(...)` computed beforehand (layouts.py does it once at load); x: int8 codes or the float32
    codes of `dynamic_quant_codes`; weight_int8: int8 [n, k], its `rowwise_codes` layout or its oneDNN packing
    (`onednn_linear.pack`: the product and `* weight_scale` in one call, `onednn_linear.product`).

    Same float32 operations in the same order as the reference epilogue, fewer memory passes: the product is
    `exact_product_f32` (float32 equal to f32(exact integer)) where it applies, else int32 from `int_matmul`
    (int32 * float32 promotes inside one kernel: the same int -> float32 rounding as `.to(float32)`); the
    second product and the bias run in place, and without a bias the last product stores straight into the
    output dtype (the same float32 -> dtype rounding as `.to()`)."""
    k, n = _weight_k_n(weight_int8)
    if _decode_rowwise(x, weight_int8, k):  # decode: the same operations without the chunk loop, fewest calls
        y = _rowwise_product(x, weight_int8, None).mul_(weight_scale_f32)  # [*lead, n]
        lead = x.shape[:-1]
        if pertoken_scale.shape == lead:  # [*lead] -> [*lead, 1]; `dynamic_quant_codes(column=True)` gives that
            scale = pertoken_scale.unsqueeze(-1)
        else:
            scale = pertoken_scale if pertoken_scale.shape == lead + (1,) else pertoken_scale.reshape(*lead, 1)
        y.mul_(scale if scale.dtype is _F32 else scale.float())
        # f32 -> output dtype once, as the general path's copy_ rounds it
        return (y if bias_f32 is None else y.add_(bias_f32)).to(output_dtype)
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, k)
    scale = pertoken_scale.float().reshape(-1, 1)
    out = torch.empty(rows, n, dtype=output_dtype)
    packed = onednn_linear.is_packed(weight_int8)
    exact = not packed and exact_product_preferred(x, k)
    if not exact and weight_int8.dtype == torch.uint8:
        weight_int8 = rowwise_weight(weight_int8)
    step = _row_step(exact, rows, n)
    for start in range(0, rows, step):  # token rows in chunks: bounds the int32 / float32 temporaries
        if rows <= step:  # one chunk (decode): no slicing
            xs, ss, os = x2, scale, out
        else:
            r = slice(start, start + step)
            xs, ss, os = x2[r], scale[r], out[r]
        if exact:
            y = exact_product_f32(xs, weight_int8).mul_(weight_scale_f32)
        elif packed:
            y = onednn_linear.product(_int8_codes(xs), weight_int8, weight_scale_f32)
        else:
            y = _f32(int_matmul(_int8_codes(xs), weight_int8)).mul_(weight_scale_f32)
        y.mul_(ss)
        os.copy_(y if bias_f32 is None else y.add_(bias_f32))  # one rounding to the output dtype
    return out.reshape(*x.shape[:-1], n)


def quant_matmul_pertoken(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    pertoken_scale: Tensor,
    bias: Tensor | None,
    packing: int,
    output_dtype: torch.dtype,
) -> Tensor:
    """Fast path of `quant_matmul_pertoken_ref` (`torch._int_mm` product), bit-identical to it."""
    w = _pertoken_weight(weight, weight_scale, packing, x.shape[-1])
    ws, b = pertoken_operands(weight_scale, bias, output_dtype)
    return quant_matmul_pertoken_prepared(x, w, ws, pertoken_scale, b, output_dtype)


# --------------------------------------------------------------------------------------------------
# Sibling Linears in one call (layouts.py `merge_siblings`): q/k/v, gate/up


def merged_outputs(y: Tensor, widths: tuple) -> tuple:
    """The outputs [..., widths[i]] of Linears whose weights were concatenated along n, from their merged output
    y [..., sum(widths)]: each a contiguous tensor (a view when y has one token row, where a slice of the last
    dim is contiguous; else a copy, so every reader gets the layout an unmerged Linear returned)."""
    return tuple(t.contiguous() for t in y.split(widths, dim=-1))


def quant_matmul_pertoken_merged(
    x: Tensor, weight_int8: Tensor, weight_scale_f32: Tensor, pertoken_scale: Tensor, bias_f32: Tensor | None,
    output_dtype: torch.dtype, widths: tuple,
) -> tuple:
    """`quant_matmul_pertoken_prepared` of sibling Linears that read the same codes and pertoken_scale, with
    their prepared weights, weight scales and biases concatenated along n (layouts.py): one product instead of
    one per Linear. Bit-identical to the separate calls: every output channel is its own exact integer sum
    (`exact_product_f32`: exact in any order or blocking) or the row-wise kernel's bag over the same codes in
    the same order (`rowwise_codes`: the split into parts changes which thread computes a channel, not its
    value), and the epilogue is elementwise per (token, channel) with that channel's own scale and bias."""
    return merged_outputs(
        quant_matmul_pertoken_prepared(x, weight_int8, weight_scale_f32, pertoken_scale, bias_f32, output_dtype),
        widths)


def quant_matmul_merged(
    x: Tensor, weight: Tensor, deq_scale_f32: Tensor, quant_bias_acc: Tensor, output_dtype: torch.dtype,
    quant_bias_f32: Tensor | None, widths: tuple,
) -> tuple:
    """`quant_matmul_prepared` (W8A8 static) of sibling Linears that read the same quantized codes, their
    prepared tensors concatenated along n (layouts.py); bit-identical to the separate calls for the reasons
    `quant_matmul_pertoken_merged` gives (the integer bias is per channel; `quant_bias_accumulator` of the
    concatenation picks int32 only when every channel's sum fits, and either dtype holds the exact sum)."""
    return merged_outputs(
        quant_matmul_prepared(x, weight, deq_scale_f32, quant_bias_acc, output_dtype, quant_bias_f32), widths)


def quant_matmul_pergroup_merged(
    x: Tensor, weight_rowwise: Tensor, scale_t: Tensor, pertoken_scale: Tensor, output_dtype: torch.dtype,
    fold: bool, widths: tuple,
) -> tuple:
    """`quant_matmul_pergroup_prepared` (W4A8_DYNAMIC per-group) of sibling Linears that read the same codes,
    their row-wise weights (one part) and two-stage scales [G, 1, n] concatenated along n (layouts.py), `fold`
    the same for all (then it holds for the concatenation: every channel's scales positive, or off). Every
    channel's group sums and their fold are its own, in the same order: bit-identical to the separate calls."""
    return merged_outputs(
        quant_matmul_pergroup_prepared(x, weight_rowwise, scale_t, pertoken_scale, output_dtype, fold), widths)


# --------------------------------------------------------------------------------------------------
# qc::quant_matmul_pergroup (W4A8_DYNAMIC, two-stage per-group)

# Token rows per block of the float32 group sums: keeps a block's [rows, n] partial sum in cache
# (measured 6x faster than whole-tensor group sums for 4096 x 1536 x 576, group 32).
_PERGROUP_ROWS = 64


_FOLD_OK: list = []  # [bool] once checked (`_group_fold_is_sequential`)
_FOLDS: dict = {}  # (rows, groups, group_major) -> (indices, offsets) int32 of `_fold_groups`


def pergroup_fold_applies(st: Tensor) -> bool:
    """True when every output channel has a group with a positive scale (st: the two-stage scale, [G, 1, n] or
    [G, n]), so `_fold_groups` gives the spec's group sum bit for bit (why: its docstring). Depends on no
    activation: layouts.py decides once at load; any artifact with positive scales qualifies."""
    return bool((st.reshape(st.shape[0], -1) > 0).any(0).all())


def _fold_groups(t: Tensor, rows: int, groups: int, group_major: bool) -> Tensor:
    """float32 [rows, n]: `y = t_0; y = f32(y + t_g)` for g = 1 .. G-1 in order, for every token row, in one
    call: the float32 sum-mode embedding bag, one bag of G indices per row, adds the rows it indexes in index
    order into an accumulator that starts at +0 (fbgemm's float kernel, or aten's index_select_add without it;
    `_group_fold_is_sequential` checks this once per process). t: [rows * G, n] with row (r, g) at r * G + g, or
    at g * rows + r when group_major.

    From +0 the running sum equals the spec's from t_0 except while it is a zero: the spec's is -0 exactly while
    every term so far was -0, the bag's is +0 (+0 + -0 = +0), and the first nonzero or +0 term makes them equal
    again. So they differ only in a channel whose every term is -0. t_g = f32(acc_g * S_g) with acc_g an exact
    integer (+0 for zero) and no underflow (|acc_g| >= 1, |S_g| >= float32's least subnormal), so a term is -0
    only where S_g <= 0: where some S_g > 0 (`pergroup_fold_applies`) no channel can have all terms -0."""
    key = (rows, groups, group_major)
    bag = _FOLDS.get(key)
    if bag is None:
        idx = torch.arange(rows * groups, dtype=torch.int32)
        if group_major:
            idx = idx.view(groups, rows).t().reshape(-1)
        bag = _FOLDS[key] = (idx.contiguous(), torch.arange(0, rows * groups, groups, dtype=torch.int32))
    return torch.embedding_bag(t, bag[0], bag[1], False, 0, False, None, False, None)[0]


def _fold_loop(parts) -> Tensor:
    """The spec's group sum written out: `y = t_0; y += t_g` in order (in place in t_0)."""
    y = parts[0]
    for part in parts[1:]:
        y.add_(part)
    return y


def _group_fold_is_sequential() -> bool:
    """Checked once per process: `_fold_groups` equals the written-out fold bit for bit on terms of wide
    magnitudes (where any other summation order rounds differently), signed zeros, both row orders and a
    vector width the kernel splits into blocks and a tail. Otherwise the written-out fold runs instead."""
    if not _FOLD_OK:
        ok = False
        try:
            g = torch.Generator().manual_seed(0)
            rows, groups, n = 3, 37, 70
            t = torch.randn(rows, groups, n, generator=g) * torch.exp2(torch.randint(-30, 30, (rows, groups, n),
                                                                                   generator=g).float())
            t[:, :, :4] = 0.0
            t[:, 1:, 1] = -0.0  # a -0 term after a +0 one: the sum must be +0 (as the spec's)
            t[:, :, 2] = -0.0   # (the all -0 channel is excluded by pergroup_fold_applies; left out here)
            t[:, 0, 2] = 1.0
            t[:, 5, 3], t[:, 9, 3] = 2.0 ** 24, -(2.0 ** 24)  # exact cancellation midway
            want = _fold_loop(t.clone().unbind(1))
            got = _fold_groups(t.reshape(rows * groups, n), rows, groups, False)
            got_gm = _fold_groups(t.transpose(0, 1).reshape(rows * groups, n), rows, groups, True)
            ok = all(torch.equal(a.view(torch.int32), want.view(torch.int32)) for a in (got, got_gm))
        except Exception:  # noqa: BLE001 - any failure: the written-out fold runs
            ok = False
        _FOLD_OK.append(ok)
    return _FOLD_OK[0]


def two_stage_scale(weight_scale: Tensor, weight_scale_second: Tensor, dtype: torch.dtype) -> Tensor:
    """The per-group weight scale the engines form, float32 [n, G]: `dtype(dtype(weight_scale[n, 1]) *
    dtype(weight_scale_second[n, G]))` (MindIE `W4A8LinearDynamic.__init__`, atb_llm/utils/quantize/w4a8.py:
    the product of the two model-dtype tensors, then float32 for npu_trans_quant_param; vLLM-Ascend
    `AscendW4A8DynamicLinearMethod`: float32 product cast to x's dtype in `apply`). Routed experts: both engines'
    fused-MoE methods cast that product through float16 as well (encode.EXPERT_SCALE_ALSO); the encoder writes
    expert scales float16 holds, so this product is theirs too."""
    return (weight_scale.to(dtype) * weight_scale_second.to(dtype)).float()


def _check_groups(k: int, groups: int, group_size: int) -> None:
    if group_size <= 0 or groups * group_size != k:
        raise ValueError(f"quant_matmul_pergroup: k={k} is not {groups} groups of group_size={group_size}")
    if group_size * 128 * 8 >= 2**24:
        raise ValueError(f"quant_matmul_pergroup: group_size {group_size} too large for exact float32 group sums")


def _check_pergroup(x, weight, scale, group_size):
    n, groups = scale.shape
    k = x.shape[-1]
    _check_groups(k, groups, group_size)
    if x.dtype != torch.int8:
        raise ValueError(f"quant_matmul_pergroup: x must be int8, got {x.dtype}")
    return unpack_weight(weight, PACK_INT4_N, n, k), n, groups, k


def quant_matmul_pergroup(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    weight_scale_second: Tensor,
    pertoken_scale: Tensor,
    group_size: int,
    output_dtype: torch.dtype,
) -> Tensor:
    """W4A8_DYNAMIC per-group: int8 per-token activations x int4 weights with the two-stage scale, [..., n].

    The math of MindIE's aclnnQuantMatmulV5 A8W4 call (`W4A8LinearDynamic`; CANN: `out = ((x1 @ (x2 * x2scale))
    + yoffset) * x1scale`, where yoffset = scale_bias completes the kernel's int4 decomposition of x1, so the
    result is the plain dequantized product), in float32 and in this order, with `S = two_stage_scale(...)`:

        acc_g = x[..., group g] @ W[:, group g]^T                       exact integers
        y = f32(acc_0 * S[:, 0]);  y = f32(y + f32(acc_g * S[:, g]))    for g = 1 .. G-1, in order
        out = output_dtype(f32(y * pertoken_scale[..., None]))

    The integer group sums come from float32 batched matmuls: every partial sum is an integer below
    group_size * 128 * 8 < 2**24, so float32 holds it exactly (float64 when matmul precision is lowered).
    weight: int4 packed along n [n/2, k]; weight_scale [n, 1]; weight_scale_second [n, G]; pertoken_scale
    float32 [...]. Plain tensor math: the same on any device (the NPU's fused kernel sums in its own order).
    """
    s = two_stage_scale(weight_scale, weight_scale_second, output_dtype)
    w, n, groups, k = _check_pergroup(x, weight, s, group_size)
    wg, st = pergroup_operands(w, s, group_size)
    return quant_matmul_pergroup_prepared(x, wg, st, pertoken_scale, output_dtype)  # the written-out fold


def _pergroup_acc_dtype() -> torch.dtype:
    return torch.float32 if torch.get_float32_matmul_precision() == "highest" else torch.float64


def pergroup_operands(w: Tensor, scale: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(weight [G, group_size, n] in the exact accumulation dtype, scale [G, 1, n] float32) from the
    unpacked int8 weight [n, k] and `two_stage_scale` [n, G]. Depends on no activation: layouts.py
    computes it once at load."""
    n, groups = scale.shape
    wg = w.to(_pergroup_acc_dtype()).reshape(n, groups, group_size).permute(1, 2, 0).contiguous()
    return wg, scale.t().contiguous().unsqueeze(1)


#: (x.shape, wg.shape, st.shape, pertoken_scale.shape) -> `_pergroup_decode_plan` (False where it does not apply)
_PG_DECODE: dict = {}


def _pergroup_decode_plan(x: Tensor, wg: Tensor, st: Tensor, pertoken_scale: Tensor):
    """What a decode-step call of `quant_matmul_pergroup_prepared` with `fold` computes once per shape, so each call
    is 6 torch calls and no Python shape work: (rows, row-wise bag indices and offsets over the k-slices of one
    group each, the [rows, G, ...] view of the group sums that broadcasts against st, `_fold_groups`' indices and
    offsets, None when the per-token scale [..., rows] broadcasts to the output as [..., rows, 1] (a batch of one)
    or else the output shape, whether the scale needs that unsqueeze: not when it is already [..., rows, 1],
    `dynamic_quant_codes(column=True)`; 5 calls then). False when the general path runs instead: the weight not in
    one row-wise part, more than ROWWISE_MAX_ROWS rows (re-checked per call), a group wider than one exact slice, a
    kernel check that failed, shapes that disagree (the general path raises the error).

    Same operations on the same values as the general path (rows <= ROWWISE_MAX_ROWS, row-wise, fold): the group
    sums of `_rowwise_bag` for one part (the kernel reads x's float32 codes as its per-sample weights in memory
    order, so a contiguous x needs no flattening, checked here once against the flattened codes), scaled in place
    by st (elementwise, the view only aligns the broadcast), folded in group order by `_fold_groups`' bag, then
    `f32(y * pertoken_scale)` and the cast (torch.mul's float32 product is y.mul_'s)."""
    if wg.dim() != 2 or x.dim() < 1 or st.dim() not in (2, 3) or x.dtype is not _F32:
        return False
    k, n = _weight_k_n(wg)
    groups = st.shape[0]
    rows = math.prod(x.shape[:-1])
    if (x.shape[-1] != k or groups <= 0 or k % groups or st.shape[-1] != n or (st.dim() == 3 and st.shape[1] != 1)
            or k // groups > qn.F32_EXACT_K or rows > ROWWISE_MAX_ROWS or pertoken_scale.numel() != rows
            or not (_rowwise_kernel_is_exact() and _group_fold_is_sequential())):
        return False
    group_size = k // groups
    try:
        _check_groups(k, groups, group_size)
    except ValueError:
        return False
    bag = _bags(k, rows, group_size, 1)
    probe = torch.arange(rows * k, dtype=torch.float32).remainder_(255).sub_(127).reshape(x.shape)
    if not torch.equal(_BYTE_BAG(wg, bag[0], bag[1], False, 0, False, probe, None, False),
                       _BYTE_BAG(wg, bag[0], bag[1], False, 0, False, probe.reshape(-1), None, False)):
        return False
    _fold_groups(torch.zeros(rows * groups, n), rows, groups, False)  # fills _FOLDS
    fold_idx, fold_off = _FOLDS[(rows, groups, False)]
    lead = tuple(x.shape[:-1])
    one_batch = len(lead) >= 1 and math.prod(lead[:-1]) == 1
    column = one_batch and tuple(pertoken_scale.shape) == lead + (1,)  # `dynamic_quant_codes(column=True)`
    simple = column or one_batch and tuple(pertoken_scale.shape) == lead
    return (rows, bag[0], bag[1], (rows, groups, 1, n) if st.dim() == 3 else (rows, groups, n), fold_idx, fold_off,
            None if simple else lead + (n,), not column)


def quant_matmul_pergroup_prepared(
    x: Tensor, wg: Tensor, st: Tensor, pertoken_scale: Tensor, output_dtype: torch.dtype, fold: bool = False
) -> Tensor:
    """`quant_matmul_pergroup` with `wg, st = pergroup_operands(...)` computed beforehand; x: int8 codes or
    the float32 codes of `dynamic_quant_codes` (widened to the exact accumulation dtype either way).

    wg may also be the `rowwise_codes` layout [k, n + 8] of the unpacked weight (what layouts.py prepares: 1 byte
    a weight instead of 4): up to ROWWISE_MAX_ROWS token rows the exact group sums then come from the row-wise
    kernel, one bag per group (integers <= group_size * 128 * 8, exact as in `exact_product_f32`), else the
    weight is widened to [G, group_size, n] per call. Either way the same exact group sums, scaled and summed
    over the groups in the same order: with `fold` (given when `pergroup_fold_applies(st)`, which layouts.py
    checks once at load) in one embedding-bag call per block (`_fold_groups`), else one `add_` per group."""
    if fold and x.dtype is _F32 and wg.dtype is _U8:  # a decode step: the planned path (`_pergroup_decode_plan`)
        key = (x.shape, wg.shape, st.shape, pertoken_scale.shape)
        plan = _PG_DECODE.get(key)
        if plan is None:
            plan = _PG_DECODE[key] = _pergroup_decode_plan(x, wg, st, pertoken_scale)
        if plan and plan[0] <= ROWWISE_MAX_ROWS and pertoken_scale.dtype is _F32 and x.is_cpu and x.is_contiguous():
            _, bag, bag_off, acc_shape, fold_idx, fold_off, lead, unsqueeze = plan
            acc = _BYTE_BAG(wg, bag, bag_off, False, 0, False, x, None, False)  # [rows * G, n], row (r, g)
            acc.view(acc_shape).mul_(st)
            y = torch.embedding_bag(acc, fold_idx, fold_off, False, 0, False, None, False, None)[0]
            if lead is None:  # the scale broadcasts to x's leading dims: [rows, n] * [..., rows, 1] -> [..., rows, n]
                return torch.mul(y, pertoken_scale.unsqueeze(-1) if unsqueeze else pertoken_scale).to(output_dtype)
            return y.mul_(pertoken_scale.reshape(-1, 1)).to(output_dtype).reshape(lead)
    if x.dtype not in (torch.int8, torch.float32):
        raise ValueError(f"quant_matmul_pergroup: x must be int8 codes, got {x.dtype}")
    rowwise = wg.dtype == torch.uint8
    if rowwise:
        k, n = _weight_k_n(wg)
        groups = st.shape[0]
        group_size = k // groups
        _check_groups(k, groups, group_size)
    else:
        groups, group_size, n = wg.shape
        k = groups * group_size
    if x.shape[-1] != k:
        raise ValueError(f"quant_matmul_pergroup: x [..., {x.shape[-1]}] vs {groups} groups of {group_size}")
    rows = math.prod(x.shape[:-1])
    xf = x.reshape(rows, k)
    if (rowwise and rows <= ROWWISE_MAX_ROWS and group_size <= qn.F32_EXACT_K and x.device.type == "cpu"
            and _rowwise_kernel_is_exact()):
        acc = _rowwise_bag(xf.float(), wg, group_size).view(rows, groups, n).mul_(st.view(groups, n))
        if fold and _group_fold_is_sequential():  # one call instead of G - 1 (a decode step folds ~4500 groups)
            y = _fold_groups(acc.view(rows * groups, n), rows, groups, False)
        else:
            y = _fold_loop(acc.unbind(1))
        y.mul_(pertoken_scale.float().reshape(rows, 1))
        return y.to(output_dtype).reshape(*x.shape[:-1], n)
    acc_dtype = _pergroup_acc_dtype()
    if rowwise:
        wg = _rowwise_part_codes(wg).to(acc_dtype).sub_(128).reshape(groups, group_size, n)
    elif wg.dtype != acc_dtype:  # matmul precision changed since the operands were prepared
        wg = wg.to(acc_dtype)
    y = torch.empty(rows, n, dtype=torch.float32, device=x.device)
    zero = torch.zeros(1, 1, n, dtype=acc_dtype, device=x.device)  # +0 start: a one-product sum -128 * 0 is -0 in a bmm
    for r0 in range(0, rows, _PERGROUP_ROWS):                      # (exact_product_f32's signed-zero argument)
        xs = xf[r0:r0 + _PERGROUP_ROWS].to(acc_dtype).reshape(-1, groups, group_size).transpose(0, 1)
        acc = torch.baddbmm(zero, xs, wg).to(torch.float32).mul_(st)                       # [G, r, n]
        block = y[r0:r0 + _PERGROUP_ROWS]
        if fold and _group_fold_is_sequential():
            block.copy_(_fold_groups(acc.view(-1, n), acc.shape[1], groups, True))
        else:
            block.copy_(acc[0])
            for g in range(1, groups):
                block.add_(acc[g])
    y.mul_(pertoken_scale.float().reshape(rows, 1))
    return y.to(output_dtype).reshape(*x.shape[:-1], n)


#: token rows per block of `quant_matmul_pergroup_packed`: a block's two [rows, n] float32 temporaries (the running
#: group sum and one group's scaled sums) stay in cache while the groups fold into them
_PERGROUP_PACKED_ROWS = 256


def quant_matmul_pergroup_packed(
    x: Tensor, packed: list, st: Tensor, pertoken_scale: Tensor, output_dtype: torch.dtype
) -> Tensor:
    """`quant_matmul_pergroup_prepared` of a full-sequence layer with each group's weight packed for oneDNN
    (layouts.py: `onednn_linear.pack(W[:, group g])`, given when every two-stage scale is positive,
    `onednn_linear.scales_apply`). `onednn_linear.product(x_g, packed[g], S_g)` is `f32(f32(acc_g) * S_g)`, the
    spec's scaled group sum `t_g` itself (acc_g exact in int32, rounded once to float32, times S_g once); the groups
    then fold in order, `y = t_0; y = f32(y + t_g)`, and `out = dtype(f32(y * pertoken_scale))`: the reference's
    operations, so its bits. x: int8 codes (or the float32 codes of `dynamic_quant_codes`) [..., G * S]; st: the
    two-stage scale [G, 1, n]; [..., n] in `output_dtype`."""
    groups = len(packed)
    size, n = onednn_linear.packed_k_n(packed[0])
    k = groups * size
    if x.shape[-1] != k or st.shape[0] != groups:
        raise ValueError(f"quant_matmul_pergroup_packed: x [..., {x.shape[-1]}] vs {groups} groups of {size}")
    rows = math.prod(x.shape[:-1])
    xg = _int8_codes(x.reshape(rows, groups, size)).transpose(0, 1).contiguous()  # [G, rows, S]: one int8 copy
    scales = st.reshape(groups, n)
    y = torch.empty(rows, n, dtype=torch.float32)
    for r0 in range(0, rows, _PERGROUP_PACKED_ROWS):
        block = y[r0:r0 + _PERGROUP_PACKED_ROWS]
        block.copy_(onednn_linear.product(xg[0, r0:r0 + _PERGROUP_PACKED_ROWS], packed[0], scales[0]))
        for g in range(1, groups):  # y = f32(y + t_g), added by oneDNN into the block (one call a group)
            onednn_linear.accumulate(xg[g, r0:r0 + _PERGROUP_PACKED_ROWS], packed[g], scales[g], block)
    y.mul_(pertoken_scale.float().reshape(rows, 1))
    return y.to(output_dtype).reshape(*x.shape[:-1], n)


# --------------------------------------------------------------------------------------------------
# qc::weight_quant_matmul (W8A16, W4A16)


def _expand_groups(t: Tensor, group_size: int, n: int, k: int, what: str) -> Tensor:
    """[n, 1] (group_size 0) or [n, ceil(k/g)] per-group -> something that broadcasts to [n, k]."""
    if group_size == 0:
        if tuple(t.shape) != (n, 1):
            raise ValueError(f"{what} must be [n, 1] = [{n}, 1] per-channel, got {tuple(t.shape)}")
        return t
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0, got {group_size}")
    groups = -(-k // group_size)
    if tuple(t.shape) != (n, groups):
        raise ValueError(f"{what} must be [n, ceil(k/g)] = [{n}, {groups}], got {tuple(t.shape)}")
    return t.repeat_interleave(group_size, dim=1)[:, :k]


def dequantize_weight(
    weight: Tensor,
    antiquant_scale: Tensor,
    antiquant_offset: Tensor,
    group_size: int,
    packing: int,
    k: int,
    dtype: torch.dtype,
) -> Tensor:
    """`W = (w + offset) * scale` in `dtype` (npu_weight_quant_batchmatmul: `+ offset`), [n, k]."""
    n = antiquant_scale.shape[0]
    w = unpack_weight(weight, packing, n, k)
    groups = -(-k // group_size) if group_size > 0 else 0
    if groups and k % group_size == 0 and tuple(antiquant_scale.shape) == tuple(antiquant_offset.shape) == (n, groups):
        # the same elementwise operations with the groups broadcast, not repeated: [n, G, g] (+ or *) [n, G, 1]
        # (the executable graph dequantizes every weight-only Linear at load: no [n, k] scale and offset copies)
        wg = w.to(dtype).view(n, groups, group_size)
        wg.add_(antiquant_offset.to(dtype).unsqueeze(-1)).mul_(antiquant_scale.to(dtype).unsqueeze(-1))
        return wg.view(n, k)
    scale = _expand_groups(antiquant_scale, group_size, n, k, "antiquant_scale").to(dtype)
    offset = _expand_groups(antiquant_offset, group_size, n, k, "antiquant_offset").to(dtype)
    return (w.to(dtype) + offset) * scale


def weight_quant_matmul_prepared(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`weight_quant_matmul` with `weight = dequantize_weight(...)` [n, k] in x's dtype and the bias in
    x's dtype computed beforehand (layouts.py does it once at load): `x @ weight.T (+ bias)`."""
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y


def weight_quant_matmul(
    x: Tensor,
    weight: Tensor,
    antiquant_scale: Tensor,
    antiquant_offset: Tensor,
    bias: Tensor | None,
    group_size: int,
    packing: int,
) -> Tensor:
    """Weight-only matmul in x's dtype: `y = x @ W^T (+ dtype(bias))` with `W` from `dequantize_weight`.

    This is both the reference and the CPU path: dequantize + one matmul in x's dtype.
    `torch._weight_int8pack_mm` was measured not bit-identical (it scales after accumulating), so it
    is not used. The NPU accumulates in float32 in its own order, so CPU and NPU agree to matmul
    rounding only, not bit for bit. The executable graph dequantizes once at load instead of per call
    (layouts.py; `weight_quant_matmul_prepared`), which is the same computation.
    """
    if not x.dtype.is_floating_point:
        raise ValueError(f"weight_quant_matmul expects float activations, got {x.dtype}")
    w = dequantize_weight(
        weight, antiquant_scale, antiquant_offset, group_size, packing, x.shape[-1], x.dtype
    )
    return weight_quant_matmul_prepared(x, w, None if bias is None else bias.to(x.dtype))
