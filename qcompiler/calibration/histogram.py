"""HistogramObserver: an activation observer (like MinMaxObserver) whose range comes from a histogram.

Contract: `forward(x)` returns x unchanged and accumulates a signed histogram of every value seen, over
[-A, A] with `2 * bins` equal bins, A = the running absmax; the exact min and max are kept too.
`range()` -> (lo, hi), the activation range lowering turns into the static per-tensor asymmetric int8
scale and offset (`encode.static_activation_params`), always inside [min, max]:
- Percentile(p): lo = the (100 - p)% quantile, hi = the p% quantile (linear inside a bin). The two tails
  are clipped separately because W8A8 activations are asymmetric.
- Entropy(): TensorRT's entropy calibration on the |x| histogram (`bins` bins over [0, A]): the threshold
  T among bin edges 128..bins whose clipped-and-quantized-to-128-levels distribution has the least KL
  divergence from the clipped reference; range = [max(min, -T), min(max, T)]. 128 levels because a
  symmetric int8 grid has 128 per side; our grid is asymmetric (255 steps over [lo, hi]), so T is the
  clipping point only, the scale is still computed from [lo, hi].
L2HistogramObserver (qspec.L2Histogram): PyTorch's own HistogramObserver (torch.ao.quantization, qint8 per-tensor
affine, the same 256-level asymmetric grid as W8A8's activations) accumulates the histogram and searches the
clip range of least L2 quantization error; `range()` is the range its scale and zero point span.
Accuracy: when a later batch widens A, the old counts are moved to the new bin holding each old bin's
centre (at most one new bin width of error per value, as PyTorch's HistogramObserver does). Quantiles are
therefore exact to within one bin width (A / bins); with the default 2048 bins per side that is 0.05% of A.
Several processes (distributed.py): `reduce_across_ranks()` moves each rank's counts onto the widest rank's
grid (the same bin-centre rebinning) and sums them (integer counts in float64: exact); min, max and count are
reduced exactly. The result differs from one process that saw every batch only by where rebinning put the
counts: each value lies at most one bin of the final grid away from where exact binning would put it on
either path, so a quantile moves by at most two bin widths (tests/ir/test_observers_calib.py).
"""
import numpy as np
import torch

from ..ir.qspec import Entropy, L2Histogram, Percentile
from .observers import reduce_min_max_count

QUANT_LEVELS = 128  # TensorRT: levels of one side of a symmetric int8 grid
#: values per torch.histc call. Its CPU kernel counts into a float32 histogram per thread, so a bin stops growing
#: at 2**24 (torch 2.13, measured: 1e8 zeros counted as 16,777,216 on one thread, 33,554,432 on two); a 7B
#: down_proj input of 8 x 512 tokens is 77.6M values, most of them in a few centre bins. Calls of at most this
#: many values count exactly (every count <= 2**24), and their sum is kept in float64.
HISTC_MAX_VALUES = 1 << 24


