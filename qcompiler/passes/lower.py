"""lower (internal): replace every annotated Linear by the Ascend backend's fused quantized ops.

For each annotated `aten.linear` node: encode the artifact tensors (backends/ascend/encode.py), store
the ones the kernel reads as buffers under the Linear's HF names (`self_attn.q_proj.weight` becomes the
int8 weight, `...deq_scale`, `...quant_bias`, ...), rewrite the node into `torch.ops.qc.*` calls, and
record the full tensor set in `ctx.artifact` for the artifact writer. Observers are read and removed;
float tensors no longer referenced (folded biases, float weights) are dropped from the graph.

Static W8A8:  x_q = qc.quantize(x, input_scale, input_offset)       one per shared input (q/k/v)
              y   = qc.quant_matmul(x_q, weight, deq_scale, quant_bias, dtype)
Requires: annotated, calibrated. Produces: lowered.
Limits: the quant types in `LOWERINGS`; anything else is an error naming the type.
"""
import torch

from ..backends.ascend import encode, ops  # noqa: F401  (ops registers torch.ops.qc.*)
from ..errors import QCError
from ..ir import meta
from ..ir.observers import MinMaxObserver
from ..ir.patterns import get_tensor, linear_sites
from .base import LinearArtifact, Pass, PassResult
from .registry import register


def set_tensor(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Store `value` as a buffer at `target` (replacing a parameter or buffer of that name)."""
    mod_path, _, attr = target.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    mod._parameters.pop(attr, None)
    mod._buffers.pop(attr, None)
    mod.register_buffer(attr, value)


def prune_unused_tensors(gm: torch.fx.GraphModule) -> None:
    """Drop dead nodes, then parameters/buffers that no get_attr node reads any more."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k, _ in gm.named_parameters()] + [k for k, _ in gm.named_buffers()]:
        if name not in used:
            mod_path, _, attr = name.rpartition(".")
            mod = gm.get_submodule(mod_path) if mod_path else gm
            mod._parameters.pop(attr, None)
            mod._buffers.pop(attr, None)


def remove_observers(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, MinMaxObserver]:
    """Bypass and erase observer nodes; returns {observed input node: observer} for lowering to read."""
    seen = {}
    for node in [n for n in gm.graph.nodes if meta.OBSERVER in n.meta]:
        source = node.args[0]
        seen[source] = gm.get_submodule(node.target)
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        delattr(gm, node.target)
    return seen


class _Lowering:
    """State of one lowering run: the graph, the context, shared quantize nodes per input."""

    def __init__(self, gm, ctx, observers):
        self.gm, self.ctx, self.observers = gm, ctx, observers
        self.quantized_inputs: dict[torch.fx.Node, torch.fx.Node] = {}

    def attr(self, target: str, value: torch.Tensor) -> torch.fx.Node:
        set_tensor(self.gm, target, value)
        return self.gm.graph.get_attr(target)

    def w8a8(self, site, spec):
        observer = self.observers.get(site.input)
        if observer is None or not observer.observed:
            raise QCError(f"{self.ctx.prefix}{site.name}: no calibration statistics for its input")
        weight = get_tensor(self.gm, site.weight.target)
        bias = get_tensor(self.gm, site.bias.target) if site.bias is not None else None
        s_x, o_x = encode.static_activation_params(*observer.range(), self.ctx.dtype)
        tensors = encode.encode_w8a8(weight, bias, s_x, o_x, self.ctx.dtype)
        g = self.gm.graph
        with g.inserting_before(site.node):
            if site.input not in self.quantized_inputs:
                scale = self.attr(f"{site.name}.input_scale", tensors["input_scale"])
                offset = self.attr(f"{site.name}.input_offset", tensors["input_offset"])
                xq = g.call_function(torch.ops.qc.quantize.default, (site.input, scale, offset))
                xq.meta[meta.LOWERED_FROM] = site.name
                self.quantized_inputs[site.input] = xq
            xq = self.quantized_inputs[site.input]
            w = self.attr(site.weight.target, tensors["weight"])
            deq = self.attr(f"{site.name}.deq_scale", tensors["deq_scale"])
            qbias = self.attr(f"{site.name}.quant_bias", tensors["quant_bias"])
            y = g.call_function(torch.ops.qc.quant_matmul.default, (xq, w, deq, qbias, self.ctx.dtype))
        return y, tensors


LOWERINGS = {"W8A8": _Lowering.w8a8}


@register
class LowerAscend(Pass):
    name = "lower"
    summary = "replace annotated Linears by fused Ascend kernels (qc.* ops); record artifact tensors"
    requires = frozenset({"annotated", "calibrated"})
    produces = frozenset({"lowered"})
    internal = True

    def run(self, gm, ctx):
        observers = remove_observers(gm)
        state = _Lowering(gm, ctx, observers)
        lowered = []
        for site in linear_sites(gm):
            spec = site.node.meta.get(meta.QUANT_SPEC)
            if spec is None:
                continue
            lower_fn = LOWERINGS.get(spec.quant_type)
            if lower_fn is None:
                raise QCError(f"the ascend backend cannot lower {spec.quant_type} yet "
                              f"(supported: {', '.join(LOWERINGS)})")
            y, tensors = lower_fn(state, site, spec)
            y.meta[meta.LOWERED_FROM] = site.name
            y.meta[meta.QUANT_SPEC] = spec
            site.node.replace_all_uses_with(y)
            gm.graph.erase_node(site.node)
            ctx.artifact[site.name] = LinearArtifact(spec.quant_type, tensors)
            lowered.append(site.name)
        prune_unused_tensors(gm)
        gm.recompile()
        return PassResult(gm, modified=bool(lowered or observers), stats={"lowered": lowered})
