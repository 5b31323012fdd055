"""Weight layouts prepared once at load: the executable graph's CPU fast path (bit-identical).

`prepare_layer(gm) -> gm` takes a loaded layer graph (or its decode step, ir/decode.py) whose tensors are on
the CPU and returns it rewritten so that every tensor that depends on no activation is computed once, here,
instead of on every call, and the `torch.ops.qc.*` nodes call the CPU kernels directly (a custom op's
dispatch costs ~10 us, and a decoded token makes 200+ such calls):

| node | prepared tensors (module attributes `prepared_N`) | kernel called |
|---|---|---|
| qc.weight_quant_matmul (W8A16, W4A16) | `dequantize_weight(...)` [n, k] in x's dtype; bias in x's dtype | `weight_quant_matmul_prepared` |
| qc.quant_matmul_pertoken (W8A8/W4A8_DYNAMIC) | weight unpacked to int8 and held row-wise in `kernels.rowwise_parts` parts along n (`kernels.rowwise_codes`: uint8 [parts, k, n / parts + 8]; int8 [n, k] past `kernels.rowwise_layout_pays`); weight_scale f32 [n]; bias f32 | `quant_matmul_pertoken_prepared` |
| qc.quant_matmul_pergroup (W4A8_DYNAMIC per-group) | int4 unpacked to int8 and held row-wise (`kernels.rowwise_codes`, one part: uint8 [k, n + 8]); two-stage scale [G, 1, n]; whether the group sums fold in one call (`kernels.pergroup_fold_applies`) | `quant_matmul_pergroup_prepared` |
| qc.quant_matmul (W8A8 static) | weight row-wise as for W8A8_DYNAMIC (the artifact's int8 weight past `kernels.rowwise_layout_pays`); deq_scale decoded to f32; quant_bias in its accumulator dtype, and as f32 where `kernels.exact_bias_fits` | `quant_matmul_prepared` |
| qc.quantize | f32 reciprocal `dtype(1 / dtype(s))`; f32 offset | `quantize_prepared` (`quantize_codes` when only prepared matmuls read its codes) |
| qc.dynamic_quant | none | `dynamic_quant` (`dynamic_quant_codes` when only prepared matmuls read its codes) |
| attention ops | none | their kernels |
| aten._assert_tensor_metadata, export's `_guards_fn` | none | dropped (checks, no value) |
| aten overloads with a binding of the same schema (direct_calls.py) | none | `torch.mul`, `x.view`, ... (same kernel) |

Decode steps (`prepare_layer(step, merge=True)`, executable.py) also merge sibling Linears: prepared
W8A8 / W8A8_DYNAMIC / W4A8_DYNAMIC matmuls that read the same activation codes (q/k/v, gate/up) become one call
on their tensors concatenated along n (`merge_siblings`; `kernels.quant_matmul_*_merged`, bit-identical), as
vLLM holds them on the NPU too (vllm/model_executor/layers/linear.py: QKVParallelLinear,
MergedColumnParallelLinear). A decoded token's Linears are mostly per-call overhead (7 calls a layer become 4).

Codes as float32: where every reader of a quantize's codes is a prepared matmul, the codes stay the float32
integers they are computed as, and the matmuls' exact float32 products (`kernels.exact_product_f32`) read them
directly (the int8 cast and the widening back cost more than the GEMM itself in decode; same values).
Where the int8 GEMM is native (`qnumerics.int8_gemm_native`: a CPU with int8 dot products, where `_int_mm` is
4-10x faster than the exact float32 GEMM), a full-sequence layer's products are all `_int_mm`'s: its weights stay
int8 [n, k] (`kernels.rowwise_layout_pays`) and its codes int8; decode steps keep the row-wise layout and the
float codes, which their one-row products read. Where oneDNN's int8 linear is exact too (`onednn_linear.applies`),
a full-sequence layer's W8A8_DYNAMIC weights with positive scales (`onednn_linear.scales_apply`), and W8A8 weights
whose quant_bias float32 adds exactly (`onednn_linear.bias_fits`), are held packed for it instead ("onednn_packed":
the product and the epilogue's first rounding in one call, `onednn_linear.product`); so are W4A8_DYNAMIC per-group
weights with positive two-stage scales, one packed weight per group ("onednn_packed:group=G:size=S",
`kernels.quant_matmul_pergroup_packed`).
The prepared kernels are the ones the ops' CPU kernels call after computing the same tensors per call
(kernels.py), so a prepared graph computes the same bits (tests/backends/ascend/test_layouts.py also checks
every prepared tensor against the artifact's own tensors in quant_model_weights*.safetensors).
The tensors the prepared ones replace are dropped from the module (W8A16/W4A16 then hold the dequantized
weight in the model dtype: decode speed of the float model, at its weight memory).
`gm.meta[PREPARED]` maps each prepared attribute to `{"kind", "from": [source attribute names]}`; the
source names are the layer's executable tensor names (the artifact's without `model.layers.N.`).
Graphs whose tensors are not all on the CPU (an NPU) are returned unchanged: torch_npu runs the ops there.
Limits: a node whose operands are not module tensors, or whose input's dtype / k is unknown, keeps its op.
"""
from __future__ import annotations

