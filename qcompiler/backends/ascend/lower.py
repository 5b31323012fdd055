"""lower (internal pass of the Ascend backend): replace every annotated Linear by its fused quantized ops.

The target-neutral pipeline appends it by name (passes.TAIL); it is registered when qcompiler.backends.ascend
is imported (the driver does; ONNX lowers the executable graph this pass writes: backends/onnx/).
For each annotated `aten.linear` node: encode the artifact tensors (encode.py), store
the ones the kernel reads as buffers under the Linear's HF names (`self_attn.q_proj.weight` becomes the
int8 weight, `...deq_scale`, `...quant_bias`, `...weight_scale`, ...), rewrite the node into
`torch.ops.qc.*` calls, and record the full tensor set in `ctx.artifact` for the artifact writer.
Observers are read and removed; float tensors no longer referenced (folded biases, float weights) are
dropped from the graph. When an earlier pass (gptq, awq) left `meta.WEIGHT_QPARAMS` = (codes, scales) on
the Linear, exactly those codes and scales are encoded (`q=`, `scale=`) instead of rounding the weight;
else a weight spec with the MSEClip observer (weight_observer=mse) encodes with the searched scale.

W8A8, W8A8_MIX, W8A8S (static): x_q = qc.quantize(x, input_scale, input_offset)   one per shared input
                               y   = qc.quant_matmul(x_q, weight, deq_scale, quant_bias, dtype)
W8A8_DYNAMIC:                  x_q, s = qc.dynamic_quant(x)                       one per shared input
                               y   = qc.quant_matmul_pertoken(x_q, weight, weight_scale, s, bias, 0, dtype)
W4A8_DYNAMIC (per-group):      x_q, s = qc.dynamic_quant(x)                       one per shared input
                               y   = qc.quant_matmul_pergroup(x_q, weight, weight_scale, weight_scale_second,
                                                              s, group_size, dtype)
W8A16, W4A16:                  y   = qc.weight_quant_matmul(x, weight, weight_scale, weight_offset, bias,
                                                            group_size, packing 0 | 1 (int4 along k) | 2)
W4A16 on a routed MoE expert:  the same op on `weight_packed` (packing 3: int4 in int32 along k), the layout
                               vLLM-Ascend's W4A16 fused-MoE method loads (encode.encode_w4a16_moe)
W16A16S (meta.FLOAT_QUANT_TYPE, no spec): the float aten.linear stays; its weight/bias are recorded as is.
Simulated tensor parallelism (meta.TP_SHARDS = n, simulate_tp pass): the Linear becomes n cards' partial products
over contiguous k shards (`<linear>.tp<r>_*` buffers; dynamic schemes quantize each card's input shard per token;
static ones slice the shared quantized input; biases / quant_bias on card 0 only) summed in float32 and rounded
once to the model dtype; the artifact keeps the full tensors.
Every scale and bias buffer holds the value the engines hold (rounded to the model dtype, encode.py).
Requires: annotated, calibrated. Produces: lowered.
Limits: the quant types in `LOWERINGS`; anything else is an error naming the type. W4A8_DYNAMIC's
scale_bias and weight offsets are written to the artifact only (the kernel math does not read them).
"""
import functools
import operator
import re

import torch

aten = torch.ops.aten

from ...calibration.observers import MinMaxObserver
from ...calibration.weight_clip import mse_weight_scale, outlier_split_codes
from ...errors import QCError
from ...ir import meta
from ...ir.moe import EXPERT_LINEAR
from ...ir.patterns import get_tensor, linear_sites, prune_unused_tensors, set_tensor
from ...ir.qspec import MSEClip, OutlierSplit, PerGroup
from ...passes.base import LinearArtifact, Pass, PassResult
from ...passes.registry import register
from . import encode, kernels, ops  # noqa: F401  (ops registers the CPU / NPU kernels of torch.ops.qc.*)


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


#: row-parallel Linears (layer-relative names): W4A8_DYNAMIC scale_bias is [n, 16] for these. An expert's (and Qwen2-MoE's
#: shared expert's) down_proj too: vLLM-Ascend's w2_scale_bias is [E, hidden, 16 // tp]
#: (quantization/methods/w4a8.py AscendW4A8DynamicFusedMoEMethod.get_dynamic_quant_param_modelslim)
ROW_PARALLEL = re.compile(r"(^self_attn\.o_proj|^mlp\.down_proj|^mlp\.(experts\.\d+|shared_expert)\.down_proj)$")


