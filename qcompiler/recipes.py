"""Best-practice recipes: the pipeline each msModelSlim one-click `--quant_type` compiles to.

msModelSlim's one-click mode "matches the best-practice configuration automatically" (its quick start; the
matching is msmodelslim/app/naive_quantization/application.py `NaiveQuantizationApplication.check_config`: a
lab_practice YAML whose label w_bit / a_bit / is_sparse / kv_cache equals the quant type's, verified for the
model type). Here every quant type maps to the pipeline of our passes that measures best on the real
SmolLM2-135M, per architecture family where the measurements differ (`llama`: LlamaForCausalLM; `qwen`:
Qwen2/Qwen3, measured on the Qwen2 build of the same weights). The candidates and their perplexities are in
BENCHMARKS.md ("Best-practice recipes"), produced by bench/run_recipes.py, which also flags a recipe that is
not the measured best; tests/test_recipes.py checks this table against bench/results/recipes.json.

This module is the single source of truth for that mapping: `qcompile quant --quant_type T` (quant_front.py)
builds its CompileOptions from `recipe_for(T, model_type)`, and the YAML / traditional-flag fronts use their
own mappings of msModelSlim's explicit settings (msmodelslim_yaml.py, msmodelslim_flags.py).

Quant type names are msModelSlim's (msmodelslim/core/const.py `QuantType`: w4a8, w4a8c8, w8a16, w8a8, w8a8s,
w8a8c8, w16a16s, ...) plus the ones `qcompile quant` already took (w8a8_dynamic, w4a16). Suffix rules from
`check_config`: `c8` = int8 KV cache (our kv8), trailing `s` = sparse (w8a8s: the 310P sparse type, fp16;
w16a16s: float sparse, W16A16S).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import QCError

DEFAULT_TARGET = "ascend910b"


@dataclass(frozen=True)
class Recipe:
    """One compile: --passes plus the target/dtype/exclude it needs (every other option at its default)."""
    passes: str
    target: str = DEFAULT_TARGET
    dtype: str | None = None
    exclude: tuple[str, ...] = ()

    def flags(self) -> tuple[str, ...]:
        """The `qcompile MODEL` flags besides --passes, in bench/run_recipes.py's order."""
        out: tuple[str, ...] = ()
        if self.target != DEFAULT_TARGET:
            out += ("--target", self.target)
        if self.dtype:
            out += ("--dtype", self.dtype)
        for pattern in self.exclude:
            out += ("--exclude", pattern)
        return out

    def describe(self) -> str:
        return " ".join(("--passes", self.passes) + self.flags())


@dataclass(frozen=True)
class QuantTypeRecipe:
    quant_type: str
    w_bit: int
    a_bit: int
    artifact: str          # what the artifact holds (description types)
    llama: Recipe
    qwen: Recipe
    why: str               # the measurement that chose it (BENCHMARKS.md has the table)

    def for_family(self, family: str) -> Recipe:
        return self.qwen if family == "qwen" else self.llama


def _same(passes: str, **kw) -> tuple[Recipe, Recipe]:
    r = Recipe(passes, **kw)
    return r, r


_F310P = {"target": "ascend310p", "dtype": "float16"}
#: Qwen2/Qwen3 q/k/v carry a bias, which no engine adds to a W4A8_DYNAMIC Linear (backends/ascend/engines.py
#: "W4A8_DYNAMIC Linear bias"): in the W4A8 recipes they are W8A8_DYNAMIC (first scheme to claim a Linear wins)
_QKV_W8A8D = r"w8a8d:match=self_attn\.[qkv]_proj"

QUANT_TYPE_RECIPES: dict[str, QuantTypeRecipe] = {q.quant_type: q for q in (
    QuantTypeRecipe("w8a8", 8, 8, "W8A8 (static per-tensor activations)", *_same("smooth,w8a8"),
                    "SmoothQuant with alpha searched per group brings every Linear static int8 to ~1.03x float; "
                    "plain w8a8 is 2.07x"),
    QuantTypeRecipe("w8a8_dynamic", 8, 8, "W8A8_DYNAMIC (per-token activations)", *_same("smooth,w8a8d"),
                    "smooth,w8a8d 1.006x (llama) / 1.008x (qwen2) vs w8a8d 1.032x / 1.035x"),
    QuantTypeRecipe("w8a8c8", 8, 8, "W8A8 + C8 KV cache", *_same("smooth,w8a8,kv8"),
                    "the w8a8 recipe plus the int8 KV cache"),
    QuantTypeRecipe("w8a16", 8, 16, "W8A16 (weight-only int8)", *_same("w8a16"),
                    "RTN is already at float perplexity (1.000x); calibration-free"),
    QuantTypeRecipe("w4a16", 4, 16, "W4A16 (weight-only int4, per-group)", *_same("awq,gptq,w4a16"),
                    "awq then gptq beats either alone and RTN (1.175x llama, 1.167x qwen2, group 64)"),
    QuantTypeRecipe("w4a8", 4, 8, "W4A8_DYNAMIC (int4 two-stage per-group weights, per-token activations)",
                    Recipe("awq,gptq,w4a8d:group=32"), Recipe(f"awq,gptq,{_QKV_W8A8D},w4a8d:group=32"),
                    "awq then gptq, the best int4 pipeline measured (per-channel, before issue 12: 1.41x llama "
                    "vs gptq alone 1.70x), in issue 12's per-group form at msModelSlim's LLaMA-3.1 group 32; "
                    "qwen2/qwen3's biased q/k/v take W8A8_DYNAMIC (no engine adds a W4A8_DYNAMIC Linear's bias, "
                    "backends/ascend/engines.py)"),
    QuantTypeRecipe("w4a8c8", 4, 8, "W4A8_DYNAMIC + C8 KV cache",
                    Recipe("awq,gptq,w4a8d:group=32,kv8"), Recipe(f"awq,gptq,{_QKV_W8A8D},w4a8d:group=32,kv8"),
                    "the w4a8 recipe plus the int8 KV cache"),
    QuantTypeRecipe("w8a8s", 8, 8, "W8A8S (sparse W8A8, Atlas 300I Duo: float16)",
                    *_same("smooth,sparse:ratio=0,gptq,w8a8s", **_F310P),
                    "msModelSlim's lowbit sparse quantization (4-bit-range codes) with smooth and gptq"),
    QuantTypeRecipe("w16a16s", 16, 16, "W16A16S (float sparse)", *_same("sparse:ratio=0.3,w16a16s"),
                    "SparseGPT at msModelSlim float_sparse's default ratio 0.3"),
)}