import torch

from ...ir import qnumerics as qn
from ...ir.patterns import prune_unused_tensors
from . import attention, direct_calls, kernels, onednn_linear

#: gm.meta key: {attribute: {"kind": str, "from": [source attribute, ...]}}
PREPARED = "qc_prepared_layouts"

_OPS = torch.ops.qc
#: ops whose CPU kernel is a Python function of the same arguments: called directly
_DIRECT = {
    _OPS.dynamic_quant.default: kernels.dynamic_quant,
    _OPS.kv_quant.default: attention.kv_quant_ref,
    _OPS.kv_dequant.default: attention.kv_dequant_ref,
    _OPS.fa_quant.default: attention.fa_quant_ref,
    _OPS.fa_dequant.default: attention.fa_dequant_ref,
    _OPS.cached_attention.default: attention.cached_attention_ref,
}
_DROP = (torch.ops.aten._assert_tensor_metadata.default,)  # export's dtype checks: no value, only a call


def _tensor(gm, node):
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        t = _fetch(gm, node.target)
        return t if isinstance(t, torch.Tensor) else None
    return None


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _input_type(node):
    from ...ir import meta
    return meta.tensor_type(node) if isinstance(node, torch.fx.Node) else None


def _on_cpu(gm) -> bool:
    return all(t.device.type == "cpu" for t in list(gm.parameters()) + list(gm.buffers()))


