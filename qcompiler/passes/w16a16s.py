"""w16a16s: float sparse Linears (the artifact's "W16A16S" type; msModelSlim's `--quant_type w16a16s`).

The `sparse` pass (which must run before it: `--passes sparse:ratio=0.3,w16a16s`) prunes the float weights;
this pass types every Linear it pruned "W16A16S": the artifact stores the pruned float weight (model dtype,
exact zeros) and bias unchanged, as msModelSlim's AscendV1 saver does (msmodelslim/core/quant_service/
modelslim_v1/save/ascendv1.py `AscendV1Saver.on_w16a16s`: the Linear's own parameters, typed W16A16S; ours
keeps the bias "FLOAT" as every other type does, spec section 2). The executable graph keeps the float
`aten.linear`: the kernel is a dense float matmul on the pruned weight (MindIE loads W16A16S as a FastLinear,
atb_llm/utils/layers/linear/__init__.py `get_linear`; vLLM-Ascend has no W16A16S scheme, so the targets allow
it with a warning). The compressed W16A16SC form needs MindIE's closed compressor: out of scope.
Decides, does not transform: `meta.FLOAT_QUANT_TYPE` on each claimed Linear, read by lowering.
Options: match (regex on the full HF Linear name); Linears claimed as scheme passes claim them (scheme.
unclaimed_sites). Every Linear it claims must be pruned by `sparse` (marked `meta.NEEDS_PRUNING`; the sparse
pass, which runs after the annotation, checks it), and a fused group (q/k/v, gate/up) must be claimed whole:
otherwise a one-line error on the first layer. Phase: ANNOTATE.
Requires: captured, weights_pruned. Produces: annotated (so the internal tail runs; nothing is quantized).
"""
import re
from dataclasses import dataclass

from ..errors import QCError
from ..ir import meta
from .base import Pass, PassResult, Phase
from .group_size import DENSE_FUSED_GROUPS
from .properties import ANNOTATED, CAPTURED, LOWERED, WEIGHTS_PRUNED
from .registry import register
from .scheme import unclaimed_sites

W16A16S = "W16A16S"
#: Linears the engines fuse (each group must carry one type)


@dataclass(frozen=True)
class W16A16SOptions:
    """match: regex searched in the full HF Linear name; default every Linear the sparse pass pruned."""
    match: str = ".*"

    def __post_init__(self):
        try:
            re.compile(self.match)
        except (re.error, TypeError) as e:
            raise ValueError(f"match {self.match!r} is not a valid regular expression ({e})") from None


@register
class W16A16Sparse(Pass):
    name = "w16a16s"
    summary = "W16A16S: float sparse Linears (pruned float weights typed W16A16S); needs sparse before it"
    quant_type = W16A16S
    requires = frozenset({CAPTURED, WEIGHTS_PRUNED})
    produces = frozenset({ANNOTATED})
    forbids = frozenset({ANNOTATED, LOWERED})
    phase = Phase.ANNOTATE
    Options = W16A16SOptions

    def run(self, gm, ctx):
        claimed = []
        for site in unclaimed_sites(gm, ctx, self.options.match):
            site.node.meta[meta.FLOAT_QUANT_TYPE] = W16A16S
            site.node.meta[meta.NEEDS_PRUNING] = self.name   # the sparse pass (after this one) must prune it
            claimed.append(site.name)
        for group in DENSE_FUSED_GROUPS:
            hit = [n for n in group if n in claimed]
            if hit and len(hit) != len(group):
                raise QCError(f"w16a16s would split {ctx.prefix}{'/'.join(group)} (engines fuse them): claim all of "
                              f"them or none (adjust match/--exclude)")
        return PassResult(gm, modified=bool(claimed), stats={"linears": claimed})
