"""`qcompile quant --config_path FILE.yaml`: msModelSlim practice configs (modelslim_v1 / modelslim_v0).

Each fixture in tests/fixtures/msmodelslim/ (rewritten from msModelSlim's lab_practice for the tiny 2-layer models)
compiles to the passes and artifact types its blocks describe; every field or processor we cannot honour is one
exit-2 line naming it.
"""
import json
from pathlib import Path

import pytest

from qcompiler import cli
from qcompiler.msmodelslim_plan import expand_braces, glob_select, names_regex
from qcompiler.msmodelslim_yaml import plan_from_config

FIXTURES = Path(__file__).parent / "fixtures" / "msmodelslim"
SMALL = ["--calib_samples", "2", "--seq_len", "32"]
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2}

#: fixture -> (passes, description checks {tensor or top-level key: value})
CASES = {
    "qwen3_dense_w8a8c8": ("smooth:alpha=0.5,w8a8mix:match=", {
        "model_quant_type": "W8A8_MIX", "kv_cache_type": "C8",
        "model.layers.0.mlp.down_proj.weight": "W8A8_MIX", "model.layers.1.mlp.down_proj.weight": "FLOAT"}),
    "default_w8a8": ("smooth:alpha=0.9,w8a8d", {"model_quant_type": "W8A8_DYNAMIC",
                                                "model.layers.1.mlp.down_proj.weight": "W8A8_DYNAMIC"}),
    "default_w8a16": ("w8a16:group=0", {"model_quant_type": "W8A16"}),
    "qwq_w8a8": ("smooth:alpha=0.5:subgraphs=norm-linear+up-down,w8a8:match=", {
        "model_quant_type": "W8A8", "model.layers.0.mlp.down_proj.weight": "FLOAT",
        "model.layers.0.mlp.up_proj.weight": "W8A8"}),
    "qwen3_dense_w16a16s": ("sparse:ratio=0.4,w16a16s", {"model_quant_type": "W16A16S",
                                                         "model.layers.1.self_attn.o_proj.weight": "W16A16S"}),
    "dense_w8a8_mixed_group": ("smooth:subgraphs=norm-linear+ov,w8a8:act_observer=histogram:match=", {
        "model_quant_type": "W8A8", "model.layers.0.self_attn.o_proj.weight": "W8A8",
        "model.layers.0.mlp.gate_proj.weight": "W8A8_DYNAMIC"}),
    "dense_w4a16_gptq": ("gptq,w4a16:group=32", {"model_quant_type": "W4A16", "group_size": 32}),
    "qwen2.5_w8a8_v0": ("w8a8", {"model_quant_type": "W8A8", "model.layers.1.mlp.down_proj.weight": "FLOAT",
                                 "model.layers.1.mlp.up_proj.weight": "W8A8"}),
    "qwen3_dense_w8a8_v0": ("smooth,w8a8mix,fallback:level=2", {"model_quant_type": "W8A8_MIX"}),
    "dense_w4a8_dynamic_group": ("w8a8d:match=", {
        "model_quant_type": "W4A8_DYNAMIC", "group_size": 32, "model.layers.0.self_attn.q_proj.weight": "W8A8_DYNAMIC",
        "model.layers.1.self_attn.o_proj.weight": "W4A8_DYNAMIC", "model.layers.1.mlp.down_proj.weight": "W4A8_DYNAMIC"}),
}


def test_every_fixture_has_a_case():
    assert {p.stem for p in FIXTURES.glob("*.yaml")} == set(CASES) | {"qwq_w8a8_quarot"}


@pytest.mark.parametrize("name", list(CASES))
def test_fixture_compiles_to_its_passes(capsys, tiny_models, calib_file, tmp_path, name):
    passes, checks = CASES[name]
    out = tmp_path / "out"
    rc = cli.main(["quant", "--model_path", str(tiny_models["qwen2"]), "--save_path", str(out), "--config_path",
                   str(FIXTURES / f"{name}.yaml"), "--calib_file", str(calib_file), *SMALL])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"--config_path {name}.yaml (config_id tiny-" in captured.err
    assert f"--passes {passes}" in captured.out
    desc = json.loads((out / "quant_model_description.json").read_text())
    for key, value in checks.items():
        assert desc[key] == value, (key, desc.get(key))


