"""Quantization specs: what an annotation pass decides for a Linear, read by observers and lowering.

Granularity is a type (PerTensor, PerChannel, PerToken, PerGroup), never a string. Specs are frozen
dataclasses validated at construction, so a nonsensical spec fails where it is made, not deep in a pass.
"""
from dataclasses import dataclass

from .qnumerics import check_bits


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (row of an [n, k] weight)."""


@dataclass(frozen=True)
class PerToken:
    """One scale per token (row of a [..., k] activation), computed at run time."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per `size` consecutive input channels of each output row."""
    size: int

    def __post_init__(self):
        if self.size <= 0 or self.size % 2:
            raise ValueError(f"group size must be a positive even number, got {self.size}")


Granularity = PerTensor | PerChannel | PerToken | PerGroup


# ---- observers: how a range (activation) or a scale (weight) is chosen; types, like granularity --------
@dataclass(frozen=True)
class MinMax:
    """Activations: the observed min and max. Weights: absmax per channel/group (round-to-nearest)."""


@dataclass(frozen=True)
class Percentile:
    """Activations: the `percentile` and 100 - `percentile` quantiles of every value seen (histogram)."""
    percentile: float = 99.99

    def __post_init__(self):
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")


@dataclass(frozen=True)
class Entropy:
    """Activations: the |x| threshold minimizing the KL divergence between the histogram and its
    int8-quantized version (TensorRT's entropy calibration)."""


@dataclass(frozen=True)
class L2Histogram:
    """Activations: the clip range [lo, hi] minimizing the L2 error of int8 quantization over a histogram of
    every value seen (PyTorch's HistogramObserver search; the base class of msModelSlim's histogram observer,
    msmodelslim/core/observer/histogram.py, whose default search method is L2_NORM). The min-max range is the
    search's starting candidate, so it clips only where that lowers the error."""


@dataclass(frozen=True)
class MSEClip:
    """Weights: per channel/group, the clip ratio r (scale = r * absmax / qmax) minimizing the
    quantization MSE, searched on a grid from 1.0 down to `min_ratio` (r = 1.0, min-max, is in it)."""
    grid: int = 100
    min_ratio: float = 0.5


@dataclass(frozen=True)
class OutlierSplit:
    """Weights (W8A8S, 4-bit codes in int8): per row, outliers keep int8 codes and set no scale: the scale is
    absmax(inliers) / qmax, inliers get codes in [-qmax, qmax], outliers round(w / scale) clamped to +-127.
    Outliers: the round(`fraction` * k) largest |w| of the row, or with `sigma` the w with |w - mean| > sigma *
    std of the row (msModelSlim's sparse-quant `fraction` / `use_sigma` + `sigma_factor`; its exact rule is in
    a closed binary, quant_funcs `quant_one_weight_by_outliers`)."""
    fraction: float = 0.0
    sigma: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"outlier fraction must be in [0, 1), got {self.fraction}")
        if self.sigma is not None and self.sigma <= 0:
            raise ValueError(f"outlier sigma must be > 0, got {self.sigma}")


ACTIVATION_OBSERVERS = (MinMax, Percentile, Entropy, L2Histogram)
WEIGHT_OBSERVERS = (MinMax, MSEClip, OutlierSplit)
Observer = MinMax | Percentile | Entropy | L2Histogram | MSEClip | OutlierSplit


@dataclass(frozen=True)
class TensorQuant:
    """How one tensor (weight or activation) is quantized."""
    bits: int
    symmetric: bool
    granularity: Granularity
    dynamic: bool = False  # computed at run time (per-token activations)
    observer: Observer = MinMax()  # how the range/scale is chosen (activations: calibration statistic)

    def __post_init__(self):
        check_bits(self.bits)  # any width 2..8; a backend says before any work which it can honour
        if self.dynamic and not isinstance(self.granularity, PerToken):
            raise ValueError("dynamic quantization is per-token")
        if self.dynamic and not isinstance(self.observer, MinMax):
            raise ValueError("dynamic (run-time) quantization has no calibration observer")

    def describe(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        gran = type(self.granularity).__name__
        if isinstance(self.granularity, PerGroup):
            gran += f"({self.granularity.size})"
        obs = "" if isinstance(self.observer, MinMax) else f" {self.observer}"
        return f"int{self.bits} {sym} {gran}{' dynamic' if self.dynamic else ''}{obs}"


@dataclass(frozen=True)
class LinearQuantSpec:
    """The decision for one Linear: artifact quant type plus weight and activation quantization."""
    quant_type: str                    # artifact type string: "W8A8", "W8A8_DYNAMIC", ...
    weight: TensorQuant
    activation: TensorQuant | None     # None: activations stay float (weight-only schemes)
    pass_name: str                     # which pass decided it (for reports and errors)

    def __post_init__(self):
        if not isinstance(self.weight.observer, WEIGHT_OBSERVERS):
            raise ValueError(f"weight observer must be one of {[c.__name__ for c in WEIGHT_OBSERVERS]}, "
                             f"got {self.weight.observer}")
        if self.activation is not None and not isinstance(self.activation.observer, ACTIVATION_OBSERVERS):
            raise ValueError(f"activation observer must be one of "
                             f"{[c.__name__ for c in ACTIVATION_OBSERVERS]}, got {self.activation.observer}")

    def needs_static_observer(self) -> bool:
        """True when calibration must observe this Linear's input range."""
        return self.activation is not None and not self.activation.dynamic

    def describe(self) -> str:
        act = self.activation.describe() if self.activation else "float"
        return f"{self.quant_type}: weight {self.weight.describe()}, activation {act}"