class _Preparer:
    def __init__(self, gm, decode: bool = False, pack: bool = True):
        self.gm, self.graph = gm, gm.graph
        self.decode = decode  # a decode step (one token row per call): kernels.rowwise_layout_pays
        self.pack = pack  # enough token rows ahead to repay oneDNN's packing (onednn_linear.PACK_FROM_ROWS)
        self.record = gm.meta.setdefault(PREPARED, {})
        self._cache: dict = {}  # (kind, source targets) -> get_attr target: q/k/v share a quantize
        #: int8 [n, k] weights (attribute names) that `lay_out_rowwise` turns into `kernels.rowwise_codes`, and
        #: whether their kernel reads one part only (the per-group sums). The layout is made after
        #: `merge_siblings`, so a merged group's weight is laid out once, not per sibling and again merged.
        self.rowwise_pending: dict[str, bool] = {}

    def attr(self, node, kind: str, sources: list, compute) -> torch.fx.Node:
        key = (kind, tuple(sources))
        name = self._cache.get(key)
        if name is None:
            name = f"prepared_{len(self.record)}"
            t = compute()
            self.gm.register_buffer(name, t if onednn_linear.is_packed(t) else t.contiguous())
            self.record[name] = {"kind": kind, "from": list(sources)}
            self._cache[key] = name
        with self.graph.inserting_before(node):
            return self.graph.get_attr(name)

    def _packs(self) -> bool:
        """A full-sequence layer's int8 weights are packed for oneDNN's int8 linear (`onednn_linear.applies`)."""
        return not self.decode and self.pack and onednn_linear.applies()

    def replace(self, node, fn, args) -> None:
        with self.graph.inserting_before(node):
            new = self.graph.call_function(fn, tuple(args))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)

    def weight_only(self, node) -> None:
        x, w, s, o, b, group, packing = node.args
        tw, ts, to = (_tensor(self.gm, a) for a in (w, s, o))
        xt = _input_type(x)
        if tw is None or ts is None or to is None or xt is None or (b is not None and _tensor(self.gm, b) is None):
            return
        k = xt.shape[-1]
        if not isinstance(k, int):
            return
        dt = xt.dtype
        wq = self.attr(node, f"dequantized_weight:{dt}", [w.target, s.target, o.target],
                       lambda: kernels.dequantize_weight(tw, ts, to, group, packing, k, dt))
        bias = None if b is None else self.attr(node, f"bias:{dt}", [b.target],
                                                lambda: _tensor(self.gm, b).to(dt))
        self.replace(node, kernels.weight_quant_matmul_prepared, (x, wq, bias))

    def pertoken(self, node) -> None:
        xq, w, ws, s, b, packing, out_dtype = node.args
        tw, tws = _tensor(self.gm, w), _tensor(self.gm, ws)
        if tw is None or tws is None or (b is not None and _tensor(self.gm, b) is None):
            return
        k = tw.shape[1]  # both packings keep k along dim 1
        wq = self.attr(node, "int8_weight", [w.target], lambda: kernels._pertoken_weight(tw, tws, packing, k))
        if kernels.rowwise_layout_pays(k, self.decode):
            self.rowwise_pending[wq.target] = False
        wsf = self.attr(node, f"weight_scale_f32:{out_dtype}", [ws.target],
                        lambda: kernels.pertoken_operands(tws, None, out_dtype)[0])
        if not kernels.rowwise_layout_pays(k, self.decode) and self._packs() and onednn_linear.scales_apply(
                _tensor(self.gm, wsf)):
            tq = _tensor(self.gm, wq)
            wq = self.attr(node, "onednn_packed", [w.target], lambda: onednn_linear.pack(tq))
        bias = None if b is None else self.attr(
            node, f"bias_f32:{out_dtype}", [b.target],
            lambda: kernels.pertoken_operands(tws, _tensor(self.gm, b), out_dtype)[1])
        self.replace(node, kernels.quant_matmul_pertoken_prepared, (xq, wq, wsf, s, bias, out_dtype))

    def pergroup(self, node) -> None:
        xq, w, ws, ws2, s, group_size, out_dtype = node.args
        tw, tws, tws2 = (_tensor(self.gm, a) for a in (w, ws, ws2))
        if tw is None or tws is None or tws2 is None:
            return
        k = tw.shape[1]
        scale = kernels.two_stage_scale(tws, tws2, out_dtype)

        n = scale.shape[0]
        kernels._check_groups(k, scale.shape[1], group_size)
        wg = self.attr(node, "int8_weight", [w.target], lambda: kernels.unpack_weight(tw, kernels.PACK_INT4_N, n, k))
        st = self.attr(node, f"pergroup_scale:{out_dtype}:g={group_size}", [ws.target, ws2.target],
                       lambda: scale.t().contiguous().unsqueeze(1))
        if self._packs() and onednn_linear.scales_apply(scale):  # each group's weight packed for oneDNN
            w8 = _tensor(self.gm, wg)
            packed = [self.attr(node, f"onednn_packed:group={g}:size={group_size}", [w.target],
                                lambda g=g: onednn_linear.pack(w8[:, g * group_size:(g + 1) * group_size]))
                      for g in range(scale.shape[1])]
            self.replace(node, kernels.quant_matmul_pergroup_packed, (xq, packed, st, s, out_dtype))
            return
        self.rowwise_pending[wg.target] = True  # always row-wise (one part), whatever k
        fold = kernels.pergroup_fold_applies(scale.t())  # the group sums in one call (same order, same bits)
        self.replace(node, kernels.quant_matmul_pergroup_prepared, (xq, wg, st, s, out_dtype, fold))

    def static(self, node) -> None:
        xq, w, deq, qb, out_dtype = node.args
        tw, tdeq, tqb = (_tensor(self.gm, a) for a in (w, deq, qb))
        if tw is None or tdeq is None or tqb is None:
            return
        k = tw.shape[1]
        d = self.attr(node, "deq_scale_f32", [deq.target], lambda: kernels.decode_deq_scale(tdeq))
        bias = self.attr(node, f"quant_bias_acc:k={k}", [qb.target], lambda: kernels.quant_bias_accumulator(k, tqb))
        if kernels.rowwise_layout_pays(k, self.decode):
            w = self.attr(node, "int8_weight", [w.target], lambda: tw)  # the artifact's tensor, no copy
            self.rowwise_pending[w.target] = False
        # wider: the artifact's int8 weight, as the int32 path reads it
        args = [xq, w, d, bias, out_dtype]
        if kernels.exact_bias_fits(k, tqb):  # the bias joins the exact float32 product (kernels.exact_product_f32)
            args.append(self.attr(node, f"quant_bias_f32:k={k}", [qb.target], lambda: tqb.float()))
            if (not kernels.rowwise_layout_pays(k, self.decode) and self._packs()
                    and onednn_linear.bias_fits(k, tqb)):  # and oneDNN's product (onednn_linear)
                args[1] = self.attr(node, "onednn_packed", [w.target], lambda: onednn_linear.pack(tw))
        self.replace(node, kernels.quant_matmul_prepared, tuple(args))

    def quantize(self, node) -> None:
        x, s, o = node.args
        ts, to, xt = _tensor(self.gm, s), _tensor(self.gm, o), _input_type(x)
        if ts is None or to is None or xt is None:
            return
        recip = self.attr(node, f"reciprocal_f32:{xt.dtype}", [s.target],
                          lambda: kernels.quantize_reciprocal(ts, xt.dtype))
        off = self.attr(node, "offset_f32", [o.target], lambda: to.float())
        self.replace(node, kernels.quantize_prepared, (x, recip, off))

    def lay_out_rowwise(self) -> None:
        """Every matmul whose weight is pending (`rowwise_pending`) reads it as `kernels.rowwise_codes` instead:
        `kernels.rowwise_parts` parts, or one for the per-group kernels."""
        for node in list(self.graph.nodes):
            if not (node.op == "call_function" and node.target in _WEIGHT_ARG):
                continue
            w = node.args[_WEIGHT_ARG[node.target]]
            one_part = self.rowwise_pending.get(w.target) if isinstance(w, torch.fx.Node) else None
            if one_part is None:
                continue
            tw = _tensor(self.gm, w)
            parts = 1 if one_part else kernels.rowwise_parts(*tw.shape)
            kind = "rowwise_codes" if one_part else f"rowwise_codes:parts={parts}"
            laid = self.attr(node, kind, self.record[w.target]["from"], lambda: kernels.rowwise_codes(tw, parts))
            node.update_arg(_WEIGHT_ARG[node.target], laid)


