"""fallback pass + Qwen policy: the decision rule (exact counts, fused units, budget), that the choice follows
the measured sensitivity (an injected outlier is found), the artifact/report agree, composition with smooth and
a dynamic scheme, bad options as one-line errors before any work, and the policy's resolution.

Compiles use the tiny random checkpoints of conftest.py, 4 x 32 calibration tokens.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcompiler import cli
from qcompiler.config import CompileOptions, load_recipe
from qcompiler.driver import compile_model
from qcompiler.errors import QCError
from qcompiler.passes import make_pass
from qcompiler.passes.fallback import UNITS, check_fallback, decide
from qcompiler.policy import resolve_policy
from tests.helpers import checker_report

QKV, O, GU, DOWN = UNITS


# ---- the decision, on given sensitivities (no model) -------------------------------------------------
def _measured(values):
    """[(layer, unit, s)] from {(layer, unit): s}."""
    return [(layer, unit, s) for (layer, unit), s in values.items()]


MEASURED = _measured({(0, QKV): 0.50, (0, O): 0.30, (0, GU): 0.05, (0, DOWN): 0.25,
                      (1, QKV): 0.02, (1, O): 0.01, (1, GU): 0.04, (1, DOWN): 0.20})


@pytest.mark.parametrize("level", range(0, 15))
def test_level_keeps_exactly_n_linears_and_never_splits_a_fused_group(level):
    keep = decide(MEASURED, make_pass("fallback", {"level": str(level)}).options).keep
    assert len(keep) == level
    for i in (0, 1):
        for unit in (QKV, GU):
            names = {f"model.layers.{i}.{n}" for n in unit}
            assert names <= keep or not names & keep, (level, sorted(keep))


def test_level_takes_the_most_error_for_its_count():
    """level=3: three single Linears (0.30 + 0.25 + 0.20 = 0.75) beat the q/k/v group (0.50); level=4: q/k/v +
    o_proj (0.80) beats o + down + down + (nothing of size 1 left) -- exact on the additive estimate."""
    opts = lambda n: make_pass("fallback", {"level": str(n)}).options  # noqa: E731
    assert decide(MEASURED, opts(3)).keep == {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                                              "model.layers.1.mlp.down_proj"}
    assert decide(MEASURED, opts(4)).keep == {f"model.layers.0.{n}" for n in QKV + O}
    rep = decide(MEASURED, opts(1)).report
    assert [u["linears"] for u in rep["chosen"]] == [["model.layers.0.self_attn.o_proj"]]
    assert rep["cutoff"] == {"lowest_chosen": 0.30, "highest_not_chosen": 0.50}
    assert rep["error_before"] == pytest.approx(1.37) and rep["error_after"] == pytest.approx(1.07)


def test_budget_keeps_the_fewest_linears_that_meet_it():
    opts = lambda x: make_pass("fallback", {"budget": str(x)}).options  # noqa: E731
    total = sum(s for _, _, s in MEASURED)                       # 1.37
    assert decide(MEASURED, opts(total)).keep == frozenset()     # already within budget
    # <= 1.07 needs 0.30 removed: one Linear (o_proj 0.30)
    assert decide(MEASURED, opts(1.07 + 1e-9)).keep == {"model.layers.0.self_attn.o_proj"}
    # <= 0.60 needs 0.77 removed: 2 Linears give at most 0.55, 3 give 0.75, 4 give 0.80
    d = decide(MEASURED, opts(0.60))
    assert len(d.keep) == 4 and d.report["error_after"] <= 0.60
    assert d.report["error_after"] == pytest.approx(total - 0.80)


@pytest.mark.parametrize("options, needle", [
    ({}, "exactly one of level"),
    ({"level": "2", "budget": "0.1"}, "exactly one of level"),
    ({"level": "-1"}, "level must be an integer >= 0"),
    ({"level": "two"}, "level='two' is not a valid"),
    ({"budget": "0"}, "budget must be a number > 0"),
    ({"budget": "nan"}, "budget must be a number > 0"),
    ({"ratio": "1"}, "unknown option 'ratio'"),
])
def test_bad_options_are_one_line_errors(options, needle):
    with pytest.raises(QCError, match=needle) as e:
        make_pass("fallback", options)
    assert "\n" not in str(e.value)


SMALL_CFG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "num_hidden_layers": 2}


def test_pipeline_checks_before_any_work():
    fb = lambda n: make_pass("fallback", {"level": str(n)})  # noqa: E731
    check_fallback([make_pass("w8a8"), fb(14)], SMALL_CFG)  # every Linear of 2 layers
    with pytest.raises(QCError, match="level=15: the schemes quantize 14"):
        check_fallback([make_pass("w8a8"), fb(15)], SMALL_CFG)
    with pytest.raises(QCError, match="w8a16 comes after fallback"):
        check_fallback([make_pass("w8a8", {"match": "self_attn"}), fb(1), make_pass("w8a16")], SMALL_CFG)
    # only q/k/v and gate/up groups left (o_proj, down_proj excluded): 1, 2... of sizes {3, 3, 2, 2}
    ex = (r"o_proj", r"down_proj")
    check_fallback([make_pass("w8a8"), fb(2)], SMALL_CFG, ex)
    with pytest.raises(QCError, match="has exactly 1"):
        check_fallback([make_pass("w8a8"), fb(1)], SMALL_CFG, ex)


def test_cli_rejects_bad_fallback_before_any_work(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    for passes, needle in (("w8a8,fallback:level=x", "not a valid"), ("fallback:level=1,w8a8", "requires"),
                           ("w8a8,fallback:level=99", "level=99")):
        rc = cli.main([str(tiny_models["llama"]), "--passes", passes, "-o", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0], err
        assert not out.exists()


# ---- on compiled tiny models ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outlier_llama(tiny_models, tmp_path_factory):
    """The tiny Llama with one massive intermediate channel feeding layer 1's down_proj: up_proj row J x 64 and
    down_proj column J / 64, so the float model is the same function, but static per-tensor activation
    quantization of down_proj's input now spends its range on channel J (the others round to a few codes)."""
    folder = tmp_path_factory.mktemp("outlier") / "llama"
    shutil.copytree(tiny_models["llama"], folder)
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    j, f = 7, 64.0
    up, down = "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"
    tensors[up] = tensors[up].clone()
    tensors[up][j] *= f
    tensors[down] = tensors[down].clone()
    tensors[down][:, j] /= f
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


