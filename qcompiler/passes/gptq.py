"""gptq: error-compensating weight rounding (GPTQ, Frantar et al. 2022) for the scheme that follows.

Purpose: instead of rounding every weight to its nearest code (RTN), quantize one input column at a
time and spread its rounding error over the not-yet-quantized columns, weighted by the inverse Hessian
of the layer's output error, H = 2 X^T X / N (X: the Linear's calibration inputs). Same scales as RTN,
better codes: lower output error, notably at 4 bits.

How, per decoder layer:
- Target quantization (`weight_targets`): bits and group of each Linear's spec (`meta.QUANT_SPEC`, written
  by the scheme passes, which run before gptq whatever the --passes order: passes/base.py Phase). Scales are the artifact's: symmetric
  absmax / qmax per channel or per group, computed from the float weight as it is when gptq runs (after
  smooth/awq) and kept fixed ("static groups"), so the stored per-group scales match the unpermuted
  layout even with act-order. Codes lie in [-127, 127] / [-7, 7].
- Sequential (default): Linears sharing an input (q/k/v, gate/up) share one Hessian and are quantized
  together (GPTQ is row-independent, so their rows are stacked); groups run in graph order and each
  Hessian is taken from inputs computed with the already-quantized Linears before it (o_proj sees the
  quantized q/k/v). Stage inputs are cached between stages, so the layer is computed about once.
  One Hessian is in memory at a time. `sequential=false`: every Hessian from the float layer, one pass.
- GPTQ proper: dead inputs (diag(H) = 0) get H_ii = 1 and weight 0; act-order (columns by descending
  diag(H), undone on the stored codes); dampening `damp` * mean(diag(H)) (raised x10 up to 4 times if H
  is still not positive definite); upper Cholesky factor of H^-1 (float64, from one Cholesky of the reversed H
  and one triangular inverse: `_inverse_cholesky`; in GPTQ the float64 buffer is gathered straight from the
  caller's H and narrowed to float32 in its own storage, so no float32 copy of H is made: `_factor_row_blocks`);
  lazy batch updates in blocks of `block` columns (matmuls), one column at a time inside a block.
- Result on each quantized Linear's `aten.linear` node: `meta.WEIGHT_QPARAMS = (q int8 [n, k], scale
  float32 [n, G])` (lowering encodes exactly these), and the float weight parameter is replaced by
  q * scale in the model dtype (what any later float consumer sees).
Cost per layer: about one forward of the layer over the calibration set (stage inputs cached), the
Gram matrices (float32 products for every dtype, `calibration.linear_inputs.accumulate_gram`), one
Cholesky inverse and k column steps per shared input; GPTQ's own math runs on one thread.
Records per Linear: relative output error tr(dW H dW^T) / tr(W H W^T) of GPTQ and of RTN (same scales).
Requires: captured. Produces: weights_rounded. Forbids: annotated (written before the scheme pass).
Phase: TRANSFORM.
Mixture of experts (ir/moe.py): the captured block runs every expert on every token (dense dispatch), so the
input of an expert Linear holds every calibration token; a sparse engine feeds it only the tokens the router
sends to it. Each routed expert's Hessian is therefore taken over those tokens only (the rows whose top-k holds
the expert: `LayerRunner.collect(routes=)`), per expert: gate/up share it, down_proj gets its own. An expert the
router sent fewer than `min_expert_tokens` (default EXPERT_MIN_TOKENS = 8; at least 1: an expert no token
reached has an all-zero Hessian, which would zero its weights as dead inputs) calibration tokens gets
`few_tokens`: "rtn" (default: no GPTQ, round to nearest with the scheme's scales) or "all" (the Hessian of every
token, what the dense dispatch computes for it). Records per expert Linear: `expert_tokens` and `statistics`
(which of the three it got). Measured (BENCHMARKS.md "MoE experts: GPTQ statistics", bench/run_moe_gptq_stats.py)
on tiny random Qwen3-MoE (w4a16 group 32 experts) and Qwen2-MoE (w4a8d experts), 4 experts top-2, hidden 64,
calibrated on wiki_calib, error of each layer's contribution on held-out wiki_eval, layer 0 / layer 1: with
400-700 routed tokens per expert, routed 0.028 / 0.028 (Qwen3-MoE) and 0.036 / 0.031 (Qwen2-MoE), all tokens
0.030 / 0.030 and 0.040 / 0.034, RTN 0.042 / 0.039 and 0.061 / 0.045; with 8-26 routed tokens, routed
0.042 / 0.039 and 0.053 / 0.042, all tokens 0.046 / 0.043 and 0.059 / 0.053, RTN 0.042 / 0.039 and 0.061 / 0.045.
Routed statistics were the best or level with RTN everywhere; the all-token Hessian (other experts' tokens) was
worse than RTN with few tokens, hence RTN below the guard.
Cost: one extra Gram matrix per expert at the shared gate/up input (E x k^2 float32: 2 GiB for
128 experts of hidden 2048). Routers and the shared expert are not routed Linears (all tokens).
Limits: the float weight is replaced, so a pass that changes weights must not run after gptq (awq
and smooth forbid it). The artifact's other float tensors are unchanged by gptq.
"""
from dataclasses import dataclass