_PREPARE = {
    _OPS.weight_quant_matmul.default: _Preparer.weight_only,
    _OPS.quant_matmul_pertoken.default: _Preparer.pertoken,
    _OPS.quant_matmul_pergroup.default: _Preparer.pergroup,
    _OPS.quant_matmul.default: _Preparer.static,
    _OPS.quantize.default: _Preparer.quantize,
}


#: prepared matmuls that take activation codes as int8 or as the float32 integers of the `*_codes` kernels
_TAKE_FLOAT_CODES = (kernels.quant_matmul_pertoken_prepared, kernels.quant_matmul_prepared,
                     kernels.quant_matmul_pergroup_prepared)


def _codes_users_ok(codes: torch.fx.Node) -> bool:
    return all(u.op == "call_function" and u.target in _TAKE_FLOAT_CODES and u.args[0] is codes
               and codes not in u.args[1:] and codes not in u.kwargs.values() for u in codes.users)


#: prepared matmuls that take a per-token scale (argument 3) as [...] or as [..., 1]
_TAKE_SCALE_COLUMN = (kernels.quant_matmul_pertoken_prepared, kernels.quant_matmul_pergroup_prepared)


def _scale_users_ok(scale: torch.fx.Node) -> bool:
    return all(u.op == "call_function" and u.target in _TAKE_SCALE_COLUMN and len(u.args) > 3 and u.args[3] is scale
               and scale not in u.args[:3] + u.args[4:] and scale not in u.kwargs.values() for u in scale.users)