def histogram_counts(flat: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """float64 [bins]: exact counts of the 1-D tensor `flat` (any float dtype, widened to float32 a slice at a
    time: no float32 copy of the whole input) over `bins` equal bins of [lo, hi], as `torch.histc(flat.float(),
    bins, lo, hi)` counts them (values outside [lo, hi] ignored), in slices of HISTC_MAX_VALUES."""
    out = torch.zeros(bins, dtype=torch.float64)
    for s in range(0, flat.numel(), HISTC_MAX_VALUES):
        out += torch.histc(flat[s:s + HISTC_MAX_VALUES].float(), bins=bins, min=lo, max=hi)
    return out


def extremes_first_slices(flat: torch.Tensor, size: int = HISTC_MAX_VALUES):
    """The 1-D tensor `flat` as float32 slices of at most `size` (>= 2) values, with its minimum and maximum moved into
    the first slice (swapped with the values at positions 0 and 1): a permutation of the values, so any
    order-free statistic is unchanged, and an observer fed the slices in order finds the whole range in the
    first one. Infinite values are dropped first (torch's HistogramObserver ignores them too)."""
    if not bool(torch.isfinite(flat).all()):
        flat = flat[flat.abs() != float("inf")]
    n = flat.numel()
    if n == 0:
        return
    source = {}  # position -> position of the value it holds after the swaps (identity if absent)
    for target, want in ((0, int(flat.argmin())), (1, int(flat.argmax()))):
        if target >= n:
            break
        now = next((p for p, q in source.items() if q == want), want)  # where that value sits now
        source[target], source[now] = source.get(now, now), source.get(target, target)
    for s in range(0, n, size):
        chunk = flat[s:s + size].float()
        moved = [(p, q) for p, q in source.items() if s <= p < s + size and p != q]
        if moved:
            if flat.dtype == torch.float32:  # .float() returned a view of the caller's tensor
                chunk = chunk.clone()
            for p, q in moved:
                chunk[p - s] = flat[q].float()
        yield chunk


class HistogramObserver(torch.nn.Module):
    def __init__(self, method: Percentile | Entropy, bins: int = 2048):
        super().__init__()
        if not isinstance(method, (Percentile, Entropy)):
            raise ValueError(f"HistogramObserver needs Percentile or Entropy, got {method!r}")
        if bins < QUANT_LEVELS:
            raise ValueError(f"bins must be >= {QUANT_LEVELS}, got {bins}")
        self.method, self.bins = method, bins
        self.min, self.max = float("inf"), float("-inf")
        self.absmax = 0.0
        self.hist = torch.zeros(2 * bins, dtype=torch.float64)  # over [-absmax, absmax]
        self.count = 0

    @property
    def observed(self) -> bool:
        return self.count > 0

    def _rebin(self, new_absmax: float) -> None:
        """Move the counts to a histogram over [-new_absmax, new_absmax] (bin centre -> new bin)."""
        if self.absmax > 0 and self.hist.sum() > 0:
            self.hist = rebin_centres(self.hist, -self.absmax, self.absmax, -new_absmax, new_absmax)
        self.absmax = new_absmax

    def reduce_across_ranks(self) -> None:
        """Several processes: one histogram over every rank's share (module docstring); no-op alone."""
        from .. import distributed
        if distributed.world() <= 1:
            return
        absmax = float(distributed.all_max(torch.tensor([self.absmax], dtype=torch.float64)).item())
        if absmax > self.absmax:
            self._rebin(absmax)
        self.hist = distributed.all_sum(self.hist)
        self.min, self.max, self.count = reduce_min_max_count(self.min, self.max, self.count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1)
        if flat.numel() == 0:
            return x
        # extrema in x's dtype, then widened (the same values as from x.float()); counts exact at any size
        lo, hi = (v.float().item() for v in torch.aminmax(flat))
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        amax = max(abs(lo), abs(hi))
        if amax > self.absmax:
            self._rebin(amax)
        if self.absmax > 0:
            self.hist += histogram_counts(flat, 2 * self.bins, -self.absmax, self.absmax)
        else:  # every value so far is 0: all mass in the two centre bins
            self.hist[self.bins] += flat.numel()
        self.count += flat.numel()
        return x

    # ---- ranges -----------------------------------------------------------------------------------
    def _quantile(self, q: float) -> float:
        """Value below which a fraction q of the mass lies (linear interpolation inside a bin)."""
        hist = self.hist.numpy()
        cdf = np.cumsum(hist)
        target = q * cdf[-1]
        i = int(np.searchsorted(cdf, target, side="left"))
        i = min(i, len(hist) - 1)
        before = cdf[i - 1] if i > 0 else 0.0
        frac = (target - before) / hist[i] if hist[i] > 0 else 0.0
        width = 2 * self.absmax / len(hist)
        return -self.absmax + (i + frac) * width

    def entropy_threshold(self) -> float:
        """TensorRT's KL-minimizing |x| threshold (see the module docstring)."""
        n = self.bins
        signed = self.hist.numpy()
        folded = signed[n:] + signed[:n][::-1]            # |x| histogram, bins over [0, absmax]
        width = self.absmax / n
        best_kl, best_i = np.inf, n
        nonzero = (folded > 0).astype(np.float64)
        tail = np.concatenate([np.cumsum(folded[::-1])[::-1], [0.0]])  # tail[i] = folded[i:].sum()
        for i in range(QUANT_LEVELS, n + 1):
            src = folded[:i]
            ref = src.copy()
            ref[-1] += tail[i]                            # clipped outliers land in the last bin
            # quantize src (without the outliers) into 128 levels (bin j -> level j * 128 // i) and spread
            # each level's mass uniformly over the non-empty source bins it covers
            level = np.arange(i) * QUANT_LEVELS // i
            starts = np.flatnonzero(np.diff(level, prepend=-1))
            mass = np.add.reduceat(src, starts)
            filled = np.add.reduceat(nonzero[:i], starts)
            expanded = np.where(src > 0, (mass / np.maximum(filled, 1.0))[level], 0.0)
            if ref.sum() == 0 or expanded.sum() == 0:
                continue
            p, qd = ref / ref.sum(), expanded / expanded.sum()
            mask = p > 0
            # q = 0 where p > 0 only for the last bin when it held outliers alone: floor it (finite KL)
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(qd[mask], 1e-12))))
            if kl < best_kl:
                best_kl, best_i = kl, i
        return best_i * width

    def range(self) -> tuple[float, float]:
        if not self.observed:
            raise RuntimeError("observer saw no data")
        if self.absmax == 0:
            return 0.0, 0.0
        if isinstance(self.method, Percentile):
            p = self.method.percentile / 100.0
            lo = self._quantile(1.0 - p) if p < 1.0 else self.min
            hi = self._quantile(p) if p < 1.0 else self.max
        else:
            t = self.entropy_threshold()
            lo, hi = -t, t
        return float(max(lo, self.min)), float(min(hi, self.max))

    def extra_repr(self) -> str:
        return f"{self.method}, min={self.min:.4g}, max={self.max:.4g}, count={self.count}"