import torch

from ..ir import meta
from ..ir import qnumerics as qn
from ..calibration.linear_inputs import stage_input_stats
from ..ir.moe import expert_index, router_index_node
from ..ir.patterns import get_tensor, linear_sites, replace_tensor, shared_input_groups
from .base import Pass, PassResult, Phase
from .properties import ANNOTATED, CAPTURED, WEIGHTS_ROUNDED
from .registry import register
from .weight_targets import (WeightTarget, dequantize, quantize, single_thread,
                             weight_targets)


#: MoE experts (module docstring): an expert the router sent fewer calibration tokens than this gets `few_tokens`
EXPERT_MIN_TOKENS = 8
#: what an expert below min_expert_tokens gets: "rtn" = no GPTQ (round to nearest with the scheme's scales),
#: "all" = the Hessian of every calibration token (the dense dispatch's input of that expert). Default rtn, measured
#: (module docstring): with few routed tokens the all-token Hessian was worse than RTN
FEW_TOKENS = ("rtn", "all")


@dataclass(frozen=True)
class GPTQOptions:
    """damp: dampening, fraction of mean(diag(H)) added to the diagonal. block: columns per lazy
    batch update. act_order: quantize columns by descending diag(H). sequential: Hessians from inputs
    computed with the Linears quantized so far in the layer (else all from the float layer).
    min_expert_tokens / few_tokens: MoE experts (module docstring)."""
    damp: float = 0.01
    block: int = 128
    act_order: bool = True
    sequential: bool = True
    min_expert_tokens: int = EXPERT_MIN_TOKENS
    few_tokens: str = "rtn"

    def __post_init__(self):
        if self.min_expert_tokens < 0:
            raise ValueError(f"min_expert_tokens must be >= 0, got {self.min_expert_tokens}")
        if self.few_tokens not in FEW_TOKENS:
            raise ValueError(f"few_tokens must be one of {', '.join(FEW_TOKENS)}, got {self.few_tokens!r}")
        if not (0.0 < self.damp < 1.0):
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")