def _group_size(spec) -> int:
    """The spec's weight group size (0: per-channel)."""
    gran = spec.weight.granularity
    return gran.size if isinstance(gran, PerGroup) else 0


class _Lowering:
    """State of one lowering run: the graph, the context, shared activation-quantize nodes per input."""

    def __init__(self, gm, ctx, observers):
        self.gm, self.ctx, self.observers = gm, ctx, observers
        self.quantized_inputs: dict[tuple[str, torch.fx.Node], object] = {}

    def attr(self, target: str, value: torch.Tensor) -> torch.fx.Node:
        set_tensor(self.gm, target, value)
        return self.gm.graph.get_attr(target)

    # ---- simulated tensor parallelism (simulate_tp: meta.TP_SHARDS on row-parallel Linears) -------------
    @staticmethod
    def shards(site) -> int:
        return int(site.node.meta.get(meta.TP_SHARDS, 1))

    def shard_input(self, x: torch.fx.Node, r: int, n: int, k: int) -> torch.fx.Node:
        """Card r's slice of an activation along its last dim (k split in n contiguous equal parts)."""
        part = k // n
        node = self.gm.graph.call_function(aten.slice.Tensor, (x, -1, r * part, (r + 1) * part))
        return node

    def shard_attr(self, target: str, value: torch.Tensor, dim: int, r: int, n: int) -> torch.fx.Node:
        """Buffer `<linear>.tp<r>_<suffix>` holding card r's chunk of `value` along `dim`."""
        if value.shape[dim] % n:
            raise ValueError(f"{target}: dim {dim} of size {value.shape[dim]} does not split into {n} cards")
        linear, _, suffix = target.rpartition(".")
        return self.attr(f"{linear}.tp{r}_{suffix}", value.narrow(dim, r * (value.shape[dim] // n),
                                                                  value.shape[dim] // n).clone())

    def all_reduce(self, parts: list[torch.fx.Node]) -> torch.fx.Node:
        """Sum of the cards' outputs (model dtype each): float32 accumulation, one rounding to the model dtype."""
        g = self.gm.graph
        acc = None
        for y in parts:
            y32 = g.call_function(aten._to_copy.default, (y,), {"dtype": torch.float32})
            acc = y32 if acc is None else g.call_function(aten.add.Tensor, (acc, y32))
        return g.call_function(aten._to_copy.default, (acc,), {"dtype": self.ctx.dtype})

    def float_linear_tp(self, site, n: int) -> torch.fx.Node:
        """A float Linear (unquantized, or W16A16S) computed as n cards' partial products plus the all-reduce."""
        g = self.gm.graph
        weight = get_tensor(self.gm, site.weight.target)
        bias = get_tensor(self.gm, site.bias.target) if site.bias is not None else None
        with g.inserting_before(site.node):
            parts = []
            for r in range(n):
                x_r = self.shard_input(site.input, r, n, weight.shape[1])
                w_r = self.shard_attr(site.weight.target, weight, 1, r, n)
                b = self.attr(f"{site.name}.bias", bias) if (bias is not None and r == 0) else None
                parts.append(g.call_function(aten.linear.default, (x_r, w_r, b)))
            return self.all_reduce(parts)

    def float_tensors(self, site) -> dict[str, torch.Tensor]:
        """The float weight (and bias) of a Linear that stays float in the graph (W16A16S)."""
        tensors = {"weight": get_tensor(self.gm, site.weight.target).detach().contiguous()}
        if site.bias is not None:
            tensors["bias"] = get_tensor(self.gm, site.bias.target).detach().contiguous()
        return tensors

    # ---- inputs of the encoders ------------------------------------------------------------------
    def weight_args(self, site):
        """(float weight, float bias or None, {'q': codes, 'scale': scales} from WEIGHT_QPARAMS, or
        {'scale': searched scale} for weight_observer=mse, or {} for absmax)."""
        weight = get_tensor(self.gm, site.weight.target)
        bias = get_tensor(self.gm, site.bias.target) if site.bias is not None else None
        qparams = site.node.meta.get(meta.WEIGHT_QPARAMS)
        if qparams is None:
            wq = site.node.meta[meta.QUANT_SPEC].weight
            if isinstance(wq.observer, MSEClip):
                group = _group_size(site.node.meta[meta.QUANT_SPEC])
                return weight, bias, {"scale": mse_weight_scale(weight, wq.bits, group, wq.observer)}
            if isinstance(wq.observer, OutlierSplit):
                q, scale = outlier_split_codes(weight, wq.bits, wq.observer, self.ctx.dtype)
                return weight, bias, {"q": q, "scale": scale}
            return weight, bias, {}
        q, scale = qparams
        return weight, bias, {"q": q, "scale": scale}

    def static_params(self, site):
        observer = self.observers.get(site.input)
        if observer is None or not observer.observed:
            raise QCError(f"{self.ctx.prefix}{site.name}: no calibration statistics for its input")
        return encode.static_activation_params(*observer.range(), self.ctx.dtype)

    # ---- shared activation quantization --------------------------------------------------------
    def static_input(self, site, tensors):
        """qc.quantize of the Linear's input; q/k/v (gate/up) share one node and the first Linear's tensors."""
        key = ("static", site.input)
        if key not in self.quantized_inputs:
            scale = self.attr(f"{site.name}.input_scale", tensors["input_scale"])
            offset = self.attr(f"{site.name}.input_offset", tensors["input_offset"])
            xq = self.gm.graph.call_function(torch.ops.qc.quantize.default, (site.input, scale, offset))
            xq.meta[meta.LOWERED_FROM] = site.name
            self.quantized_inputs[key] = xq
        return self.quantized_inputs[key]

    def dynamic_input(self, site):
        """(int8 x, per-token scale) from one qc.dynamic_quant per input, shared by q/k/v (gate/up)."""
        key = ("dynamic", site.input)
        if key not in self.quantized_inputs:
            g = self.gm.graph
            dq = g.call_function(torch.ops.qc.dynamic_quant.default, (site.input,))
            xq = g.call_function(operator.getitem, (dq, 0))
            scale = g.call_function(operator.getitem, (dq, 1))
            for n in (dq, xq, scale):
                n.meta[meta.LOWERED_FROM] = site.name
            self.quantized_inputs[key] = (xq, scale)
        return self.quantized_inputs[key]

    # ---- one lowering per artifact type -----------------------------------------------------------
    def _static(self, site, encoder):
        weight, bias, given = self.weight_args(site)
        s_x, o_x = self.static_params(site)
        tensors = encoder(weight, bias, s_x, o_x, self.ctx.dtype, **given)
        n = self.shards(site)
        with self.gm.graph.inserting_before(site.node):
            xq = self.static_input(site, tensors)
            deq = self.attr(f"{site.name}.deq_scale", tensors["deq_scale"])
            if n == 1:
                w = self.attr(site.weight.target, tensors["weight"])
                qbias = self.attr(f"{site.name}.quant_bias", tensors["quant_bias"])
                y = self.gm.graph.call_function(torch.ops.qc.quant_matmul.default,
                                                (xq, w, deq, qbias, self.ctx.dtype))
                return y, tensors
            # card r: x_q[shard] @ W_q[shard]^T (+ quant_bias on card 0 only), times the shared deq_scale
            k = tensors["weight"].shape[1]
            zeros = torch.zeros_like(tensors["quant_bias"])
            parts = []
            for r in range(n):
                w = self.shard_attr(site.weight.target, tensors["weight"], 1, r, n)
                qbias = self.attr(f"{site.name}.tp{r}_quant_bias", tensors["quant_bias"] if r == 0 else zeros.clone())
                parts.append(self.gm.graph.call_function(torch.ops.qc.quant_matmul.default,
                                                         (self.shard_input(xq, r, n, k), w, deq, qbias,
                                                          self.ctx.dtype)))
            y = self.all_reduce(parts)
        return y, tensors

    def w8a8(self, site, spec):
        return self._static(site, encode.encode_w8a8)

    def w8a8_mix(self, site, spec):
        # the decode (static) path; the artifact also carries what the prefill (per-token) path reads
        return self._static(site, encode.encode_w8a8_mix)

    def w8a8s(self, site, spec):
        # W8A8's tensors and kernels; the codes keep to spec.weight.bits (4: [-7, 7] in the int8 weight,
        # scale absmax / 7) so a compressor can pack them; pruned (zero) weights give zero codes
        bits = spec.weight.bits
        split = isinstance(spec.weight.observer, OutlierSplit)  # outliers may use the whole int8 range

        def encoder(weight, bias, s_x, o_x, dtype, q=None, scale=None):
            if q is None:  # scale: weight_observer=mse; rounded to the model dtype like every weight scale
                q, scale = encode.quantize_weight(weight, bits, 0, scale, model_dtype=dtype)
            qmax = 7 if bits == 4 and not split else 127
            if q.numel() and int(q.abs().max()) > qmax:
                raise ValueError(f"W8A8S codes exceed the {bits}-bit range [-{qmax}, {qmax}]")
            return encode.encode_w8a8s(weight, bias, s_x, o_x, dtype, q=q, scale=scale)
        return self._static(site, encoder)

    def _pertoken(self, site, tensors, packing):
        g = self.gm.graph
        n = self.shards(site)
        if n > 1:  # each card quantizes its own input shard per token
            k = tensors["weight"].shape[1]
            with g.inserting_before(site.node):
                ws = self.attr(f"{site.name}.weight_scale", tensors["weight_scale"])
                parts = []
                for r in range(n):
                    dq = g.call_function(torch.ops.qc.dynamic_quant.default, (self.shard_input(site.input, r, n, k),))
                    xq, s = g.call_function(operator.getitem, (dq, 0)), g.call_function(operator.getitem, (dq, 1))
                    w = self.shard_attr(site.weight.target, tensors["weight"], 1, r, n)
                    b = self.attr(f"{site.name}.bias", tensors["bias"]) if ("bias" in tensors and r == 0) else None
                    parts.append(g.call_function(torch.ops.qc.quant_matmul_pertoken.default,
                                                 (xq, w, ws, s, b, packing, self.ctx.dtype)))
                return self.all_reduce(parts)
        with g.inserting_before(site.node):
            xq, s = self.dynamic_input(site)
            w = self.attr(site.weight.target, tensors["weight"])
            ws = self.attr(f"{site.name}.weight_scale", tensors["weight_scale"])
            b = self.attr(f"{site.name}.bias", tensors["bias"]) if "bias" in tensors else None
            y = g.call_function(torch.ops.qc.quant_matmul_pertoken.default,
                                (xq, w, ws, s, b, packing, self.ctx.dtype))
        return y

    def w8a8_dynamic(self, site, spec):
        weight, bias, given = self.weight_args(site)
        tensors = encode.encode_w8a8_dynamic(weight, bias, self.ctx.dtype, **given)
        return self._pertoken(site, tensors, kernels.PACK_NONE), tensors

    def w4a8_dynamic(self, site, spec):
        weight, bias, given = self.weight_args(site)
        group = _group_size(spec)
        tensors = encode.encode_w4a8_dynamic(weight, bias, bool(ROW_PARALLEL.match(site.name)), group, self.ctx.dtype,
                                             expert=EXPERT_LINEAR.search(site.name) is not None, **given)
        g = self.gm.graph
        n = self.shards(site)
        with g.inserting_before(site.node):
            ws = self.attr(f"{site.name}.weight_scale", tensors["weight_scale"])
            if n > 1:  # card r: its input shard quantized per token, its k columns (packed along n) and groups
                k = weight.shape[1]
                parts = []
                for r in range(n):
                    dq = g.call_function(torch.ops.qc.dynamic_quant.default, (self.shard_input(site.input, r, n, k),))
                    xq, s = g.call_function(operator.getitem, (dq, 0)), g.call_function(operator.getitem, (dq, 1))
                    w = self.shard_attr(site.weight.target, tensors["weight"], 1, r, n)
                    wss = self.shard_attr(f"{site.name}.weight_scale_second", tensors["weight_scale_second"], 1, r, n)
                    parts.append(g.call_function(torch.ops.qc.quant_matmul_pergroup.default,
                                                 (xq, w, ws, wss, s, group, self.ctx.dtype)))
                return self.all_reduce(parts), tensors
            xq, s = self.dynamic_input(site)
            w = self.attr(site.weight.target, tensors["weight"])
            wss = self.attr(f"{site.name}.weight_scale_second", tensors["weight_scale_second"])
            y = g.call_function(torch.ops.qc.quant_matmul_pergroup.default,
                                (xq, w, ws, wss, s, group, self.ctx.dtype))
        return y, tensors

    def _weight_only(self, site, spec, encoder, bits):
        weight, bias, given = self.weight_args(site)
        group = _group_size(spec)
        expert = bits == 4 and EXPERT_LINEAR.search(site.name) is not None
        if expert:  # routed expert: the fused-MoE layout (weight_packed int32 along k, encode.encode_w4a16_moe)
            encoder = encode.encode_w4a16_moe
        tensors = encoder(weight, bias, group, self.ctx.dtype, **given)
        per_channel = tensors["weight_scale"].shape[1] == 1  # also a group equal to k
        weight_key, weight_target = "weight", site.weight.target
        if bits == 8:
            packing = kernels.PACK_NONE
        elif expert:
            packing, weight_key, weight_target = kernels.PACK_INT4_INT32_K, "weight_packed", f"{site.name}.weight_packed"
        else:
            packing = kernels.PACK_INT4_K if per_channel else kernels.PACK_INT4_N
        g = self.gm.graph
        n = self.shards(site)
        with g.inserting_before(site.node):
            if n == 1:
                w = self.attr(weight_target, tensors[weight_key])
                ws = self.attr(f"{site.name}.weight_scale", tensors["weight_scale"])
                wo = self.attr(f"{site.name}.weight_offset", tensors["weight_offset"])
                b = self.attr(f"{site.name}.bias", tensors["bias"]) if "bias" in tensors else None
                y = g.call_function(torch.ops.qc.weight_quant_matmul.default,
                                    (site.input, w, ws, wo, b, 0 if per_channel else group, packing))
                return y, tensors
            # card r: its k columns of the (packed) weight and, per-group, of the scales
            k = weight.shape[1]
            parts = []
            for r in range(n):
                w = self.shard_attr(weight_target, tensors[weight_key], 1, r, n)
                if per_channel:
                    ws = self.attr(f"{site.name}.weight_scale", tensors["weight_scale"])
                    wo = self.attr(f"{site.name}.weight_offset", tensors["weight_offset"])
                else:
                    ws = self.shard_attr(f"{site.name}.weight_scale", tensors["weight_scale"], 1, r, n)
                    wo = self.shard_attr(f"{site.name}.weight_offset", tensors["weight_offset"], 1, r, n)
                b = self.attr(f"{site.name}.bias", tensors["bias"]) if ("bias" in tensors and r == 0) else None
                parts.append(g.call_function(torch.ops.qc.weight_quant_matmul.default,
                                             (self.shard_input(site.input, r, n, k), w, ws, wo, b,
                                              0 if per_channel else group, packing)))
            y = self.all_reduce(parts)
        return y, tensors

    def w8a16(self, site, spec):  # codes of spec.weight.bits (2..8) in the int8 weight (capability.py)
        return self._weight_only(site, spec, functools.partial(encode.encode_w8a16, bits=spec.weight.bits), 8)

    def w4a16(self, site, spec):
        return self._weight_only(site, spec, encode.encode_w4a16, 4)


LOWERINGS = {"W8A8": _Lowering.w8a8, "W8A8_MIX": _Lowering.w8a8_mix, "W8A8_DYNAMIC": _Lowering.w8a8_dynamic,
             "W8A16": _Lowering.w8a16, "W4A16": _Lowering.w4a16, "W4A8_DYNAMIC": _Lowering.w4a8_dynamic,
             "W8A8S": _Lowering.w8a8s}


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
            float_type = site.node.meta.get(meta.FLOAT_QUANT_TYPE)
            if spec is None and (float_type is not None or state.shards(site) > 1):
                # stays a float Linear (W16A16S, or unquantized): its tensors go to the artifact as they are
                ctx.artifact[site.name] = LinearArtifact(float_type or "FLOAT", state.float_tensors(site))
                if state.shards(site) > 1:
                    y = state.float_linear_tp(site, state.shards(site))
                    y.meta[meta.LOWERED_FROM] = site.name
                    site.node.replace_all_uses_with(y)
                    gm.graph.erase_node(site.node)
                lowered.append(site.name)
                continue
            if spec is None:
                continue
            lower_fn = LOWERINGS.get(spec.quant_type)
            if lower_fn is None:
                raise QCError(f"the ascend backend cannot lower {spec.quant_type} yet "
                              f"(supported: {', '.join(LOWERINGS)})")
            try:
                y, tensors = lower_fn(state, site, spec)
            except ValueError as e:  # encoder contract (shapes, code ranges of given WEIGHT_QPARAMS, ...)
                raise ValueError(f"{ctx.prefix}{site.name} ({spec.quant_type}): {e}") from e
            y.meta[meta.LOWERED_FROM] = site.name
            y.meta[meta.QUANT_SPEC] = spec
            site.node.replace_all_uses_with(y)
            gm.graph.erase_node(site.node)
            ctx.artifact[site.name] = LinearArtifact(spec.quant_type, tensors)
            lowered.append(site.name)
        prune_unused_tensors(gm)
        gm.recompile()
        return PassResult(gm, modified=bool(lowered or observers), stats={"lowered": lowered})
