"""Shared base of scheme passes (w8a8, ...): annotate every eligible Linear with a LinearQuantSpec.

A scheme pass decides, it does not transform: it writes `meta.QUANT_SPEC` on `aten.linear` nodes and
lowering reads it. A Linear is eligible when no earlier scheme pass claimed it (so schemes mix: the
first pass to claim a Linear wins) and its full HF name matches no `--exclude` regex.
Requires: captured. Produces: annotated.
"""
import re

from ..ir import meta
from ..ir.patterns import linear_sites
from ..ir.qspec import LinearQuantSpec
from .base import Pass, PassResult


class SchemePass(Pass):
    requires = frozenset({"captured"})
    produces = frozenset({"annotated"})
    forbids = frozenset({"lowered"})

    def spec(self) -> LinearQuantSpec:
        raise NotImplementedError

    def run(self, gm, ctx):
        spec = self.spec()
        claimed = []
        for site in linear_sites(gm):
            full = ctx.prefix + site.name
            if meta.QUANT_SPEC in site.node.meta or any(re.search(p, full) for p in ctx.exclude):
                continue
            site.node.meta[meta.QUANT_SPEC] = spec
            claimed.append(site.name)
        return PassResult(gm, modified=bool(claimed), stats={"linears": claimed})
