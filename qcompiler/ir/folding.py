"""Folding a per-channel scale across producer -> consumers: the one table of mappings and the one fold.

An outlier-migration pass (smooth, awq, any new one) divides a group's shared input X by s per input channel
and multiplies the consumer Linears' weight columns by s, so the float layer computes the same function (up to
rounding the folded tensors to their dtype); the op that produces X absorbs 1/s. The mappings of a dense decoder
layer, found by dataflow on the captured graph (`MAPPINGS`, keyed by kind; msModelSlim's subgraph names):

  kind    subgraph     producer of X                                consumers        absorbs 1/s
  norm    norm-linear  mul(norm.weight, rmsnorm(h)) [+ norm.bias]   q/k/v; gate/up   norm weight (and bias)
  attn_v  ov           v_proj -> layout -> sdpa(value) -> layout    o_proj           v_proj rows (and bias)
  mlp_up  up-down      mul(silu(gate_proj), up_proj)                down_proj        up_proj rows (and bias)

attn_v under grouped-query attention (GQA): o_proj's columns are head-major (query head h, dim d) and the query
heads of one kv group read the same v_proj rows, so s must be equal over the heads sharing a kv head: a pass
reduces its per-column scales with `share_heads` (max over those heads) and `fold` divides v_proj's rows by one
head's copy (`kv_rows`). A pass whose search cannot share scales over heads finds groups with `gqa=False` (awq
scales each o_proj column on its own): an attn_v group under GQA is then skipped with its reason.

- `find_fold_groups(gm, gqa=True)` -> ([FoldGroup], {first Linear of a skipped group: why}), in the order of
  `patterns.shared_input_groups` (graph order of the first consumer); `match_group` does one group.
- `fold(gm, group, s)`: s float32 [k] (k = the consumers' in-features, o_proj's columns for attn_v); consumer
  columns * s, producer tensors / s (rows: / kv_rows(s)), each computed in float32 and stored in its own dtype
  (`patterns.replace_tensor`: shape and dtype kept, never written in place).
Limits: the decoder layers capture supports (Llama / Qwen2 / Qwen3 dense); a group whose input has readers other
than its Linears, or whose producer is none of the above, is skipped and named.
"""
from dataclasses import dataclass

import torch

from . import qnumerics as qn
from .patterns import LinearSite, get_tensor, linear_sites, replace_tensor, shared_input_groups

aten = torch.ops.aten

#: kind -> msModelSlim subgraph type name (processor/anti_outlier/common/subgraph_type.py), what absorbs 1/s
MAPPINGS = {
    "norm": ("norm-linear", "the norm weight (and the bias a shift gave it)"),
    "attn_v": ("ov", "v_proj rows (and bias), shared over the query heads of a kv head"),
    "mlp_up": ("up-down", "up_proj rows (and bias)"),
}

#: ops that only move data (no arithmetic across channels of one head), walked through by dataflow
LAYOUT_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
              aten.permute.default, aten.contiguous.default, aten.clone.default, aten.expand.default,
              aten.unsqueeze.default, aten.alias.default}


@dataclass
class FoldGroup:
    kind: str                                  # a MAPPINGS key
    producer: str                              # norm module name ("input_layernorm") or Linear name
    input: torch.fx.Node                       # the shared activation X
    sites: list[LinearSite]                    # the consumer Linears reading X
    norm_weight: torch.fx.Node | None = None   # norm: get_attr of the norm weight
    norm_bias: torch.fx.Node | None = None     # norm: get_attr of the bias added after it (a shifting smooth's)
    producer_site: LinearSite | None = None    # attn_v / mlp_up: v_proj / up_proj
    heads: tuple[int, int, int] | None = None  # attn_v: (query heads, kv heads, head_dim)

    def producer_targets(self) -> list[str]:
        """The get_attr targets `fold` divides by s (norm weight [+ bias]; the producer Linear's weight [+ bias])."""
        if self.kind == "norm":
            return [n.target for n in (self.norm_weight, self.norm_bias) if n is not None]
        p = self.producer_site
        return [p.weight.target] + ([p.bias.target] if p.bias is not None else [])


