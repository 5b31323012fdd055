"""Shared base of scheme passes (w8a8, w8a8d, w8a8mix, w8a16, w4a16, w4a8d): annotate Linears with a LinearQuantSpec.

A scheme pass decides, it does not transform: it writes `meta.QUANT_SPEC` on `aten.linear` nodes and
lowering reads it. A Linear is eligible when no earlier scheme pass claimed it (so schemes mix: the
first pass to claim a Linear wins), its full HF name matches no `--exclude` regex, and it matches the
pass's `match` option (a regex, `re.search` on the full HF name; default `.*`, every Linear). So a recipe
`[{w8a16: {match: 'mlp\\.down_proj'}}, w8a8]` gives down_proj W8A16 and every other Linear W8A8. The
driver rejects, before any work, a pipeline whose `match`/`--exclude` would split q/k/v or gate/up
(engines fuse them) or a scheme pass that claims no Linear (`driver.check_scheme_groups`).

Per-group schemes (w8a16, w4a16; w4a8d, per-group only, default 32) carry an option `group` (0 = per-channel,
else the group size along k).
The artifact has ONE group_size, so the driver resolves it over the whole model before any work
(`group_size.resolve_group_sizes`) and rebuilds the pass with the resolved value; the spec written on each
Linear carries it (smooth/awq/gptq read it there). A pass run directly on one layer (tests) with
`group=None` resolves the default over that layer's Linears with the same rule.
Phase: ANNOTATE (passes/base.py): every scheme pass runs before the float transforms, whatever the
--passes order, so those read each Linear's spec from its node instead of predicting it.
Observers (options on every scheme pass; values become types of ir/qspec.py on the spec, read by
observe and lower): `weight_observer=minmax|mse`; static schemes (w8a8, w8a8mix) also take
`act_observer=minmax|percentile|entropy|histogram` and `percentile=P` (with act_observer=percentile).
Requires: captured. Produces: annotated.
"""
import dataclasses
import re
from dataclasses import dataclass, field

from ..ir import meta
from ..ir.patterns import get_tensor, linear_sites
from ..ir.qspec import (Entropy, L2Histogram, LinearQuantSpec, MinMax, MSEClip, PerChannel, PerGroup,
                        Percentile, TensorQuant)
from .base import Pass, PassResult, Phase
from .group_size import GROUP_SIZES, default_group_size
from .properties import ANNOTATED, CAPTURED, LOWERED


#: option values -> observer types (ir/qspec.py); the options stay strings so `name:key=value` parses them
WEIGHT_OBSERVER_NAMES = {"minmax": MinMax, "mse": MSEClip}
ACT_OBSERVER_NAMES = {"minmax": MinMax, "percentile": Percentile, "entropy": Entropy, "histogram": L2Histogram}


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {'|'.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class SchemeOptions:
    """match: regex searched in the full HF Linear name (`model.layers.3.mlp.down_proj`); the pass claims
    only matching Linears. Default `.*`: every Linear not claimed by an earlier scheme pass.
    weight_observer: minmax (absmax scale, default) or mse (per channel/group clip ratio minimizing the
    weight's quantization MSE, calibration/weight_clip.py); codes an earlier gptq/awq pass chose win over it."""
    match: str = ".*"
    weight_observer: str = field(default="minmax", metadata={"choices": "minmax|mse"})

    def __post_init__(self):
        if not isinstance(self.match, str):
            raise ValueError(f"match must be a regular expression string, got {self.match!r}")
        try:
            re.compile(self.match)
        except re.error as e:
            raise ValueError(f"match {self.match!r} is not a valid regular expression ({e})") from None
        _check_choice("weight_observer", self.weight_observer, WEIGHT_OBSERVER_NAMES)

    def weight_observer_spec(self):
        return WEIGHT_OBSERVER_NAMES[self.weight_observer]()

    def act_observer_spec(self):
        return MinMax()


@dataclass(frozen=True)
class StaticSchemeOptions(SchemeOptions):
    """act_observer (static activation range from calibration): minmax (default), percentile (the
    `percentile` / 100 - `percentile` quantiles; percentile default 99.99, only with act_observer=percentile),
    entropy (TensorRT KL threshold) or histogram (L2-optimal clip range, PyTorch's / msModelSlim's histogram
    observer); calibration/histogram.py."""
    act_observer: str = field(default="minmax", metadata={"choices": "minmax|percentile|entropy|histogram"})
    percentile: float | None = field(default=None, metadata={"choices": "50 < P <= 100, default 99.99"})

    def __post_init__(self):
        super().__post_init__()
        _check_choice("act_observer", self.act_observer, ACT_OBSERVER_NAMES)
        if self.percentile is not None:
            if self.act_observer != "percentile":
                raise ValueError(f"percentile={self.percentile} needs act_observer=percentile "
                                 f"(act_observer is {self.act_observer})")
            if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)):
                raise ValueError(f"percentile must be a number in (50, 100], got {self.percentile!r}")
            Percentile(float(self.percentile))  # validates the range

    def act_observer_spec(self):
        if self.act_observer == "percentile" and self.percentile is not None:
            return Percentile(float(self.percentile))
        return ACT_OBSERVER_NAMES[self.act_observer]()