class L2HistogramObserver(torch.nn.Module):
    """Activation observer with PyTorch's L2 histogram search (module docstring); forward returns x unchanged."""

    def __init__(self, method: L2Histogram | None = None):
        super().__init__()
        from torch.ao.quantization import HistogramObserver as TorchHistogramObserver
        self.method = method or L2Histogram()
        self.torch_observer = TorchHistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine)
        self.min, self.max, self.count = float("inf"), float("-inf"), 0

    @property
    def observed(self) -> bool:
        return self.count > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1)
        if flat.numel():
            if flat.numel() <= HISTC_MAX_VALUES:
                self.torch_observer(flat.float())
            else:
                # torch's observer counts with one torch.histc call per forward (a bin stops at 2**24 values:
                # HISTC_MAX_VALUES), so it gets slices; the first holds the minimum and maximum, so its range is
                # settled there and each later slice's counts are added on the same bins, as one call would
                for chunk in extremes_first_slices(flat, HISTC_MAX_VALUES):
                    self.torch_observer(chunk)
            lo, hi = torch.aminmax(flat)
            self.min = min(self.min, float(lo.float()))
            self.max = max(self.max, float(hi.float()))
            self.count += flat.numel()
        return x

    def reduce_across_ranks(self) -> None:
        """Several processes: each rank's torch histogram moved onto the common [min, max] (bin centre -> new
        bin, as HistogramObserver does) and summed; min, max and count exact; no-op alone."""
        from .. import distributed
        if distributed.world() <= 1:
            return
        obs = self.torch_observer
        lo = float(distributed.all_min(obs.min_val.reshape(1).double()).item())
        hi = float(distributed.all_max(obs.max_val.reshape(1).double()).item())
        hist = obs.histogram.double()
        if hist.sum() > 0 and (float(obs.min_val), float(obs.max_val)) != (lo, hi):
            hist = rebin_centres(hist, float(obs.min_val), float(obs.max_val), lo, hi)
        obs.histogram = distributed.all_sum(hist).to(obs.histogram.dtype)
        obs.min_val = torch.tensor(lo, dtype=obs.min_val.dtype)
        obs.max_val = torch.tensor(hi, dtype=obs.max_val.dtype)
        self.min, self.max, self.count = reduce_min_max_count(self.min, self.max, self.count)

    def range(self) -> tuple[float, float]:
        if not self.observed:
            raise RuntimeError("observer saw no data")
        if self.min == self.max:
            return self.min, self.max
        scale, zero_point = self.torch_observer.calculate_qparams()
        s, z = float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])
        lo, hi = (-128 - z) * s, (127 - z) * s
        return float(max(lo, self.min)), float(min(hi, self.max))

    def extra_repr(self) -> str:
        return f"{self.method}, min={self.min:.4g}, max={self.max:.4g}, count={self.count}"


def rebin_centres(hist: torch.Tensor, lo: float, hi: float, new_lo: float, new_hi: float) -> torch.Tensor:
    """Counts `hist` [n] over equal bins of [lo, hi] moved onto n equal bins of [new_lo, new_hi] ⊇ [lo, hi]:
    each old bin's count goes to the new bin holding its centre (float64)."""
    n = hist.numel()
    centres = lo + (torch.arange(n, dtype=torch.float64) + 0.5) * ((hi - lo) / n)
    span = new_hi - new_lo
    if span <= 0:  # every value seen is one number: all mass in one bin
        return torch.zeros(n, dtype=torch.float64).index_add_(0, torch.zeros(n, dtype=torch.long), hist.double())
    idx = ((centres - new_lo) / span * n).floor().clamp_(0, n - 1).long()
    return torch.zeros(n, dtype=torch.float64).index_add_(0, idx, hist.double())

