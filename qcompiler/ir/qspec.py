"""Quantization specs: what an annotation pass decides for a Linear, read by observers and lowering.

Granularity is a type (PerTensor, PerChannel, PerToken, PerGroup), never a string. Specs are frozen
dataclasses validated at construction, so a nonsensical spec fails where it is made, not deep in a pass.
"""
from dataclasses import dataclass


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


@dataclass(frozen=True)
class TensorQuant:
    """How one tensor (weight or activation) is quantized."""
    bits: int
    symmetric: bool
    granularity: Granularity
    dynamic: bool = False  # computed at run time (per-token activations)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.dynamic and not isinstance(self.granularity, PerToken):
            raise ValueError("dynamic quantization is per-token")

    def describe(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        gran = type(self.granularity).__name__
        if isinstance(self.granularity, PerGroup):
            gran += f"({self.granularity.size})"
        return f"int{self.bits} {sym} {gran}{' dynamic' if self.dynamic else ''}"


@dataclass(frozen=True)
class LinearQuantSpec:
    """The decision for one Linear: artifact quant type plus weight and activation quantization."""
    quant_type: str                    # artifact type string: "W8A8", "W8A8_DYNAMIC", ...
    weight: TensorQuant
    activation: TensorQuant | None     # None: activations stay float (weight-only schemes)
    pass_name: str                     # which pass decided it (for reports and errors)

    def needs_static_observer(self) -> bool:
        """True when calibration must observe this Linear's input range."""
        return self.activation is not None and not self.activation.dynamic

    def describe(self) -> str:
        act = self.activation.describe() if self.activation else "float"
        return f"{self.quant_type}: weight {self.weight.describe()}, activation {act}"