def _compile(model, out, passes, calib_file, **kw):
    return compile_model(CompileOptions(model=str(model), out=out, passes=passes, calib=calib_file,
                                        calib_samples=4, seq_len=32, **kw), log=lambda m: None)


def _float_linears(out):
    desc = json.loads((out / "quant_model_description.json").read_text())
    return sorted(k[:-len(".weight")] for k, v in desc.items()
                  if v == "FLOAT" and k.startswith("model.layers.") and k.endswith("proj.weight")), desc


def test_level_follows_measured_sensitivity_and_artifact_agrees(outlier_llama, calib_file, tmp_path):
    """w8a8, level=1: the injected outlier makes layer 1's down_proj the most sensitive unit by far (>= 10x the
    next: 64x the range for 1 channel of 128), and it is the one Linear left float in the artifact."""
    out = tmp_path / "out"
    report = _compile(outlier_llama, out, (("w8a8", {}), ("fallback", {"level": "1"})), calib_file)
    floats, desc = _float_linears(out)
    assert floats == ["model.layers.1.mlp.down_proj"]
    assert desc["model.layers.1.mlp.down_proj.weight"] == "FLOAT"
    assert "model.layers.1.mlp.down_proj.deq_scale" not in desc
    fb = report["fallback"]
    ranking = fb["ranking_top"]
    assert ranking[0]["linears"] == ["model.layers.1.mlp.down_proj"]
    assert ranking[0]["sensitivity"] >= 10 * ranking[1]["sensitivity"], ranking[:2]
    assert fb["chosen"] == [ranking[0]] and fb["linears_kept_float"] == 1
    assert report["layers"][1]["linears"]["mlp.down_proj"] == "FLOAT"
    assert report["layers"][1]["passes"]["fallback"]["kept_float"] == ["mlp.down_proj"]
    md = (out / "qcompile_report.md").read_text()
    assert "## Fallback (level=1): 1 of 14" in md and "model.layers.1.mlp.down_proj" in md
    assert checker_report(out)["errors"] == 0  # last: skips when ../shared is absent