def test_config_wins_over_quant_type_as_in_msmodelslim(capsys, tiny_models, calib_file, tmp_path):
    rc = cli.main(["quant", "--model_path", str(tiny_models["llama"]), "--save_path", str(tmp_path / "o"),
                   "--config_path", str(FIXTURES / "default_w8a16.yaml"), "--quant_type", "w8a8",
                   "--calib_file", str(calib_file), *SMALL])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "--quant_type w8a8 ignored: --config_path wins" in err


def test_part_file_size_reaches_the_writer(monkeypatch, tiny_models, calib_file, tmp_path, capsys):
    """spec.save part_file_size (GiB, 0 = one file) becomes the writer's shard limit."""
    from qcompiler import driver
    seen = []
    real = driver.ArtifactWriter

    def spy(*args, **kw):
        seen.append(kw.get("max_shard_bytes"))
        return real(*args, **kw)
    monkeypatch.setattr(driver, "ArtifactWriter", spy)
    for name, want in (("default_w8a8", 4 * 2**30), ("default_w8a16", 2**62)):
        rc = cli.main(["quant", "--model_path", str(tiny_models["llama"]), "--save_path", str(tmp_path / name),
                       "--config_path", str(FIXTURES / f"{name}.yaml"), "--calib_file", str(calib_file), *SMALL])
        assert rc == 0, capsys.readouterr().err
        assert seen[-1] == want


def _yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


V1 = """apiversion: modelslim_v1
spec:
  process:
{process}
  save:
    - type: ascendv1_saver
      part_file_size: 4
{extra}"""
LQ = """    - type: linear_quant
      qconfig:
        act: {{scope: per_token, dtype: int8, symmetric: true, method: minmax}}
        weight: {{scope: per_channel, dtype: int8, symmetric: {sym}, method: {wm}}}
      include: ["*"]"""


