"""The artifact's one weight group size, decided from config.json before any work.

Per-group weight schemes (w4a16; w8a16 with `group` given) split each weight row into groups of
`group_size` input channels with one scale each. The artifact's description holds ONE top-level
`group_size` for the whole model, so a group must divide the `k` (input size) of every Linear quantized
per-group. The driver knows every Linear's shape from config.json (hidden_size, intermediate_size,
num_attention_heads, num_key_value_heads, head_dim), so the group is resolved here before anything runs:

- an explicit `group=g` (g > 0) that does not divide some claimed Linear's k is an error naming the Linear,
  its k and the group sizes that would divide every such Linear;
- two passes with different explicit groups are an error (one group_size per artifact);
- `group=None` (w4a16's default) becomes the explicit group of another per-group pass if there is one, else
  128 when it divides every Linear the default-group passes claim, else 64 (SmolLM2-135M's hidden size 576 is
  not a multiple of 128), else an error naming the Linear;
- `group=0` is per-channel and adds no constraint.

`resolve_group_sizes` returns the pipeline with every `group=None` replaced by the decided value (passes
are rebuilt, options stay frozen) and the artifact's `group_size` (0 when no Linear is quantized per-group).
Which pass quantizes which Linear is simulated with the same rule the scheme passes apply at run time
(`first_claim`: --exclude wins, then the first scheme pass whose `match` selects the Linear).
Limits: the Linears of Llama / Qwen2 / Qwen3 decoder layers and of Qwen3-MoE / Qwen2-MoE ones (what capture supports).
"""
import dataclasses
import re

from ..errors import QCError

#: group sizes a per-group scheme accepts (0 = per-channel)
GROUP_SIZES = (0, 32, 64, 128, 256)
#: tried in order when a per-group pass leaves `group` unset
DEFAULT_GROUPS = (128, 64)


#: the Linears engines fuse in a dense layer (one scheme each group); MoE layers: ir/moe.moe_fused_groups
DENSE_FUSED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def layer_linear_shapes(config: dict, index: int = 0) -> dict[str, tuple[int, int]]:
    """{Linear path inside decoder layer `index`: (n, k)} from a Llama / Qwen2 / Qwen3 config.json dict, or a
    Qwen3-MoE / Qwen2-MoE one (a MoE layer's expert Linears, ir/moe.py; routers are no quantization site)."""
    from ..ir.moe import is_moe_layer, moe_mlp_shapes
    h, heads, inter = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, q)}
    if is_moe_layer(config, index):
        return {**attention, **moe_mlp_shapes(config)}
    return {**attention, "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}


def layer_fused_groups(config: dict, index: int = 0) -> tuple[tuple[str, ...], ...]:
    """The Linear groups of decoder layer `index` that engines fuse (q/k/v, gate/up; each expert's gate/up)."""
    from ..ir.moe import is_moe_layer, moe_fused_groups
    if is_moe_layer(config, index):
        return (DENSE_FUSED_GROUPS[0],) + moe_fused_groups(config)
    return DENSE_FUSED_GROUPS


def model_linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """{full HF Linear name (`model.layers.3.mlp.down_proj`): (n, k)} for every decoder layer."""
    return {f"model.layers.{i}.{name}": shape for i in range(int(config["num_hidden_layers"]))
            for name, shape in layer_linear_shapes(config, i).items()}


def first_claim(passes, full_name: str, exclude=()):
    """The scheme pass that will quantize `full_name` (None: it stays float), as SchemePass.run decides
    (scheme.unclaimed_sites): an --exclude match keeps it float, else the first pass with a `claims` method that
    selects it wins. For the checks before any work; passes at run time read `meta.QUANT_SPEC` instead."""
    if any(re.search(p, full_name) for p in exclude):
        return None
    for p in passes:
        claims = getattr(p, "claims", None)
        if claims is not None and claims(full_name):
            return p
    return None


def dividing_groups(ks) -> list[int]:
    """The non-zero GROUP_SIZES dividing every k in `ks`."""
    return [g for g in GROUP_SIZES if g and all(k % g == 0 for k in ks)]


def default_group_size(ks: dict[str, int]) -> int:
    """128 if it divides every k of {Linear name: k}, else 64; else QCError naming the first Linear 64 fails."""
    for g in DEFAULT_GROUPS:
        if all(k % g == 0 for k in ks.values()):
            return g
    name, k = next((n, k) for n, k in ks.items() if k % DEFAULT_GROUPS[-1])
    others = dividing_groups(ks.values())
    hint = f"group={others[-1]} or " if others else ""
    raise QCError(f"no default weight group size fits {name}: its k={k} is a multiple of neither "
                  f"{' nor '.join(map(str, DEFAULT_GROUPS))}; set {hint}group=0 (per-channel), or exclude it")


def check_group_divides(pass_name: str, group: int, ks: dict[str, int], why: str = "") -> None:
    """QCError naming the first Linear whose k `group` does not divide."""
    bad = next(((n, k) for n, k in ks.items() if k % group), None)
    if bad is None:
        return
    name, k = bad
    fits = dividing_groups(ks.values())
    hint = f"group sizes that divide every Linear it quantizes: {', '.join(map(str, fits))}" if fits else \
        "no group size divides every Linear it quantizes: use group=0 (per-channel) or narrow `match`"
    raise QCError(f"pass {pass_name}: group={group}{why} does not divide k={k} of {name} (the artifact has one "
                  f"group_size and it must divide every per-group Linear's k); {hint}")


def resolve_group_sizes(passes, config: dict, exclude=()) -> tuple[list, int]:
    """(passes with every unset `group` decided, the artifact's group_size). Raises QCError; see the module doc."""
    shapes = model_linear_shapes(config)
    owner = {name: first_claim(passes, name, exclude) for name in shapes}
    grouped = [p for p in passes if hasattr(p.options, "group")]
    ks = {id(p): {n: shapes[n][1] for n, o in owner.items() if o is p} for p in grouped}
    explicit = [p for p in grouped if p.options.group and ks[id(p)]]
    if len({p.options.group for p in explicit}) > 1:
        given = ", ".join(f"{p.name} group={p.options.group}" for p in explicit)
        raise QCError(f"the artifact has one weight group_size, but the pipeline asks for several ({given})")
    for p in explicit:
        check_group_divides(p.name, p.options.group, ks[id(p)])
    unset = [p for p in grouped if p.options.group is None]
    claimed_unset = {n: k for p in unset for n, k in ks[id(p)].items()}
    if explicit:
        chosen = explicit[0].options.group
        for p in unset:
            check_group_divides(p.name, chosen, ks[id(p)], why=f" (taken from pass {explicit[0].name})")
    elif claimed_unset:
        chosen = default_group_size(claimed_unset)
    else:
        chosen = 0
    resolved = [type(p)(dataclasses.replace(p.options, group=chosen)) if p in unset else p for p in passes]
    return resolved, chosen if (explicit or claimed_unset) else 0
