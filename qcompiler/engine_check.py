"""`--engine vllm-ascend|mindie|any`: which engines must load the artifact, decided before any work.

The facts live in the backend's support matrix (`backends/ascend/engines.py`); this module only describes a
compile as `ArtifactFeatures` from what is known before any work (the resolved pipeline, config.json's Linear
shapes, --exclude, which Linears of the checkpoint carry a bias, the target):
- `pipeline_features(...)`: the quant type each decoder Linear will get (the scheme passes' own claim rule,
  `group_size.first_claim`), the artifact's group size, C8 / FAQuant passes, device, model type, config.json's
  hidden_act (the engines' MLPs are SwiGLU), and for a MoE model whether MindIE's config keys can type its Linears;
- `check_engine(engine, features)`: QCError (exit 2, before any work) when the chosen engine cannot load the
  artifact, or with `any` when no engine can; returns warnings (how the engines run it, unconfirmed devices);
- `engine_report(features)`: {engine: {"loads": bool, "why_not": [...], "notes": [...]}} for the report.
A fallback pass may later keep more Linears float; the check is made on the pipeline's claims (conservative).
"""
from .backends.ascend.engines import (ENGINE_CHOICES, ENGINE_NAMES, ENGINES, ArtifactFeatures, mindie_key_problems,
                                      notes, refusals)
from .errors import QCError
from .ir.moe import EXPERT_LINEAR
from .passes.group_size import first_claim, model_linear_shapes


def check_engine_choice(engine: str) -> None:
    if engine not in ENGINE_CHOICES:
        raise QCError(f"--engine {engine!r} is not one of {', '.join(ENGINE_CHOICES)}")


def pipeline_features(passes, config: dict, exclude, has_tensor, target_name: str,
                      model_type: str) -> ArtifactFeatures:
    """ArtifactFeatures of the artifact this pipeline (group sizes resolved) will write. `has_tensor(name)`:
    whether the checkpoint holds a tensor (Linear biases)."""
    types, grouped, biased, moe = set(), set(), set(), set()
    every = {}
    moe_group = 0
    for name in model_linear_shapes(config):
        owner = first_claim(passes, name, exclude)
        every[name] = "FLOAT" if owner is None else owner.quant_type
        if owner is None:
            continue
        if EXPERT_LINEAR.search(name):  # routed experts: the fused-MoE methods ("<type> MoE" features)
            moe.add(owner.quant_type)
            moe_group = getattr(owner.options, "group", 0) or moe_group
            continue
        types.add(owner.quant_type)
        if getattr(owner.options, "group", 0):
            grouped.add(owner.quant_type)
        if has_tensor(f"{name}.bias"):
            biased.add(owner.quant_type)
    pass_types = {getattr(p, "quant_type", None) for p in passes}
    return ArtifactFeatures(linear_types=frozenset(types), grouped_types=frozenset(grouped),
                            biased_types=frozenset(biased),
                            kv_cache="C8" in pass_types, fa_quant="FAQuant" in pass_types,
                            device="310p" if target_name == "ascend310p" else "910b", model_type=model_type,
                            moe_types=frozenset(moe), hidden_act=str(config.get("hidden_act", "silu")),
                            mindie_key_problems=mindie_key_problems(every),
                            moe_intermediate_size=int(config.get("moe_intermediate_size") or 0) if moe else 0,
                            moe_group_size=moe_group)


def check_engine(engine: str, features: ArtifactFeatures) -> list[str]:
    """Raise QCError when `engine` (or, with "any", every engine) cannot load the artifact; else warnings."""
    check_engine_choice(engine)
    chosen = ENGINES if engine == "any" else (engine,)
    why = {e: refusals(e, features) for e in chosen}
    loading = [e for e in chosen if not why[e]]
    if not loading:
        if engine == "any":
            detail = "; ".join(f"{ENGINE_NAMES[e]}: {' / '.join(why[e])}" for e in chosen)
            raise QCError(f"no engine can load this artifact: {detail}")
        raise QCError(f"{ENGINE_NAMES[engine]} cannot load this artifact: {' / '.join(why[engine])} "
                      f"(--engine any accepts an artifact any one engine loads)")
    return [f"{ENGINE_NAMES[e]}: {n}" for e in loading for n in notes(e, features)]


def engine_report(features: ArtifactFeatures) -> dict:
    """Per engine: whether it loads the artifact (newest pinned vLLM-Ascend), why not, and notes."""
    return {e: {"loads": not refusals(e, features), "why_not": refusals(e, features), "notes": notes(e, features)}
            for e in ENGINES}