@pytest.mark.parametrize("process,extra,needles", [
    ("    - type: quarot\n      block_size: 32\n" + LQ.format(sym="true", wm="minmax"), "",
     ("spec.process[0] type quarot",)),
    (LQ.format(sym="false", wm="minmax"), "", ("qconfig.weight.symmetric false", "asymmetric")),
    (LQ.format(sym="true", wm="ssz"), "", ("qconfig.weight.method ssz",)),
    (LQ.format(sym="true", wm="minmax") + "\n      granularity: 3", "", ("spec.process[0].granularity",)),
    ("    - type: iter_smooth\n      scale_min: 0.01\n" + LQ.format(sym="true", wm="minmax"), "",
     ("spec.process[0].scale_min",)),
    ("    - type: awq\n      weight_qconfig: {scope: per_channel, dtype: int4, symmetric: true, method: minmax}\n"
     + LQ.format(sym="true", wm="minmax"), "", ("awq weight_qconfig",)),
    ("    - type: dynamic_cache\n      qconfig: {scope: per_token, dtype: int8, symmetric: true, method: minmax}\n"
     + LQ.format(sym="true", wm="minmax"), "", ("spec.process[0].qconfig", "C8")),
    ("    - type: linear_quant\n      qconfig:\n        act: {scope: per_token, dtype: int4, symmetric: true, "
     "method: minmax}\n        weight: {scope: per_channel, dtype: int4, symmetric: true, method: minmax}",
     "", ("qconfig.act.dtype int4",)),
    ("    - type: linear_quant\n      qconfig:\n        act: {scope: per_token, dtype: int8, symmetric: false, "
     "method: minmax}\n        weight: {scope: per_channel, dtype: int8, symmetric: true, method: minmax}",
     "", ("per_token asymmetric",)),
    ("    - type: linear_quant\n      qconfig:\n        act: {scope: per_token, dtype: int8, symmetric: true, "
     "method: minmax}\n        weight: {scope: per_channel, dtype: int4, symmetric: true, method: minmax}",
     "", ("int4 per_channel with per_token activations", "per_group")),
    ("    - type: linear_quant\n      qconfig:\n        act: {scope: per_tensor, dtype: int8, symmetric: true, "
     "method: minmax}\n        weight: {scope: per_group, dtype: int4, symmetric: true, method: minmax, "
     "ext: {group_size: 32}}", "", ("per_group with int8 per_tensor activations",)),
    (LQ.format(sym="true", wm="minmax"), "  prior:\n    - process: [{type: adapt_rotation, stage: 1}]\n",
     ("spec.prior",)),
    (LQ.format(sym="true", wm="minmax"), "  bogus: 1\n", ("spec.bogus",)),
])
def test_unsupported_v1_field_is_one_line(capsys, tiny_models, calib_file, tmp_path, process, extra, needles):
    path = _yaml(tmp_path, V1.format(process=process, extra=extra))
    rc = cli.main(["quant", "--model_path", str(tiny_models["llama"]), "--save_path", str(tmp_path / "o"),
                   "--config_path", str(path), "--calib_file", str(calib_file)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("qcompile: error:"), lines
    assert "not supported by qcompile" in lines[0] and all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,needles", [
    ("apiversion: multimodal_vlm_modelslim_v1\nspec: {}\n", ("apiversion 'multimodal_vlm_modelslim_v1'",)),
    ("apiversion: modelslim_v1\nspec:\n  process: []\n", ("nothing to quantize",)),
    ("not: [valid", ("invalid YAML",)),
    ("apiversion: modelslim_v0\nspec:\n  calib_cfg: {w_bit: 8, a_bit: 8}\n",
     ("spec.calib_cfg.mm_tensor true", "per-tensor weights")),
    ("apiversion: modelslim_v0\nspec:\n  calib_cfg: {w_bit: 8, a_bit: 8, mm_tensor: false}\n"
     "  calib_params:\n    mix_cfg: {'*.down_proj': w8a16}\n", ("mix_cfg",)),
    ("apiversion: modelslim_v0\nspec:\n  anti_cfg: {anti_method: m1, os_k: 3}\n"
     "  calib_cfg: {w_bit: 8, a_bit: 8, mm_tensor: false}\n", ("spec.anti_cfg.os_k",)),
    ("apiversion: modelslim_v1\nspec:\n  process:\n" + LQ.format(sym="true", wm="minmax") + "\n  dataset: nowhere.jsonl\n",
     ("spec.dataset 'nowhere.jsonl'", "--calib_file")),
])
def test_bad_configs_are_one_line(capsys, tiny_models, tmp_path, text, needles):
    path = _yaml(tmp_path, text)
    rc = cli.main(["quant", "--model_path", str(tiny_models["llama"]), "--save_path", str(tmp_path / "o"),
                   "--config_path", str(path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("qcompile: error:"), lines
    assert all(n in lines[0] for n in needles), lines[0]


SQ = "    - type: smooth_quant\n      alpha: {alpha}\n"
WQ = "weight_qconfig: {scope: per_channel, dtype: int8, symmetric: true, method: minmax}"


@pytest.mark.parametrize("process,needles", [
    (SQ.format(alpha="abc"), ("spec.process[0].alpha is 'abc'", "expected a number")),
    (SQ.format(alpha="[0.5]"), ("spec.process[0].alpha is [0.5]", "expected a number")),
    (SQ.format(alpha="null"), ("spec.process[0].alpha is None", "expected a number")),
    ("    - type: iter_smooth\n      scale_min: x\n", ("spec.process[0].scale_min is 'x'",)),
    ("    - type: flex_smooth_quant\n      alpha: x\n      beta: 0.5\n", ("spec.process[0].alpha is 'x'",)),
    (f"    - type: awq\n      n_grid: x\n      {WQ}\n", ("spec.process[0].n_grid is 'x'", "an integer")),
    ("    - type: float_sparse\n      sparse_ratio: null\n", ("spec.process[0].sparse_ratio is None",)),
    ("    - type: iter_smooth\n      symmetric: 'false'\n", ("spec.process[0].symmetric is 'false'", "true or false")),
    ("    - type: linear_quant\n      qconfig:\n        weight: {scope: per_channel, dtype: int8, symmetric: 'no', "
     "method: minmax}\n", ("spec.process[0].qconfig.weight.symmetric is 'no'",)),
    ("    - type: group\n      configs: [x]\n", ("spec.process[0].configs[0] must be a mapping",)),
    ("    - type: iter_smooth\n      include: [1, 2]\n", ("spec.process[0].include is [1, 2]", "globs")),
], ids=["alpha-str", "alpha-list", "alpha-null", "scale_min", "flex-alpha", "n_grid", "sparse_ratio",
        "smooth-symmetric", "weight-symmetric", "group-configs", "include-ints"])
def test_bad_v1_values_are_one_line(capsys, tiny_models, tmp_path, process, needles):
    """A processor field of the wrong type was a traceback (float('abc'), float(None), int('x'), fnmatch on an int,
    .get on a string in a group's configs) or, for symmetric: 'false' (a string, truthy), a symmetric compile;
    now one line naming the file and the field."""
    lq = LQ.format(sym="true", wm="minmax") if "linear_quant" not in process else ""
    path = _yaml(tmp_path, V1.format(process=process.rstrip("\n") + ("\n" + lq if lq else ""), extra=""))
    rc = cli.main(["quant", "--model_path", str(tiny_models["llama"]), "--save_path", str(tmp_path / "o"),
                   "--config_path", str(path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"qcompile: error: --config_path {path}:"), lines
    assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "o").exists()


def test_numbers_yaml_reads_as_strings_are_taken(tmp_path):
    """PyYAML reads `scale_min: 1e-5` (no dot) as the string '1e-5'; msModelSlim's pydantic config converts it."""
    path = _yaml(tmp_path, V1.format(process="    - type: iter_smooth\n      scale_min: 1e-5\n      alpha: 8e-1\n"
                                     + LQ.format(sym="true", wm="minmax"), extra=""))
    plan = plan_from_config(path, TINY, "llama", calib_given=True)
    assert plan.passes[0] == ("smooth", {"alpha": "0.8"})  # pass_options: the --passes text


UNMATCHED = """apiversion: modelslim_v1
spec:
  process:
    - type: linear_quant
      qconfig:
        act: {scope: per_token, dtype: int8, symmetric: true, method: minmax}
        weight: {scope: per_channel, dtype: int8, symmetric: true, method: minmax}
      include: ["*"]
      exclude: ["*down_porj", "*gate", "lm_head"]
"""


def test_glob_matching_no_module_is_noted(tmp_path):
    """An exclude with a typo ('*down_porj') quantized every down_proj without a word (msModelSlim warns about a
    pattern that matches no module); the router glob '*gate' and lm_head name modules of the model: no note."""
    path = _yaml(tmp_path, UNMATCHED)
    plan = plan_from_config(path, TINY, "llama", calib_given=True)
    assert plan.notes == ["spec.process[0].exclude '*down_porj' matches no module of this model"], plan.notes
    moe = {**TINY, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    plan = plan_from_config(path, moe, "qwen3_moe", calib_given=True)
    assert plan.notes == ["spec.process[0].exclude '*down_porj' matches no module of this model"], plan.notes


def test_dataset_next_to_the_config_is_the_calibration(tmp_path, calib_file):
    (tmp_path / "calib.jsonl").write_text(Path(calib_file).read_text())
    plan = plan_from_config(FIXTURES / "default_w8a16.yaml", TINY, "llama", calib_given=False)
    assert plan.calib is None  # no dataset field in that file
    path = tmp_path / "with_dataset.yaml"
    path.write_text((FIXTURES / "qwq_w8a8.yaml").read_text())
    plan = plan_from_config(path, TINY, "qwen2", calib_given=False)
    assert plan.calib == tmp_path / "calib.jsonl"


def test_globs_select_as_msmodelslim_configset():
    """include/exclude hold a name when it equals a pattern or matches it as a BRACE glob (ConfigSet)."""
    names = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")]
    assert glob_select(names, ["*"], ["*.down_proj"]) == [n for n in names if "down" not in n]
    assert glob_select(names, ["model.layers.{0,2}.mlp.up_proj"]) == ["model.layers.0.mlp.up_proj",
                                                                      "model.layers.2.mlp.up_proj"]
    assert glob_select(names, ["*self_attn*"], ["model.layers.1.*"]) == ["model.layers.0.self_attn.q_proj",
                                                                         "model.layers.2.self_attn.q_proj"]
    rx = names_regex(glob_select(names, ["*"], ["*.down_proj"]), 3)
    import re
    assert [n for n in names if re.search(rx, n)] == [n for n in names if "down" not in n]
    assert ":" not in rx and "," not in rx   # it is printed inside --passes name:key=value,...


def test_brace_expansion_as_msmodelslim_expand_braces():
    """config_map.py `_expand_braces`: nested groups expand, an escaped comma does not cut, and a first group
    without a comma or without its closing brace leaves the whole pattern literal (then fnmatch sees `{`)."""
    assert expand_braces("a.{b,c{d,e}}.f") == ["a.b.f", "a.cd.f", "a.ce.f"]
    assert expand_braces("l.{0,1}.{q,k}") == ["l.0.q", "l.0.k", "l.1.q", "l.1.k"]
    assert expand_braces("x{a\\,b}") == ["x{a\\,b}"]
    assert expand_braces("x{a}.{b,c}") == ["x{a}.{b,c}"]
    assert expand_braces("x{a,b") == ["x{a,b"]
    assert expand_braces("{a,a}") == ["a"]
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert glob_select(names, ["model.layers.{0,1}.mlp.{up,gate}_proj"]) == names[:2]
    assert glob_select(names, ["MODEL.*"]) == []          # case-sensitive, as on Linux


V0_SPARSE = ("apiversion: modelslim_v0\nspec:\n  calib_cfg: {{w_bit: 4, a_bit: 8, co_sparse: true, use_sigma: true, "
             "sigma_factor: {sigma}}}\n")


def test_v0_integer_sigma_factor_is_taken_with_a_note(tmp_path):
    """`sigma_factor: 3` is 3.0 here, as `--sigma_factor 3` is; msModelSlim's check_number(..., float) refuses the
    YAML integer, so the plan says so (msmodelslim_flags.plan_from_settings)."""
    plan = plan_from_config(_yaml(tmp_path, V0_SPARSE.format(sigma=3)), TINY, "llama", calib_given=True)
    assert ("w8a8s", {"sigma": "3.0"}) in plan.passes
    assert any("spec.calib_cfg.sigma_factor 3 read as 3.0" in n and "check_number" in n for n in plan.notes), plan.notes
    plan = plan_from_config(_yaml(tmp_path, V0_SPARSE.format(sigma=3.0)), TINY, "llama", calib_given=True)
    assert not any("sigma_factor" in n for n in plan.notes), plan.notes


@pytest.mark.parametrize("sigma,needle", [("true", "spec.calib_cfg.sigma_factor True: expected a number"),
                                          ("5", "spec.calib_cfg.sigma_factor 5.0: must be in [3.0, 4.0]")])
def test_v0_bad_sigma_factor_is_one_line(capsys, tiny_models, tmp_path, sigma, needle):
    path = _yaml(tmp_path, V0_SPARSE.format(sigma=sigma))
    rc = cli.main(["quant", "--model_path", str(tiny_models["llama"]), "--save_path", str(tmp_path / "o"),
                   "--config_path", str(path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and needle in lines[0], lines
