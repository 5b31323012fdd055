"""Built-in fallback policies: fixed sets of Linears kept float for a model family (`--policy`, recipe `policy:`).

  qwen   every `mlp.down_proj` stays float, as msModelSlim's own Qwen2.5 W8A8 recipes do (the input of
         down_proj, silu(gate) * up, carries the largest activation outliers; static per-tensor int8 clips them)
  none   no policy Linears (only --exclude / the fallback pass decide)
  auto   the default: `qwen` for Qwen2/Qwen3 models when a scheme quantizes activations statically
         (W8A8 / W8A8_MIX), no pass migrates the outliers first (`Pass.migrates_outliers`: smooth) and no
         scheme pass narrows its `match` (explicit per-Linear choices win); `none` otherwise (dynamic per-token and weight-only
         schemes, and smoothing, handle down_proj; bench/results/fallback.md has the measurements).
A policy adds exclusion regexes (same effect as --exclude) before any validation, so fused-group and scheme
checks see them; the report names the policy applied.
"""
from .errors import QCError

POLICIES = {"none": (), "qwen": (r"\.mlp\.down_proj$",)}
POLICY_NAMES = ("auto",) + tuple(POLICIES)
QWEN_MODEL_TYPES = ("qwen2", "qwen3")
STATIC_TYPES = ("W8A8", "W8A8_MIX")


def check_policy(name: str) -> None:
    if name not in POLICY_NAMES:
        raise QCError(f"--policy {name!r} is not a policy; expected one of {', '.join(POLICY_NAMES)}")


def resolve_policy(name: str, model_type: str, passes) -> str:
    """The concrete policy ('qwen' or 'none') that `name` means for this model and pipeline (Pass objects)."""
    check_policy(name)
    if name != "auto":
        return name
    static = any(p.quant_type in STATIC_TYPES for p in passes)
    # a scheme pass with its own `match` is an explicit per-Linear choice: auto does not override it (other
    # passes' match options, e.g. simulate_tp's, choose something else)
    matched = any(p.quant_type and getattr(getattr(p, "options", None), "match", ".*") != ".*" for p in passes)
    migrated = any(getattr(p, "migrates_outliers", False) for p in passes)  # Pass capability (smooth)
    if model_type in QWEN_MODEL_TYPES and static and not matched and not migrated:
        return "qwen"
    return "none"


def policy_excludes(name: str) -> tuple[str, ...]:
    return POLICIES[name]
