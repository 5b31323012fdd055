"""`qcompile quant` one-click mode: every quant type compiles its best-practice recipe; modes, devices, errors.

Compiles use the tiny random checkpoints of conftest.py with 2 x 32 calibration tokens (`SMALL`).
"""
import importlib.util
import json
import os
import shutil

import pytest

from qcompiler import cli
from qcompiler.config import parse_passes
from qcompiler.passes import REGISTRY
from qcompiler.recipes import QUANT_TYPE_RECIPES, recipe_for

SMALL = ["--calib_samples", "2", "--seq_len", "32"]

#: quant type -> (description model_quant_type, extra top-level description keys, dtype of the artifact)
EXPECTED = {
    "w8a8": ("W8A8", {}, "bfloat16"),
    "w8a8_dynamic": ("W8A8_DYNAMIC", {}, "bfloat16"),
    "w8a8c8": ("W8A8", {"kv_cache_type": "C8"}, "bfloat16"),
    "w8a16": ("W8A16", {}, "bfloat16"),
    "w4a16": ("W4A16", {}, "bfloat16"),
    "w4a8": ("W4A8_DYNAMIC", {}, "bfloat16"),
    "w4a8c8": ("W4A8_DYNAMIC", {"kv_cache_type": "C8"}, "bfloat16"),
    "w8a8s": ("W8A8S", {}, "float16"),
    "w16a16s": ("W16A16S", {}, "bfloat16"),
}