def _codes_as_float(gm) -> None:
    """A dynamic_quant / quantize whose codes feed only prepared matmuls returns them as float32 integers
    (`kernels.dynamic_quant_codes` / `quantize_codes`: the same values), which the matmuls' exact float32
    products read directly: no int8 cast and no widening back per matmul. A dynamic_quant whose scale, too, only
    prepared matmuls read returns it as the [..., 1] column they broadcast (`column=True`)."""
    import operator
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is kernels.dynamic_quant:
            gets = list(node.users)
            if gets and all(g.op == "call_function" and g.target is operator.getitem for g in gets) and all(
                    _codes_users_ok(g) for g in gets if g.args[1] == 0):
                node.target = kernels.dynamic_quant_codes
                if all(_scale_users_ok(g) for g in gets if g.args[1] == 1):
                    node.args = (node.args[0], True)
        elif node.target is kernels.quantize_prepared and node.users and _codes_users_ok(node):
            node.target = kernels.quantize_codes


#: prepared matmul -> (its merged form, indices of the per-channel [n] tensors, indices of the arguments the
#: siblings must share: codes, per-token scale, output dtype (and the per-group fold)); the weight is argument 1
_MERGEABLE = {
    kernels.quant_matmul_pertoken_prepared: (kernels.quant_matmul_pertoken_merged, (2, 4), (0, 3, 5)),
    kernels.quant_matmul_prepared: (kernels.quant_matmul_merged, (2, 3, 5), (0, 4)),
    kernels.quant_matmul_pergroup_prepared: (kernels.quant_matmul_pergroup_merged, (2,), (0, 3, 4, 5)),
}
#: arguments of a prepared matmul, its optional ones (the static kernel's quant_bias_f32) as None
_PREPARED_ARITY = 6
#: matmul kernels (prepared and merged) -> index of their weight argument (`_Preparer.lay_out_rowwise`)
_WEIGHT_ARG = {fn: 1 for fn in list(_MERGEABLE) + [merged for merged, _, _ in _MERGEABLE.values()]}
#: matmuls whose kernel reads a row-wise weight in one part only (the per-group sums: one bag per group)
_ONE_PART = {kernels.quant_matmul_pergroup_prepared}


def _padded_args(node) -> tuple:
    return tuple(node.args) + (None,) * (_PREPARED_ARITY - len(node.args))


def _merge_key(gm, node):
    """Siblings that can share one call have equal keys; None for a node that cannot be merged."""
    if node.op != "call_function" or node.target not in _MERGEABLE or node.kwargs:
        return None
    _, chan, shared = _MERGEABLE[node.target]
    args = _padded_args(node)
    w = _tensor(gm, args[1])
    if w is None:
        return None
    k, n = kernels._weight_k_n(w)
    if not all(args[i] is None or (t := _tensor(gm, args[i])) is not None and t.dim() >= 1 and t.shape[-1] == n
               for i in chan):  # per-channel tensors: n along their last dim, where they are concatenated
        return None
    # the weight int8 [n, k] or row-wise (any parts): `_merge_group` concatenates them as int8
    return node.target, tuple(args[i] for i in shared), tuple(args[i] is None for i in chan), k