# ---- finding groups on the graph ----------------------------------------------------------------------------
def through_layout(node: torch.fx.Node) -> torch.fx.Node:
    """Walk back through single-user layout ops (view/transpose/..., full slices) to the op that made the data."""
    while node.op == "call_function" and node.target in LAYOUT_OPS and len(node.users) == 1 or \
            (node.op == "call_function" and node.target == aten.slice.Tensor and _full_slice(node)
             and len(node.users) == 1):
        node = node.args[0]
    return node


def _full_slice(node) -> bool:
    args = list(node.args) + [None] * 5
    start, end, step = args[2] or 0, args[3], args[4] or 1
    return start == 0 and step == 1 and (end is None or end >= (1 << 62))


def _shape(node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _concrete(d) -> int | None:
    return d if isinstance(d, int) else None


def _channel_param(gm, node, k: int, suffix: str = "") -> bool:
    """`node` reads a 1-D [k] tensor (named ...`suffix`) that nothing else reads."""
    if not (isinstance(node, torch.fx.Node) and node.op == "get_attr" and len(node.users) == 1):
        return False
    t = get_tensor(gm, node.target)
    return t.dim() == 1 and t.numel() == k and str(node.target).endswith(suffix)


def _norm_weight(gm, node, k: int) -> torch.fx.Node | None:
    """`mul(weight [k], normed)` -> the weight's get_attr node, else None."""
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == aten.mul.Tensor:
        return next((a for a in node.args if _channel_param(gm, a, k, ".weight")), None)
    return None


def match_group(gm, sites: list[LinearSite], linear_by_node, gqa: bool = True) -> tuple[FoldGroup | None, str]:
    """The FoldGroup of Linears `sites` that read one input (a `shared_input_groups` entry), or (None, why not)."""
    x = sites[0].input
    k = get_tensor(gm, sites[0].weight.target).shape[1]
    if set(x.users) != {s.node for s in sites}:
        return None, "its input has readers other than the Linears"
    weight = _norm_weight(gm, x, k)
    if weight is not None:                     # norm
        return FoldGroup("norm", str(weight.target)[: -len(".weight")], x, sites, norm_weight=weight), ""
    if x.op == "call_function" and x.target == aten.add.Tensor and len(x.args) == 2:   # norm + bias (shift)
        for m, b in (x.args, x.args[::-1]):
            weight = _norm_weight(gm, m, k)
            if weight is not None and len(m.users) == 1 and _channel_param(gm, b, k):
                return FoldGroup("norm", str(weight.target)[: -len(".weight")], x, sites, norm_weight=weight,
                                 norm_bias=b), ""
    src = through_layout(x)
    if src.op == "call_function" and src.target == aten.mul.Tensor:   # mlp_up: mul(silu(gate), up_proj)
        for a in reversed(src.args):
            site = linear_by_node.get(a) if isinstance(a, torch.fx.Node) else None
            if site is not None and len(a.users) == 1 and list(src.args).count(a) == 1 \
                    and get_tensor(gm, site.weight.target).shape[0] == k:
                return FoldGroup("mlp_up", site.name, x, sites, producer_site=site), ""
        return None, "its input is a product with no Linear factor"
    if src.op == "call_function" and src.target == aten.scaled_dot_product_attention.default \
            and len(src.users) == 1:           # attn_v: v_proj -> layout -> sdpa(value) -> layout -> o_proj
        return _attention_group(gm, x, src, sites, linear_by_node, gqa)
    return None, f"producer {src.name} ({src.target}) is not a norm, attention or gated product"


def _attention_group(gm, x, sdpa, sites, linear_by_node, gqa: bool) -> tuple[FoldGroup | None, str]:
    value = sdpa.args[2]
    v = through_layout(value)
    site = linear_by_node.get(v)
    if site is None or len(v.users) != 1:
        return None, "the attention's value is not a Linear's output"
    q_shape, v_shape, o_shape = _shape(sdpa.args[0]), _shape(value), _shape(sdpa)
    vw = get_tensor(gm, site.weight.target)
    ow = get_tensor(gm, sites[0].weight.target)
    if not (q_shape and v_shape and o_shape) or len(q_shape) != 4:
        return None, "attention shapes unknown"
    nh, hd, vh = _concrete(q_shape[1]), _concrete(v_shape[-1]), _concrete(v_shape[1])
    if None in (nh, hd, vh) or vw.shape[0] % hd or ow.shape[1] != nh * hd:
        return None, "attention head layout not recognised"
    kvh = vw.shape[0] // hd
    if nh % kvh or vh not in (kvh, nh):
        return None, "attention head layout not recognised"
    if kvh != nh and not gqa:
        return None, (f"{site.name} out {vw.shape[0]} != in {ow.shape[1]} (grouped-query attention: "
                      f"heads share v channels)")
    return FoldGroup("attn_v", site.name, x, sites, producer_site=site, heads=(nh, kvh, hd)), ""


def find_fold_groups(gm: torch.fx.GraphModule, gqa: bool = True) -> tuple[list[FoldGroup], dict[str, str]]:
    """Foldable Linear groups (shared_input_groups order) and {first Linear of a skipped group: why}."""
    sites = linear_sites(gm)
    by_node = {s.node: s for s in sites}
    groups, skipped = [], {}
    for members in shared_input_groups(sites):
        g, why = match_group(gm, members, by_node, gqa)
        if g is None:
            skipped[members[0].name] = why
        else:
            groups.append(g)
    return groups, skipped


# ---- head sharing and the fold ------------------------------------------------------------------------------
def share_heads(v: torch.Tensor, heads: tuple[int, int, int]) -> torch.Tensor:
    """Per o_proj column values [nh*hd] -> the max over the query heads sharing a kv head, repeated back."""
    nh, kvh, hd = heads
    return v.view(kvh, nh // kvh, hd).amax(1, keepdim=True).expand(kvh, nh // kvh, hd).reshape(-1)


def kv_rows(s_cols: torch.Tensor, heads: tuple[int, int, int]) -> torch.Tensor:
    """Head-shared o_proj column scales [nh*hd] -> the v_proj row scales [kvh*hd]."""
    nh, kvh, hd = heads
    return s_cols.view(kvh, nh // kvh, hd)[:, 0].reshape(-1)


def _rescaled(w: torch.Tensor, columns: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """w [n, k] in its own dtype with float32 math: w.float() * columns ([k]) or w.float() / rows[:, None] ([n]),
    computed in row chunks (qnumerics.row_slices): one chunk's float32 temporaries at a time, not two whole-weight
    float32 copies (a 7B gate_proj: 271 MB each). Elementwise, so every value is the unchunked formula's."""
    out = torch.empty_like(w)
    for sl in qn.row_slices(w.shape[0], w.shape[1]):
        out[sl] = w[sl].float() * columns if rows is None else w[sl].float() / rows[sl, None]
    return out


def fold(gm: torch.fx.GraphModule, group: FoldGroup, s: torch.Tensor) -> None:
    """Divide the group's input by s (float32 [k]) in its producer; multiply the consumers' columns by s."""
    for site in group.sites:
        replace_tensor(gm, site.weight.target, _rescaled(get_tensor(gm, site.weight.target), columns=s))
    if group.kind == "norm":
        for target in group.producer_targets():
            replace_tensor(gm, target, get_tensor(gm, target).float() / s)
        return
    rows = kv_rows(s, group.heads) if group.kind == "attn_v" else s
    p = group.producer_site
    replace_tensor(gm, p.weight.target, _rescaled(get_tensor(gm, p.weight.target), rows=rows))
    if p.bias is not None:
        replace_tensor(gm, p.bias.target, get_tensor(gm, p.bias.target).float() / rows)
