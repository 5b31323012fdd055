"""observe (internal): insert activation observers on the input edges of statically quantized Linears.

One observer per distinct input node, shared by all annotated Linears that read it (q/k/v, gate/up), so
a fused group gets identical activation statistics. Other consumers of the input keep reading it
directly. Observers are `call_module` nodes (`qc_observer_<n>` submodules, `meta.OBSERVER` set).
The observer's kind follows the activation spec's `observer` type: MinMax -> MinMaxObserver, Percentile /
Entropy -> HistogramObserver, L2Histogram -> L2HistogramObserver (calibration/histogram.py). Linears sharing an input share one scheme (checked by the
driver), so the first one's spec decides.
Requires: annotated. Produces: observed. Lowering removes them.
"""
from ..ir import meta
from ..calibration.histogram import HistogramObserver, L2HistogramObserver
from ..calibration.observers import MinMaxObserver
from ..ir.qspec import L2Histogram, MinMax
from ..ir.patterns import linear_sites, shared_input_groups
from .base import Pass, PassResult
from .properties import ANNOTATED, OBSERVED
from .registry import register


def make_observer(kind):
    """The observer module for an activation observer type (ir/qspec.py)."""
    if isinstance(kind, MinMax):
        return MinMaxObserver()
    if isinstance(kind, L2Histogram):
        return L2HistogramObserver(kind)
    return HistogramObserver(kind)


@register
class Observe(Pass):
    name = "observe"
    summary = "insert activation observers (min-max or histogram) on inputs of statically quantized Linears"
    requires = frozenset({ANNOTATED})
    produces = frozenset({OBSERVED})
    internal = True

    def run(self, gm, ctx):
        count = 0
        for group in shared_input_groups(linear_sites(gm)):
            static = [s for s in group if meta.QUANT_SPEC in s.node.meta
                      and s.node.meta[meta.QUANT_SPEC].needs_static_observer()]
            if not static:
                continue
            obs_name = f"qc_observer_{count}"
            gm.add_submodule(obs_name, make_observer(static[0].node.meta[meta.QUANT_SPEC].activation.observer))
            with gm.graph.inserting_after(group[0].input):
                obs = gm.graph.call_module(obs_name, (group[0].input,))
            obs.meta[meta.OBSERVER] = obs_name
            obs.meta["val"] = group[0].input.meta.get("val")
            for s in static:
                s.node.replace_input_with(s.input, obs)
            count += 1
        if count:
            gm.recompile()
        return PassResult(gm, modified=bool(count), stats={"observers": count})
