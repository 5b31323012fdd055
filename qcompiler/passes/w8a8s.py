"""w8a8s: msModelSlim's sparse quantization (the artifact's "W8A8S" type; Atlas 300I Duo, `--target ascend310p`).

= the `sparse` pass (which must run before it: `--passes sparse:ratio=0.5,w8a8s`) + static W8A8 whose int8
weights keep to a low-bit range so that a compressor can pack them: `bits=4` (default, msModelSlim's
w_bit=4) gives per-channel symmetric codes in [-7, 7] (scale = absmax_row / 7) stored unpacked in the int8
`weight`; `bits=8` gives the full [-127, 127]. Tensors and kernel math are W8A8's (spec section 3,
W8A8S): weight int8 [n, k], input_scale/input_offset, deq_scale = input_scale * weight_scale (int64
bit-copy for fp16), quant_bias (no weight_scale/weight_offset: encode.encode_w8a8s); pruned weights are exactly 0 in the stored
int8 weight (round(0 / s) = 0), and smaller weights that round to 0 add to the zeros.
Why it requires `sparse` instead of pruning itself: the pruning method, ratio and outlier fraction are
the sparse pass's options (one place to choose them, and `sparse` alone gives the float pruned model to
compare with). Every Linear w8a8s claims must be pruned by `sparse` (its `match`/`--exclude` must cover
them): w8a8s marks them `meta.NEEDS_PRUNING` and the sparse pass, which runs after the annotation (passes/
base.py Phase), stops with a one-line error on the first layer otherwise. fraction/sigma choose the codes,
so gptq/awq refuse a Linear whose spec has that observer (weight_targets.weight_targets).
Options: match (regex on the full HF Linear name), bits (4 or 8), fraction / sigma (weight outliers keep int8
codes: ir/qspec.py OutlierSplit), and w8a8's observers (weight_observer, act_observer, percentile).
Requires: captured, weights_pruned (the sparse pass). Produces: annotated.
Limits: the compressed W8A8SC form (what the 300I Duo runs fastest) is produced by a closed binary tool
(msModelSlim's compressor): out of scope; this writes the uncompressed W8A8S artifact it reads.
"""
from dataclasses import dataclass

from ..ir import meta
from ..ir.patterns import linear_sites
from ..ir.outlier_ranges import check_outlier_settings
from ..ir.qspec import LinearQuantSpec, OutlierSplit, PerTensor, TensorQuant
from .properties import CAPTURED, WEIGHTS_PRUNED
from .registry import register
from .scheme import SchemePass, StaticSchemeOptions, weight_quant


@dataclass(frozen=True)
class W8A8SOptions(StaticSchemeOptions):
    """bits: weight code range stored in int8: 4 -> [-7, 7] (default, packable), 8 -> [-127, 127].
    fraction: per row, the round(fraction * k) largest |w| are outliers that keep int8 codes (the scale comes
    from the other weights); sigma: outliers are instead |w - mean| > sigma * std of the row (msModelSlim's
    sparse-quant fraction / use_sigma + sigma_factor). Both default off; not with weight_observer=mse, gptq or awq.
    Ranges: msModelSlim's (sigma 3.0..4.0, fraction 0 or 0.01..0.1; ir/outlier_ranges.py check_outlier_settings)."""
    bits: int = 4
    fraction: float = 0.0
    sigma: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r}")
        OutlierSplit(float(self.fraction), None if self.sigma is None else float(self.sigma))  # validates
        check_outlier_settings(float(self.fraction), None if self.sigma is None else float(self.sigma))
        if (self.fraction or self.sigma is not None) and self.weight_observer != "minmax":
            raise ValueError("fraction/sigma choose the weight scale themselves: use weight_observer=minmax")

    def weight_observer_spec(self):
        if self.fraction or self.sigma is not None:
            return OutlierSplit(float(self.fraction), None if self.sigma is None else float(self.sigma))
        return super().weight_observer_spec()


@register
class W8A8S(SchemePass):
    name = "w8a8s"
    summary = ("sparse W8A8 (W8A8S, ascend310p): static W8A8 on sparse-pruned weights, codes in [-7,7] (bits=4) "
               "stored in int8; needs sparse before it. W8A8SC compression (closed tool) is out of scope")
    quant_type = "W8A8S"
    requires = frozenset({CAPTURED, WEIGHTS_PRUNED})
    Options = W8A8SOptions

    def spec(self, group_size=0):
        return LinearQuantSpec(quant_type="W8A8S", weight=weight_quant(self.options.bits),
                               activation=TensorQuant(8, symmetric=False, granularity=PerTensor()),
                               pass_name=self.name)

    def run(self, gm, ctx):
        result = super().run(gm, ctx)
        claimed = set(result.stats["linears"])
        for site in linear_sites(gm):
            if site.name in claimed:  # the sparse pass (TRANSFORM phase, after this one) must prune it
                site.node.meta[meta.NEEDS_PRUNING] = self.name
        return result