def test_composes_with_smooth_dynamic_scheme_and_policy(tiny_models, calib_file, tmp_path):
    """Qwen2 (q/k/v bias), smooth + W8A8_DYNAMIC, policy qwen (down_proj float) + level=3: exactly the 2
    policy Linears + 3 chosen ones are FLOAT, fused groups whole, the checker is clean."""
    out = tmp_path / "out"
    report = _compile(tiny_models["qwen2"], out, (("smooth", {"grid": "4"}), ("w8a8d", {}),
                                                  ("fallback", {"level": "3"})), calib_file, policy="qwen")
    floats, desc = _float_linears(out)
    downs = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    chosen = sorted(n for u in report["fallback"]["chosen"] for n in u["linears"])
    assert len(chosen) == 3 and not set(chosen) & set(downs)
    assert floats == sorted(downs + chosen)
    for i in (0, 1):
        for unit in (QKV, GU):
            types = {desc[f"model.layers.{i}.{n}.weight"] for n in unit}
            assert len(types) == 1, (i, unit, types)
    assert report["policy"] == "qwen" and r"\.mlp\.down_proj$" in report["exclude"]
    assert checker_report(out)["errors"] == 0  # last: skips when ../shared is absent


# ---- the Qwen policy -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, model_type, passes, want", [
    ("auto", "qwen2", ["w8a8"], "qwen"),
    ("auto", "qwen3", ["w8a8mix"], "qwen"),
    ("auto", "qwen2", ["w8a8", "fallback:level=2"], "qwen"),
    ("auto", "llama", ["w8a8"], "none"),
    ("auto", "qwen2", ["smooth", "w8a8"], "none"),
    ("auto", "qwen2", ["w8a8d"], "none"),
    ("auto", "qwen2", ["w4a16"], "none"),
    ("auto", "qwen2", ["w8a16:match=down_proj", "w8a8"], "none"),
    ("qwen", "llama", ["w8a16"], "qwen"),
    ("none", "qwen2", ["w8a8"], "none"),
])
def test_policy_resolution(name, model_type, passes, want):
    from qcompiler.config import parse_passes
    pipeline = [make_pass(n, o) for n, o in parse_passes(",".join(passes))]
    assert resolve_policy(name, model_type, pipeline) == want


def test_policy_reads_the_outlier_capability_not_a_name():
    """Any pass declaring `migrates_outliers` (a new outlier-migration pass) lifts auto's qwen policy, as smooth does."""
    from qcompiler.passes.base import Pass

    class Migrate(Pass):
        name = "my-migration"
        migrates_outliers = True
    assert resolve_policy("auto", "qwen2", [Migrate(), make_pass("w8a8")]) == "none"
    assert resolve_policy("auto", "qwen2", [make_pass("w8a8")]) == "qwen"


def test_bad_policy_is_an_error_and_recipe_takes_it(tmp_path):
    with pytest.raises(QCError, match="expected one of auto, none, qwen|expected one of auto, qwen, none"):
        CompileOptions(model="m", out=tmp_path / "o", policy="msmodelslim")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: w8a8\npolicy: qwen\n")
    assert load_recipe(recipe)["policy"] == "qwen"