#: rows per chunk of the copies into and out of the float64 buffer (a transient of this many rows)
_COPY_ROWS = 256
#: block size of the in-place triangular inverse (_tril_inverse_): columns per step, rows per product
_TRI_BLOCK = 256


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (U^T U = that inverse), float32; dampening
    raised x10 (up to 4 times) while the Cholesky factorization fails.

    Route (one Cholesky and one triangular inverse, about 2/3 k^3 flops): with J the reversal permutation
    (J x = x reversed), L = chol(J H J) (lower) gives H = J L L^T J, so H^-1 = J L^-T L^-1 J = U^T U with
    U = J L^-1 J, which is upper triangular with a positive diagonal: the upper Cholesky factor of H^-1 (unique).
    The route before (Cholesky of H, cholesky_inverse = LAPACK potri, upper Cholesky of the inverse) took about
    5/3 k^3 flops and formed H^-1 explicitly. J is folded into the index order of the copies in and out of the
    buffer (no extra matrix). The triangular inverse is blocked BLAS3 (`_tril_inverse_`; torch exposes no trtri).
    Measured (bench/probe_gptq_inverse.py, one thread, this 2-core AVX2 host, process CPU seconds old -> new):
    k 2048 0.85 -> 0.41 s, 4096 4.98 -> 2.44 s, 8192 39.3 -> 19.2 s (2.0-2.1x; 2.0-2.4x in an earlier run; MKL's
    potrf, k^3/3, is now most of it: a blocked GEMM Cholesky in Python was no faster); x (18944 / 8192)^3 for a
    7B down_proj: ~486 -> ~237 s. Peak above the caller's H: 3.06 x H (old 3.02) at k 8192, 3.16 (3.06) at 4096.

    Memory (a 7B down_proj's H is 18944^2: 1.4 GiB in float32): the float64 work runs in place on one
    column-major buffer (`_inverse_factor_buffer`). Peak: h + one float64 buffer + U (4 x H in float32) +
    transients of a few hundred rows. GPTQ and SparseGPT do not call this (it states U whole, for the tests and
    bench/probe_gptq_inverse.py): they read U from the buffer narrowed in place (`_factor_row_blocks`), which
    saves both float32 copies. Reads H's lower triangle (as the route
    before: a Gram matrix from blocked GEMMs need not be exactly symmetric).

    Bits: U is the same matrix in exact arithmetic as the route before, not the same float64 rounding, so after
    the cast to float32 a few entries differ in the last bits: 6 of 2.1M upper entries at k 2048, 47 of 8.4M at
    4096, 225 of 33.6M at 8192 (max difference 1.2e-9 of max |U|; U^T U H - I the same to 3 digits). GPTQ codes
    computed from either were identical on the probe's w4a16 problems (n 512, k 4096, N 8192 tokens, 3 weight
    seeds; n 256, k 8192, N 4096: singular H, 2 seeds: 0 of 2.1M codes differ in each, output error equal), and
    the tiny byte-identity cases (gptq, sparse) are byte-identical; other
    problems may see a code differ where a rounding decision sits on a tie."""
    k = h.shape[0]
    buf = _inverse_factor_buffer(h, damp)
    # U = J L^-1 J: U[i, j] = a[k-1-i, k-1-j]; U^T[j, i] = buf[k-1-j, k-1-i] (buf = a^T)
    out = torch.empty(k, k)
    outT = out.mT
    for r1 in range(0, k, _COPY_ROWS):
        r2 = min(r1 + _COPY_ROWS, k)
        outT[r1:r2].copy_(buf[k - r2:k - r1].flip(0, 1))
    return out


def _inverse_factor_buffer(h: torch.Tensor, damp: float, order: torch.Tensor | None = None, *,
                           dead_to_one: bool = False) -> torch.Tensor:
    """The float64 work of `_inverse_cholesky` in one new row-major k x k buffer `buf`, returned: with
    H' = h[order][:, order] (h itself without `order`; with `dead_to_one` every zero of diag(H') set to 1:
    GPTQ's dead inputs; h is never written), damped, and L = chol(J H' J): buf^T (column-major, LAPACK's
    layout) holds L^-1 (lower), so buf's upper triangle holds its transpose and its strict lower triangle is
    zero. The upper Cholesky factor of H'_damped^-1 is U = J L^-1 J: U[i, j] = buf[k-1-j, k-1-i].

    The permutation and the reversal J are folded into the row-chunked gather from h (no permuted copy of H).
    Raises ValueError if H' stays indefinite after dampening x10^4."""
    k = h.shape[0]
    rev = (order if order is not None else torch.arange(k)).flip(0)  # buf row/column r is H' row/column k-1-r
    diag = torch.arange(k)
    buf = torch.empty(k, k, dtype=torch.float64)  # row-major storage; a = buf.mT is the column-major matrix
    a = buf.mT
    info = torch.empty((), dtype=torch.int32)
    mean = None
    for attempt in range(5):
        # buf = J H' J (row r of buf = row k-1-r of H', reversed), so a = (J H' J)^T: a's lower triangle holds
        # H''s lower triangle (a[i, j] = H'[k-1-j, k-1-i])
        for r1 in range(0, k, _COPY_ROWS):
            r2 = min(r1 + _COPY_ROWS, k)
            buf[r1:r2].copy_(h[rev[r1:r2, None], rev])
        if dead_to_one:
            a.diagonal().masked_fill_(a.diagonal() == 0, 1.0)
        if mean is None:  # in H''s order, as the route before (a reversed sum can differ in the last bit)
            mean = a.diagonal().flip(0).mean().item()
        a[diag, diag] += damp * (10 ** attempt) * mean
        torch.linalg.cholesky_ex(a, out=(a, info))
        if info.item() == 0:
            return _tril_inverse_(a).mT
    raise ValueError("Hessian is not positive definite even with dampening x10^4")