def _merge_group(prep: _Preparer, nodes: list) -> None:
    import operator
    gm, graph = prep.gm, prep.graph
    fn, chan, _ = _MERGEABLE[nodes[0].target]
    argss = [_padded_args(n) for n in nodes]
    weights = [_tensor(gm, a[1]) for a in argss]
    widths = tuple(kernels._weight_k_n(w)[1] for w in weights)
    k = kernels._weight_k_n(weights[0])[0]

    def sources(node):  # the artifact tensors a prepared (or artifact) tensor stands for
        entry = prep.record.get(node.target)
        return list(entry["from"]) if entry else [node.target]

    def kind_of(node, default):
        entry = prep.record.get(node.target)
        return entry["kind"] if entry else default

    def register(kind: str, srcs: list, t: torch.Tensor) -> str:
        name = f"prepared_{len(prep.record)}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, t.contiguous())
        prep.record[name] = {"kind": kind, "from": srcs}
        return name

    # the int8 weights [n_i, k] concatenated (a row-wise one back to int8 first); row-wise again after the merge
    row_wise = any(t.dtype == torch.uint8 or a[1].target in prep.rowwise_pending for t, a in zip(weights, argss))
    w = torch.cat([kernels.rowwise_weight(p) if p.dtype == torch.uint8 else p for p in weights])
    names = {1: register("int8_weight", sum((sources(a[1]) for a in argss), []), w)}
    if row_wise:
        prep.rowwise_pending[names[1]] = nodes[0].target in _ONE_PART
    for i in chan:
        if argss[0][i] is None:
            continue
        t = torch.cat([_tensor(gm, a[i]) for a in argss], dim=-1)
        kind = kind_of(argss[0][i], "")
        if kind.startswith("quant_bias_acc"):  # int32 only where every channel's sum fits (kernels)
            t = kernels.quant_bias_accumulator(k, t.to(torch.int64))
        names[i] = register(kind, sum((sources(a[i]) for a in argss), []), t)
    new_args = list(argss[0])
    with graph.inserting_before(nodes[0]):
        for i, name in names.items():
            new_args[i] = graph.get_attr(name)
        merged = graph.call_function(fn, tuple(new_args) + (widths,))
    for j, node in enumerate(nodes):
        with graph.inserting_after(merged):
            out = graph.call_function(operator.getitem, (merged, j))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def merge_siblings(gm: torch.fx.GraphModule, prep: _Preparer | None = None) -> int:
    """Prepared int8-activation Linears that read the same activation codes (and per-token scale), e.g. q/k/v
    and gate/up, rewritten in place as one call on their weights concatenated along n
    (`kernels.quant_matmul_pertoken_merged` / `quant_matmul_merged` / `quant_matmul_pergroup_merged`:
    bit-identical, see there), as vLLM's QKVParallelLinear and MergedColumnParallelLinear hold them. A decode
    step is mostly per-call overhead, and 7 Linears a layer become 4. The merged tensors are recorded in
    `gm.meta[PREPARED]` with every source (in output order); a merged weight is laid out row-wise once, after the
    merge (`_Preparer.lay_out_rowwise`). Returns the number of calls merged away."""
    prep = prep or _Preparer(gm, decode=True)  # merging is for decode steps (prepare_layer)
    groups: dict = {}
    for node in gm.graph.nodes:
        key = _merge_key(gm, node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    saved = 0
    for nodes in groups.values():
        if len(nodes) > 1:
            _merge_group(prep, nodes)
            saved += len(nodes) - 1
    prep.lay_out_rowwise()
    return saved


def prepare_layer(gm: torch.fx.GraphModule, merge: bool = False, rows: int | None = None) -> torch.fx.GraphModule:
    """`gm` rewritten in place to read prepared tensors and call the CPU kernels directly (module
    docstring); returned unchanged when a tensor is not on the CPU. Idempotent. `merge`: also
    `merge_siblings` (decode steps, ir/decode.py: one token row per call, where a call's overhead is most of
    its cost; the full-sequence layers keep one call per Linear, so no product widens a merged weight). `rows`: the
    token rows the layer will run in all (eval: windows x seq_len), None when unknown; oneDNN's packed weights are
    made only from `onednn_linear.PACK_FROM_ROWS` rows (packing costs what a few thousand rows' products save)."""
    if not _on_cpu(gm):
        return gm
    prep = _Preparer(gm, decode=merge, pack=rows is None or rows >= onednn_linear.PACK_FROM_ROWS)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _PREPARE:
            _PREPARE[node.target](prep, node)
        elif node.target in _DIRECT:
            node.target = _DIRECT[node.target]
        elif node.target in _DROP and not node.users:
            gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):  # torch.export's input-shape guard of captured float layers: code, no value
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if merge or not qn.int8_gemm_native():  # else every product is `_int_mm`'s, which reads int8 codes
        _codes_as_float(gm)
    if merge:
        merge_siblings(gm, prep)  # lays the weights out after merging them: one layout per merged weight
    else:
        prep.lay_out_rowwise()
    direct_calls.rewrite(gm)
    prune_unused_tensors(gm)
    kept = {name for name, _ in gm.named_buffers()}
    for name in [n for n in prep.record if n not in kept]:  # prepared tensors merged into others
        del prep.record[name]
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