def _error(capsys, argv):
    rc = cli.main(["quant", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("qcompile: error:"), err
    return err[0]


def test_every_quant_type_has_an_expectation_and_valid_passes():
    assert set(EXPECTED) == set(QUANT_TYPE_RECIPES)
    for quant_type, row in QUANT_TYPE_RECIPES.items():
        for recipe in (row.llama, row.qwen):
            assert all(name in REGISTRY for name, _ in parse_passes(recipe.passes)), recipe


@pytest.mark.parametrize("quant_type", list(EXPECTED))
def test_every_quant_type_compiles_its_recipe(capsys, tiny_models, calib_file, tmp_path, quant_type):
    """The artifact carries the type's quant types; stderr names the recipe (passes) it used."""
    arch = "qwen2" if quant_type in ("w8a8", "w8a8s", "w4a8c8") else "llama"   # both families covered
    out = tmp_path / "out"
    rc = cli.main(["quant", "--model_path", str(tiny_models[arch]), "--save_path", str(out), "--quant_type",
                   quant_type, "--calib_file", str(calib_file), *SMALL])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    recipe = recipe_for(quant_type, arch)
    assert f"best practice of --quant_type {quant_type}" in captured.err
    assert f"--passes {recipe.passes}" in captured.err and f"--passes {recipe.passes}" in captured.out
    desc = json.loads((out / "quant_model_description.json").read_text())
    model_type, extra, dtype = EXPECTED[quant_type]
    assert desc["model_quant_type"] == model_type
    for key, value in extra.items():
        assert desc[key] == value
    types = {v for k, v in desc.items() if k.endswith("mlp.gate_proj.weight")}
    assert types == {model_type}, types
    report = json.loads((out / "qcompile_report.json").read_text())
    assert report["source"].startswith(f"qcompile quant: best practice of --quant_type {quant_type}")
    assert "chosen by: qcompile quant: best practice" in (out / "qcompile_report.md").read_text()
    assert report["dtype"] == dtype and report["passes"][:len(parse_passes(recipe.passes))] == \
        [n for n, _ in parse_passes(recipe.passes)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quant_type_artifact_is_the_main_command_artifact(capsys, tiny_models, calib_file, tmp_path, arch):
    """`qcompile quant --quant_type w8a8` is `qcompile MODEL --passes <recipe>` byte for byte (same CompileOptions,
    deterministic compile), so it reaches the recipe's perplexity (BENCHMARKS.md measures the recipe)."""
    recipe = recipe_for("w8a8", arch)
    a, b = tmp_path / "quant", tmp_path / "main"
    assert cli.main(["quant", "--model_path", str(tiny_models[arch]), "--save_path", str(a), "--quant_type", "w8a8",
                     "--calib_file", str(calib_file), *SMALL]) == 0
    assert cli.main([str(tiny_models[arch]), "--passes", recipe.passes, *recipe.flags(), "--calib", str(calib_file),
                     "--calib-samples", "2", "--seq-len", "32", "-o", str(b)]) == 0, capsys.readouterr().err
    for name in ("quant_model_weights.safetensors", "quant_model_description.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_default_quant_type_is_w8a8_as_msmodelslim(capsys, tiny_models, calib_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()  # msModelSlim writes into an existing empty folder
    rc = cli.main(["quant", "--model_path", str(tiny_models["llama"]), "--save_path", str(out), "--calib_file",
                   str(calib_file), *SMALL])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "--quant_type w8a8 " in err
    assert json.loads((out / "quant_model_description.json").read_text())["model_quant_type"] == "W8A8"


def test_help_names_every_quant_type_its_recipe_and_what_trust_remote_code_changes(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["quant", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for quant_type, row in QUANT_TYPE_RECIPES.items():
        assert f"{quant_type}: {row.llama.describe()}" in out
    assert "auto_map" in out and "never executes code" in out
    for flag in ("--save_directory", "--anti_method", "--tp_size", "--config_path", "--disable_level"):
        assert flag in out


@pytest.mark.parametrize("args,needles", [
    (["--quant_type", "w3a8"], ("'w3a8' is not available", "w8a8, w8a8_dynamic")),
    (["--quant_type", "w4a4"], ("4-bit activations",)),
    (["--trust_remote_code", "maybe"], ("expected true or false",)),
    (["--quant_type", "w8a8", "--w_bit", "4"], ("--w_bit 4 contradicts --quant_type w8a8", "--w_bit 8")),
    (["--quant_type", "w4a16", "--a_bit", "8"], ("--a_bit 8 contradicts --quant_type w4a16",)),
    (["--quant_type", "w8a8", "--anti_method", "m1"], ("cannot be combined with the traditional", "--anti_method")),
    (["--config_path", "c.yaml", "--w_bit", "8"], ("--config_path cannot be combined", "--w_bit")),
    (["--device", "gpu"], ("--device 'gpu' is not supported", "cpu, npu")),
    (["--calib_file", "/nonexistent.jsonl"], ("--calib_file /nonexistent.jsonl does not exist",)),
    (["--calib_file=", "x.jsonl"], ("unrecognized arguments: x.jsonl", "--calib_file= has an empty value")),
    (["--bogus_flag", "1"], ("unrecognized arguments: --bogus_flag",)),
])
def test_error_cases(capsys, tiny_models, tmp_path, args, needles):
    err = _error(capsys, ["--model_path", tiny_models["llama"], "--save_path", tmp_path / "o", *args])
    assert all(n in err for n in needles), err
    assert not (tmp_path / "o").exists()


def test_output_flag_errors(capsys, tiny_models, tmp_path):
    err = _error(capsys, ["--model_path", tiny_models["llama"]])
    assert "--save_path" in err and "--save_directory" in err
    err = _error(capsys, ["--model_path", tiny_models["llama"], "--save_path", tmp_path / "a", "--save_directory",
                          tmp_path / "b"])
    assert "not both" in err


@pytest.mark.parametrize("flag, plan", [("--save_path", ["--quant_type", "w8a16"]),
                                        ("--save_directory", ["--w_bit", "8", "--a_bit", "16"])])
def test_output_that_is_a_symlink_is_refused(capsys, tiny_models, tmp_path, flag, plan):
    """Rule 1: a --save_path that is a link to an empty folder was taken as msModelSlim's empty folder and
    written at the link's target."""
    import os
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "o")
    err = _error(capsys, ["--model_path", tiny_models["llama"], flag, tmp_path / "o", *plan])
    assert f"{flag} {tmp_path / 'o'} is a symbolic link" in err
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("device", ["npu", "npu:0", "npu:0,1"])
def test_npu_device_compiles_on_cpu_with_a_note(capsys, tiny_models, calib_file, tmp_path, device):
    """msModelSlim's documented `--device npu:0,1` runs unchanged: the artifact does not depend on the device."""
    rc = cli.main(["quant", "--model_path", str(tiny_models["llama"]), "--save_path", str(tmp_path / "o"),
                   "--quant_type", "w8a16", "--device", device, "--calib_file", str(calib_file), *SMALL])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"--device {device}: qcompile compiles on CPU" in err
    if importlib.util.find_spec("torch_npu") is None:
        assert "torch_npu is not installed" in err


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_auto_map_needs_trust_remote_code_only_when_it_helps(capsys, tiny_models, tmp_path):
    auto_map = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    supported = _with_config(tiny_models["llama"], tmp_path / "custom_llama", auto_map=auto_map)
    err = _error(capsys, ["--model_path", supported, "--save_path", tmp_path / "o"])
    assert "config.json: auto_map" in err and "--trust-remote-code" in err  # the flag of every command
    unsupported = _with_config(tiny_models["llama"], tmp_path / "custom_arch", auto_map=auto_map,
                               architectures=["CustomForCausalLM"])
    for extra in ([], ["--trust_remote_code"]):
        err = _error(capsys, ["--model_path", unsupported, "--save_path", tmp_path / "o", *extra])
        assert "'CustomForCausalLM'" in err and "not implemented" in err and "--trust" not in err
    assert not (tmp_path / "o").exists()


def test_non_empty_save_path_is_refused(capsys, tiny_models, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    err = _error(capsys, ["--model_path", tiny_models["llama"], "--save_path", out])
    assert "not empty" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "x"


def test_trusted_auto_map_with_one_click_flags_as_documented(capsys, tiny_models, calib_file, tmp_path):
    """The quick start's command shape (--device, --model_type NAME, --trust_remote_code True) runs; a trusted
    auto_map checkpoint of a supported architecture compiles with the built-in implementation."""
    model = _with_config(tiny_models["llama"], tmp_path / "m", auto_map={"AutoConfig": "cfg.CustomConfig"})
    out = tmp_path / "out"
    rc = cli.main(["quant", "--model_path", str(model), "--save_path", str(out), "--quant_type", "W8A8_DYNAMIC",
                   "--device", "cpu", "--trust_remote_code", "True", "--model_type", "SmolLM2-135M",
                   "--w_bit", "8", "--a_bit", "8", "--calib_file", str(calib_file), *SMALL])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "--model_type SmolLM2-135M: the architecture is read from config.json" in captured.err
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["model_quant_type"] == "W8A8_DYNAMIC"


def test_config_json_not_an_object(capsys, tiny_models, tmp_path):
    """A config.json that is a JSON list was reported as "not a decoder LLM config (no num_hidden_layers)"."""
    model = shutil.copytree(tiny_models["llama"], tmp_path / "model")
    (model / "config.json").write_text("[1, 2]")
    err = _error(capsys, ["--model_path", model, "--save_path", tmp_path / "out"])
    assert "config.json: a JSON list, expected a JSON object" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--save_path", ""], ["--quant_type", ""], ["--calib_file", ""],
                                  ["--config_path="], ["--w_bit", ""]])
def test_empty_flag_value(capsys, tiny_models, tmp_path, monkeypatch, args):
    """`--save_path ""` was the current folder ("--save_path . already exists") and `--quant_type ""` the default."""
    monkeypatch.chdir(tmp_path)
    save = [] if args[0] == "--save_path" else ["--save_path", tmp_path / "o"]
    err = _error(capsys, ["--model_path", tiny_models["llama"], *save, *args])
    assert f"{args[0].rstrip('=')} has an empty value" in err, err
    assert os.listdir(tmp_path) == []