#: msModelSlim quant types with no equivalent here (msmodelslim/core/const.py QuantType), and why
UNAVAILABLE = {
    "w4a4": "4-bit activations (W4A4_DYNAMIC) are not implemented by any qcompile scheme",
    "w4a4c8": "4-bit activations (W4A4_DYNAMIC) are not implemented by any qcompile scheme",
    "w4a4f8": "4-bit activations (W4A4_DYNAMIC) are not implemented by any qcompile scheme",
    "w4a4f4": "4-bit activations and 4-bit FA3 are not implemented by any qcompile scheme",
    "w8a8f8": "use --config_path or `qcompile MODEL --passes smooth,w8a8,fa3` (FA3 is MindIE-only; no measured "
              "best practice here)",
}


#: mixture-of-experts models (ir/moe.py): smooth / awq and static-activation schemes on experts are refused there,
#: so the dense recipes do not apply. These are the pipelines MoE compiles support (experts int4 and attention int8
#: is msModelSlim's Qwen3-MoE W4A8 split; w4a16: experts in vLLM-Ascend's W4A16 fused-MoE layout, gptq on routed
#: tokens, attention W8A8_DYNAMIC since no engine loads a dense W4A16 Linear in vLLM-Ascend); not measured on a real
#: MoE model here.
MOE_RECIPES: dict[str, Recipe] = {
    "w8a8_dynamic": Recipe("w8a8d"),
    "w4a8": Recipe(r"w4a8d:match=mlp\.experts,w8a8d"),
    "w4a8c8": Recipe(r"w4a8d:match=mlp\.experts,w8a8d,kv8"),
    "w4a16": Recipe(r"gptq,w4a16:match=mlp\.experts,w8a8d"),
}
MOE_MODEL_TYPES = ("qwen3_moe", "qwen2_moe")


def arch_family(model_type: str) -> str:
    """'qwen' for qwen2/qwen3 (config.json model_type, or the bench variant 'qwen2'), else 'llama'."""
    return "qwen" if str(model_type).lower().startswith("qwen") else "llama"


def quant_type_names() -> list[str]:
    return list(QUANT_TYPE_RECIPES)


def check_quant_type(quant_type: str) -> QuantTypeRecipe:
    """The table row of a quant type (case-insensitive); QCError listing every type otherwise."""
    key = quant_type.strip().lower()
    if key in QUANT_TYPE_RECIPES:
        return QUANT_TYPE_RECIPES[key]
    why = f" ({UNAVAILABLE[key]})" if key in UNAVAILABLE else ""
    raise QCError(f"--quant_type {quant_type!r} is not available{why}; expected one of "
                  f"{', '.join(QUANT_TYPE_RECIPES)}")


def markdown_table() -> list[str]:
    """The recipe table README.md shows ("msModelSlim users"; tests/test_recipes.py keeps the two equal)."""
    lines = ["| --quant_type | artifact | Llama | Qwen2 / Qwen3 |", "|---|---|---|---|"]
    for q in QUANT_TYPE_RECIPES.values():
        lines.append(f"| {q.quant_type} | {q.artifact} | `{q.llama.describe()}` | "
                     + ("same" if q.qwen == q.llama else f"`{q.qwen.describe()}`") + " |")
    return lines


def recipe_for(quant_type: str, model_type: str) -> Recipe:
    """The best-practice Recipe of `quant_type` for a model of config.json `model_type` (MoE models: MOE_RECIPES,
    QCError for a quant type that has none)."""
    row = check_quant_type(quant_type)
    if str(model_type) in MOE_MODEL_TYPES:
        if row.quant_type not in MOE_RECIPES:
            raise QCError(f"--quant_type {quant_type} has no recipe for mixture-of-experts models ({model_type}): "
                          f"expected one of {', '.join(MOE_RECIPES)} (README \"Mixture of experts\")")
        return MOE_RECIPES[row.quant_type]
    return row.for_family(arch_family(model_type))