def _narrow_(buf: torch.Tensor) -> torch.Tensor:
    """float32 k x k matrix F with F[j] = buf[j] rounded to float32 (what a float32 cast gives), in buf's own
    storage (its first half), returned as a view of it; buf (float64, contiguous k x k) is garbage afterwards.

    Why this order does not clobber: float32 row j lies in bytes [4kj, 4k(j+1)) of the storage, float64 row j
    in [8kj, 8k(j+1)); so writing float32 rows r1..r2-1 only overwrites float64 rows below r2, and with rows
    taken in increasing order those have all been read (rows r1..r2-1 into the chunk's temporary first)."""
    k = buf.shape[0]
    f = buf.view(-1).view(torch.float32)[:k * k].view(k, k)
    for r1 in range(0, k, _COPY_ROWS):
        r2 = min(r1 + _COPY_ROWS, k)
        f[r1:r2].copy_(buf[r1:r2].to(torch.float32))
    return f


def _factor_rows(f: torch.Tensor, i1: int, i2: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows i1..i2-1 of the upper factor U from F = `_narrow_(buf)` (U[i, c] = F[k-1-c, k-1-i]), written into
    `rows` (float32, 1-d, at least (i2 - i1) * k + 15 elements, reused across calls): returns r [i2 - i1, k],
    row-major, with r[:, i1:] = U[i1:i2, i1:] (columns below i1 are not written).

    Same layout as the slice U[i1:i2] of a row-major float32 U (row stride k, and the same address modulo 64
    bytes as in a fresh allocation: r starts (i1 * k) mod 16 elements into `rows`), so GEMMs on views of r
    read their operands as they read views of that slice (MKL's results may depend on leading dimension and
    alignment; on the 2-core AVX2 host, starts shifted by 0-8 elements gave the same bits at k 1000-3001)."""
    k = f.shape[0]
    start = (i1 * k) % 16
    r = rows[start:start + (i2 - i1) * k].view(i2 - i1, k)
    r[:, i1:].copy_(f[:k - i1, k - i2:k - i1].flip(0, 1).T)
    return r


def _factor_row_blocks(h: torch.Tensor, damp: float, block: int, order: torch.Tensor | None = None):
    """GPTQ's and SparseGPT's reading of U, the upper Cholesky factor of H'^-1 (H' = h[order][:, order], dead
    inputs' H'_ii = 1, damped: `_inverse_factor_buffer`), a block of rows at a time: an iterator of (i1, i2, r)
    for i1 = 0, block, 2 block, ... (i2 = min(i1 + block, k)), with r[:, i1:] = U[i1:i2, i1:] (`_factor_rows`;
    r is overwritten by the next block).

    Memory (issue 15): the float64 buffer (2 x H) is built and narrowed to float32 in its own storage
    (`_narrow_`) before this returns, not at the first block, so the caller's allocations around the call keep
    their order; the iterator holds that buffer and one block of rows (not h, which the caller may drop), and
    both are released when the iteration ends."""
    k = h.shape[0]
    f = _narrow_(_inverse_factor_buffer(h, damp, order, dead_to_one=True))
    rows = torch.empty(min(block, k) * k + 15)  # _factor_rows' block of rows and its alignment slack

    def blocks():
        for i1 in range(0, k, block):
            i2 = min(i1 + block, k)
            yield i1, i2, _factor_rows(f, i1, i2, rows)
    return blocks()


def _tril_inverse_(a: torch.Tensor, nb: int = _TRI_BLOCK) -> torch.Tensor:
    """Invert a lower triangular float64 matrix in place (its strict upper triangle must be zero and stays zero);
    `a` column-major. LAPACK trtri's blocked order: block columns from the last to the first; with the trailing
    part already inverted, L^-1 [j] = -(L22^-1 L21) L11^-1 below the diagonal block and L11^-1 on it.
    L22^-1 L21 is a row block at a time over L22^-1's lower part only (about k^3/3 flops in all, GEMM), into a
    temporary panel of (k - j) x nb; the diagonal blocks by a small triangular solve."""
    k = a.shape[0]
    panel = torch.empty(min(nb, k), k, dtype=a.dtype).mT  # column-major, one allocation for every step
    for j1 in reversed(range(0, k, nb)):
        j2 = min(j1 + nb, k)
        d = a[j1:j2, j1:j2]
        dinv = torch.linalg.solve_triangular(d, torch.eye(j2 - j1, dtype=a.dtype), upper=False)
        if j2 < k:
            l21 = a[j2:, j1:j2]
            p = panel[:k - j2, :j2 - j1]
            for r1 in range(j2, k, nb):
                r2 = min(r1 + nb, k)
                torch.mm(a[r1:r2, j2:r2], l21[:r2 - j2], out=p[r1 - j2:r2 - j2])
            torch.mm(p, dinv, out=l21)
            l21.neg_()
        d.copy_(dinv.tril_())
    return a


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, bits: int, *, damp: float = 0.01,
                  block: int = 128, act_order: bool = True, keep_zero: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ codes for weight `w` [n, k] with Hessian `h` [k, k] and fixed scales `scale` [n, G].
    `keep_zero` (bool [n, k], e.g. the weights the sparse pass pruned): those codes stay 0 (their error
    is compensated like any rounding error, as SparseGPT's joint mode does).

    Returns int8 codes [n, k] in [-qmax, qmax] (qmax of `bits`, ir/qnumerics.py) in the original column
    order; `q * scale` (per group of k / G columns) is the quantized weight.
    """
    with single_thread():
        return _gptq(w, h, scale, bits, damp, block, act_order, keep_zero)