@dataclass(frozen=True)
class GroupSchemeOptions(SchemeOptions):
    """group: weight group size along k, one of 0 (per-channel), 32, 64, 128, 256; None = the default
    (128 if it divides every Linear the pass quantizes, else 64). One group size per artifact."""
    group: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.group is not None and (isinstance(self.group, bool) or self.group not in GROUP_SIZES):
            raise ValueError(f"group must be one of {', '.join(map(str, GROUP_SIZES))} "
                             f"(0 = per-channel), got {self.group!r}")


def unclaimed_sites(gm, ctx, match: str) -> list:
    """The Linear sites of the layer a scheme pass with `match` claims now: not yet claimed by an earlier scheme
    pass (no `meta.QUANT_SPEC`), matching no --exclude regex, and `match` searched in the full HF name. The
    one claim rule at run time; `group_size.first_claim` applies it to names before any work."""
    sites = []
    for site in linear_sites(gm):
        full = ctx.prefix + site.name
        if meta.QUANT_SPEC in site.node.meta or any(re.search(p, full) for p in ctx.exclude):
            continue
        if re.search(match, full) is not None:
            sites.append(site)
    return sites


class SchemePass(Pass):
    requires = frozenset({CAPTURED})
    produces = frozenset({ANNOTATED})
    forbids = frozenset({LOWERED})
    phase = Phase.ANNOTATE
    Options = SchemeOptions

    def spec(self, group_size: int = 0) -> LinearQuantSpec:
        """The spec for every Linear this pass claims; `group_size` only matters to per-group passes."""
        raise NotImplementedError

    def observed_spec(self, group_size: int = 0) -> LinearQuantSpec:
        """`spec` with the observers the options chose (weight_observer, act_observer on static schemes)."""
        spec = self.spec(group_size)
        weight = dataclasses.replace(spec.weight, observer=self.options.weight_observer_spec())
        act = spec.activation
        if act is not None and not act.dynamic:
            act = dataclasses.replace(act, observer=self.options.act_observer_spec())
        return dataclasses.replace(spec, weight=weight, activation=act)

    def claims(self, full_name: str) -> bool:
        """Whether `match` selects this Linear (exclusion and earlier passes are the caller's concern)."""
        return re.search(self.options.match, full_name) is not None

    def run(self, gm, ctx):
        sites = unclaimed_sites(gm, ctx, self.options.match)
        if not sites:
            return PassResult(gm, modified=False, stats={"linears": []})
        group = getattr(self.options, "group", 0)
        if group is None:  # not resolved by the driver (a pass run on its own): same rule, this layer only
            group = default_group_size({ctx.prefix + s.name: get_tensor(gm, s.weight.target).shape[1]
                                        for s in sites})
        spec = self.observed_spec(group)
        for site in sites:
            site.node.meta[meta.QUANT_SPEC] = spec
        return PassResult(gm, modified=True, stats={"linears": [s.name for s in sites]})


def weight_quant(bits: int, group_size: int = 0) -> TensorQuant:
    """Symmetric weight quantization, per-channel (group_size 0) or per-group."""
    return TensorQuant(bits, symmetric=True, granularity=PerGroup(group_size) if group_size else PerChannel())