def _gptq(w, h, scale, bits, damp, block, act_order, keep_zero=None):
    n, k = w.shape
    h = h.detach().float()  # the caller's (read, never written)
    dead = h.diagonal() == 0
    perm = None
    if act_order:
        order = h.diagonal().masked_fill(dead, 1.0)  # the diagonal once dead inputs get H_ii = 1
        perm = torch.argsort(order, descending=True, stable=True)
    # memory (issue 15): W and keep_zero are gathered straight into GPTQ's column order and column-major layout
    # (column j of W is row j here: contiguous updates), and each column's scales are read from `scale` itself,
    # so the only weight-sized float32 tensor is Wt (a 7B gate/up pair: 0.5 GiB a copy; there were five)
    Wt = _columns_as_rows(w.detach(), perm)
    Wt[dead if perm is None else dead[perm]] = 0.0
    Zt = _columns_as_rows(keep_zero, perm) if keep_zero is not None else None
    St = scale.detach().float().T.contiguous()  # [G, n]: column c's scales are St[c // (k / G)]
    scale_of = torch.arange(k) if perm is None else perm
    scale_of = torch.div(scale_of, k // St.shape[0], rounding_mode="floor").tolist()
    # memory (issue 15): no float32 copy of H; the float64 buffer (2 x H) is gathered from h in the permuted
    # order and, once inverted, narrowed to float32 in its own storage; U is read a block of rows at a time
    factor_blocks = _factor_row_blocks(h, damp, block, perm)
    del h
    Q = torch.empty(k, n, dtype=torch.int8)  # codes are integers in [-qmax, qmax]: exact in int8
    for i1, i2, U1 in factor_blocks:  # U1[:, i1:] = U[i1:i2, i1:]
        W1 = Wt[i1:i2].clone()
        E1 = torch.empty_like(W1)
        H1 = U1[:, i1:i2]
        for i in range(i2 - i1):
            col, s = W1[i], St[scale_of[i1 + i]]
            q = qn.quantize(col, s, bits)
            if Zt is not None:
                q.masked_fill_(Zt[i1 + i], 0.0)
            Q[i1 + i] = q
            err = (col - q * s) / H1[i, i]
            E1[i] = err
            if i + 1 < i2 - i1:
                W1[i + 1:].addr_(H1[i, i + 1:], err, alpha=-1.0)
        if i2 < k:
            Wt[i2:].addmm_(U1[:, i2:].T, E1, alpha=-1.0)
    del Wt  # the float32 working copy, before the codes' transposed copy is made
    codes = Q.T
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes.contiguous()


def _columns_as_rows(m: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """`m[:, cols].T` (every column in order when cols is None) as a new contiguous [len(cols), n] tensor, float32
    for a floating `m` (other dtypes kept), made from row chunks of m [n, k] (`qn.row_slices`): no full-size copy
    besides the result."""
    n, k = m.shape
    out = torch.empty(k if cols is None else cols.numel(), n,
                      dtype=torch.float32 if m.is_floating_point() else m.dtype)
    for r in qn.row_slices(n, k):
        out[:, r].copy_((m[r] if cols is None else m[r][:, cols]).T)
    return out


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """tr(dW H dW^T): the summed squared output error of the Linear over the calibration set (x 2/N)."""
    d = (w.float() - wq.float())
    return float(((d @ h) * d).sum())


#: row_errors' row grid: no chunk crosses a multiple of ROW_ERROR_BLOCK rows (the fixed chunk it used until stop 29,
#: kept so a block of under ROW_ERROR_MIN_ROWS rows is still one GEMM of that many rows, see `_row_error_chunks`)
ROW_ERROR_BLOCK = 4096
#: fewest rows in a chunk of row_errors cut by its byte budget: MKL's single-thread sgemm gave a row's products other
#: bits in a GEMM of 1-3 rows (its small-M kernels) than in one of more; from 7 rows up every probe gave a row the
#: same bits whatever the GEMM's row count and the row's place in it (k 64, 576, 1536, 3584, 18944)
ROW_ERROR_MIN_ROWS = 16


def row_error_elements() -> int:
    """float32 elements per chunk temporary of `row_errors`: half of qnumerics.ROW_CHUNK_ELEMENTS (32 MiB; it holds
    about five: the caller's differences, the product, its quantize transients). Read at call time, so a test can
    monkeypatch qn.ROW_CHUNK_ELEMENTS. Half, not a quarter: at a 7B down_proj's k 18944 a quarter's 221-row GEMMs
    ran ~17% slower than 440-row ones (one thread, this machine), and these products are k^2 per row."""
    return qn.ROW_CHUNK_ELEMENTS // 2


def _row_error_chunks(n: int, k: int, elements: int) -> list[slice]:
    """[0, n) in chunks of at most max(elements // k, ROW_ERROR_MIN_ROWS) rows (rounded down to a multiple of
    ROW_ERROR_MIN_ROWS), never more than ROW_ERROR_BLOCK, none crossing a multiple of ROW_ERROR_BLOCK, and none of
    fewer than ROW_ERROR_MIN_ROWS rows unless its whole block is (a short last piece joins the one before). So each
    row is in a GEMM of the rows it shared one with before (a block under ROW_ERROR_MIN_ROWS rows, where the GEMM's
    row count may change a row's bits) or in one of >= ROW_ERROR_MIN_ROWS rows, like every other (where it does not:
    ROW_ERROR_MIN_ROWS): the figures are the former fixed 4096-row chunks' bits."""
    step = min(ROW_ERROR_BLOCK, qn.row_step(k, elements, multiple=ROW_ERROR_MIN_ROWS))
    chunks = []
    for block in range(0, n, ROW_ERROR_BLOCK):
        end = min(block + ROW_ERROR_BLOCK, n)
        cuts = list(range(block, end, step))
        if len(cuts) > 1 and end - cuts[-1] < ROW_ERROR_MIN_ROWS:
            cuts.pop()
        chunks += [slice(a, b) for a, b in zip(cuts, cuts[1:] + [end])]
    return chunks


def row_errors(rows_of, n: int, h: torch.Tensor, elements: int | None = None) -> torch.Tensor:
    """d_r H d_r^T for every row r < n of each matrix `rows_of(r)` returns: float32 [matrices, n]. For the
    pass's records only. `rows_of(slice)` gives the matrices' rows in that slice (a tuple of float32
    [len, k], the same count on every call), a chunk of rows at a time (`_row_error_chunks`: about `elements`
    float32 per matrix, `row_error_elements()` unless given), so neither the caller nor this function holds a
    full-size difference of weights (a 7B gate/up pair is 37888 x 3584: 0.5 GiB per float32 copy; the 72B one
    59136 x 8192, 1.8 GiB) nor chunks that grow with k (a fixed 4096 rows were 5 x 58 MiB of temporaries at a 7B
    gate/up pair and 5 x 271 MiB at its down_proj, k 18944). float32 products: a bf16 GEMM is slow on CPUs without
    native bf16 (on the AMD EPYC AVX2 host measured, one thread, [4096, 576] x [576, 576] took 35x as long in bf16
    as in float32). Both passes call it on one thread (`single_thread`); there a row's figure has the same bits
    whatever the chunking, see `_row_error_chunks`.

    n = 0 (an empty Linear, no rows) gives an empty float32 [matrices, 0]; the matrix count is then read from
    `rows_of(slice(0, 0))`, so `rows_of` is called for an empty slice too."""
    if n == 0:
        return torch.empty(len(rows_of(slice(0, 0))), 0)
    hf = h.float()
    out = None
    for r in _row_error_chunks(n, hf.shape[0], row_error_elements() if elements is None else elements):
        ds = rows_of(r)
        if out is None:
            out = torch.empty(len(ds), n)
        for i, d in enumerate(ds):
            x = d.float()
            p = torch.mm(x, hf)
            out[i, r] = p.mul_(x).sum(-1)  # in place: the same products as p * x, one temporary fewer
            del p
        del ds
    return out


@register
class GPTQ(Pass):
    name = "gptq"
    summary = "GPTQ error-compensating weight rounding for the scheme that follows (int8/int4, channel/group)"
    requires = frozenset({CAPTURED})
    produces = frozenset({WEIGHTS_ROUNDED})
    forbids = frozenset({ANNOTATED})
    phase = Phase.TRANSFORM
    Options = GPTQOptions

    def run(self, gm, ctx):
        targets = weight_targets(gm, ctx, self)
        sites = {s.name: s for s in linear_sites(gm)}
        groups = [[s for s in g if s.name in targets] for g in shared_input_groups(list(sites.values()))]
        groups = [g for g in groups if g]
        if not groups:
            return PassResult(gm, modified=False, stats={"linears": {}})
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        groups.sort(key=lambda g: order[g[0].input])
        # MoE: an input read by routed experts is split per expert (each gets the tokens routed to it)
        by_input: dict = {}
        for group in groups:
            for site in group:
                by_input.setdefault(group[0].input, {}).setdefault(expert_index(site.name), []).append(site)
        route_node = router_index_node(gm)
        routes = {node: sorted(e for e in parts if e is not None) for node, parts in by_input.items()}
        routes = {node: es for node, es in routes.items() if es}
        records = {}
        stats_iter = stage_input_stats(gm, ctx, list(by_input), self.options.sequential,
                                       routes=routes or None, route_node=route_node if routes else None)
        for (node, parts), stats in zip(by_input.items(), stats_iter):
            for expert, group in parts.items():
                h, note = stats.hessian(in_place=True), None
                if expert is not None:
                    h, note = self._expert_hessian(stats, expert)
                if h is None:  # few tokens, few_tokens=rtn: the scheme rounds these Linears itself
                    for site in group:
                        records[site.name] = {"quant": targets[site.name].describe(), **note}
                    continue
                self._quantize_group(gm, ctx, group, targets, h, records)
                if note is not None:
                    for site in group:
                        records[site.name].update(note)
            del stats  # before the next stage is collected
        return PassResult(gm, modified=True, stats={"linears": records})

    def _expert_hessian(self, stats, expert: int):
        """(Hessian or None for RTN, record) of a routed expert: from the tokens the router sent to it, or, below
        min_expert_tokens, as few_tokens says."""
        routed = (stats.routed or {}).get(expert)
        tokens = routed.rows if routed is not None else 0
        if tokens >= max(self.options.min_expert_tokens, 1):
            return routed.hessian(in_place=True), {"expert_tokens": tokens, "statistics": "routed tokens"}
        if self.options.few_tokens == "all":
            return stats.hessian(in_place=True), {"expert_tokens": tokens, "statistics": "all tokens (few routed)"}
        return None, {"expert_tokens": tokens, "statistics": "rtn (few routed)"}

    def _quantize_group(self, gm, ctx, group, targets, h, records):
        """GPTQ on the Linears of one shared input (rows stacked per target quantization)."""
        with single_thread():
            self._quantize_group_1t(gm, ctx, group, targets, h, records)

    def _quantize_group_1t(self, gm, ctx, group, targets, h, records):
        by_target: dict[WeightTarget, list] = {}
        for site in group:
            by_target.setdefault(targets[site.name], []).append(site)
        for t, sites in by_target.items():
            params = [get_tensor(gm, s.weight.target).detach() for s in sites]
            scales = [quantize(w, t)[1] for w in params]  # quantize widens to float32 itself: the same scales
            s_all, counts = torch.cat(scales), [w.shape[0] for w in params]
            w_all = torch.cat(params).float()  # one float32 copy (a 7B gate/up pair is 0.5 GiB)
            del params
            # weights the sparse pass pruned keep zero codes (else compensation would refill them)
            keep_zero = (w_all == 0) if any(meta.SPARSITY in s.node.meta for s in sites) else None
            codes = gptq_quantize(w_all, h, s_all, t.bits, damp=self.options.damp,
                                  block=self.options.block, act_order=self.options.act_order,
                                  keep_zero=keep_zero)
            wq_all = dequantize(codes, s_all)
            if not torch.isfinite(wq_all).all():
                raise ValueError(f"{ctx.prefix}{sites[0].name}: GPTQ produced a non-finite weight")

            def record_rows(r: slice):  # GPTQ's and RTN's weight errors and the weight, rows r
                w = w_all[r]
                rtn = dequantize(quantize(w, t, s_all[r])[0], s_all[r])
                return w - wq_all[r], w - rtn, w

            err, err_rtn, ref = row_errors(record_rows, w_all.shape[0], h)
            row = 0
            for site, count, scale in zip(sites, counts, scales):
                rows = slice(row, row + count)
                row += count
                total = float(ref[rows].sum())
                records[site.name] = {"quant": t.describe(),
                                      "rel_err": round(float(err[rows].sum()) / total, 6) if total else 0.0,
                                      "rel_err_rtn": round(float(err_rtn[rows].sum()) / total, 6) if total else 0.0}
                site.node.meta[meta.WEIGHT_QPARAMS] = (codes[rows].contiguous(), scale.contiguous())
                replace_tensor(gm, site.weight.target, wq_all[rows].to(ctx.dtype))
