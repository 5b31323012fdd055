"""Bad input to `qcompile`: exit code 2, one line on stderr naming what was wrong and what was expected,
no traceback, and never a half-written output folder (no OUT, no `.OUT.tmp-*` left behind).

Compiles here use the tiny random checkpoints of conftest.py with `--calib-samples 2 --seq-len 32`.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qcompiler import cli
from qcompiler.errors import QCError
from tests.helpers import SMALL, edit_config, expect_error, leftovers, make_old_out, rewrite_weights


# ---------------------------------------------------------------------------------------------- helpers

def expect_compile_error(capsys, tmp_path, model, extra, *needles):
    """A compile of `model` into tmp_path/out that must fail cleanly and leave nothing behind."""
    msg = expect_error(capsys, [model, "-o", tmp_path / "out", *SMALL, *extra], *needles)
    assert leftovers(tmp_path) == [], os.listdir(tmp_path)
    return msg


def expect_usage_error(capsys, argv, *needles):
    """argparse errors: SystemExit(2), the last stderr line is 'PROG: error: ...' naming the problem."""
    with pytest.raises(SystemExit) as exc:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last, err
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    return last


# ------------------------------------------------------------------------------------------ model folder

def test_model_folder_missing(capsys, tmp_path):
    expect_compile_error(capsys, tmp_path, tmp_path / "nope", [], "nope", "not found", "config.json")


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    expect_compile_error(capsys, tmp_path, tmp_path / "empty", [], "no config.json", "hugging face")


def test_config_not_json(capsys, tmp_path, model_copy):
    (model_copy / "config.json").write_text("{not json")
    expect_compile_error(capsys, tmp_path, model_copy, [], "config.json", "not valid json")


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "GPT2LMHeadModel"])
def test_unsupported_architecture(capsys, tmp_path, model_copy, arch):
    edit_config(model_copy, architectures=[arch])
    expect_compile_error(capsys, tmp_path, model_copy, [], arch, "not supported",
                         "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@pytest.mark.parametrize("key,value", [("num_hidden_layers", 0), ("num_hidden_layers", -1),
                                       ("num_hidden_layers", "2"), ("num_attention_heads", 0),
                                       ("hidden_size", 2.5), ("vocab_size", True)])
def test_config_size_not_a_positive_integer(capsys, tmp_path, model_copy, key, value):
    """A layer count of 0 / -1 was reported as the weights not being part of the model; a string one as a
    transformers validation error: now one line naming config.json, the key and what was expected."""
    edit_config(model_copy, **{key: value})
    expect_compile_error(capsys, tmp_path, model_copy, [], "config.json", key, "expected a positive integer")


@pytest.mark.parametrize("key,value", [("max_position_embeddings", 0), ("head_dim", -16), ("head_dim", 0)])
def test_more_config_sizes_not_positive(capsys, tmp_path, model_copy, key, value):
    """max_position_embeddings 0 was reported as "--seq-len 16 ... expected --seq-len <= 0"; head_dim 0 as a
    transformers ZeroDivisionError."""
    edit_config(model_copy, **{key: value})
    expect_compile_error(capsys, tmp_path, model_copy, [], "config.json", key, "expected a positive integer")


@pytest.mark.parametrize("value", [-1.0, 0, "1e-6"])
def test_rms_norm_eps_not_positive(capsys, tmp_path, model_copy, value):
    """rms_norm_eps -1 made every activation NaN: reported as "pass lower failed on layer 0: ValueError: ...
    activation range must be finite", naming neither config.json nor the key."""
    edit_config(model_copy, rms_norm_eps=value)
    expect_compile_error(capsys, tmp_path, model_copy, [], "config.json", "rms_norm_eps", "expected a positive number")


@pytest.mark.parametrize("theta", [-10000.0, 0])
def test_rope_theta_not_positive(capsys, tmp_path, model_copy, theta):
    """rope_theta <= 0 gave NaN rotary tables: the same "pass lower failed" line."""
    edit_config(model_copy, rope_parameters={"rope_theta": theta, "rope_type": "default"})
    expect_compile_error(capsys, tmp_path, model_copy, [], "config.json", "rope_parameters.rope_theta",
                         "expected a positive number")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_config_json_non_finite_number(capsys, tmp_path, model_copy, constant):
    """rms_norm_eps: Infinity (which Python's json reads) compiled every layer, then failed writing OUT's strict
    config.json with a traceback (ValueError: Out of range float values are not JSON compliant)."""
    text = (model_copy / "config.json").read_text()
    (model_copy / "config.json").write_text(text.replace('"rms_norm_eps": 1e-06', f'"rms_norm_eps": {constant}'))
    expect_compile_error(capsys, tmp_path, model_copy, [], "config.json", constant, "not valid JSON")


@pytest.mark.parametrize("change,needle", [({"num_experts": 0}, "num_experts is 0"),
                                           ({"num_experts_per_tok": 0}, "num_experts_per_tok is 0"),
                                           ({"num_experts_per_tok": 5}, "more than the 4 experts")])
def test_moe_config_counts(capsys, tmp_path, moe_models, change, needle):
    """Qwen2-MoE with 0 experts was reported as missing dense MLP weights; top-k 0 compiled (every expert weighted
    0); top-k above the expert count failed with a traceback (RuntimeError: k not in range for dimension)."""
    import shutil
    model = shutil.copytree(moe_models["qwen2_moe"], tmp_path / "model")
    edit_config(model, **change)
    expect_compile_error(capsys, tmp_path, model, ["--passes", "w8a8d"], "config.json", needle)


def test_no_safetensors(capsys, tmp_path, model_copy):
    (model_copy / "model.safetensors").unlink()
    expect_compile_error(capsys, tmp_path, model_copy, [], "no *.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(capsys, tmp_path, model_copy, damage):
    path = model_copy / "model.safetensors"
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"this is not a safetensors file at all" * 10)
    expect_compile_error(capsys, tmp_path, model_copy, [], "model.safetensors", "corrupt")


@pytest.mark.parametrize("with_calib", [True, False], ids=["calib", "self-sampled"])
def test_nan_weight(capsys, tmp_path, model_copy, calib_file, with_calib):
    name = "model.layers.1.mlp.down_proj.weight"

    def poison(t):
        t[name][0, 0] = float("nan")
    rewrite_weights(model_copy, poison)
    extra = ["--calib", calib_file] if with_calib else []
    expect_compile_error(capsys, tmp_path, model_copy, extra, name, "NaN")


@pytest.mark.parametrize("with_calib", [True, False], ids=["calib", "self-sampled"])
def test_missing_weight(capsys, tmp_path, model_copy, calib_file, with_calib):
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_weights(model_copy, lambda t: t.pop(name))
    extra = ["--calib", calib_file] if with_calib else []
    expect_compile_error(capsys, tmp_path, model_copy, extra, name, "missing")


@pytest.mark.parametrize("how", ["description", "config"])
def test_already_quantized_folder(capsys, tmp_path, model_copy, how):
    if how == "description":  # a compiled OUT given as MODEL_DIR
        (model_copy / "quant_model_description.json").write_text("{}")
    else:
        edit_config(model_copy, quantize="w8a8")
    expect_compile_error(capsys, tmp_path, model_copy, [], "already quantized", "float Hugging Face checkpoint")


# ------------------------------------------------------------------------------------------------ options

def test_dtype_choice_is_usage_error(capsys, tmp_path, tiny_models):
    expect_usage_error(capsys, [tiny_models["llama"], "-o", tmp_path / "out", "--dtype", "float32"],
                       "--dtype", "float32", "bfloat16", "float16")
    assert leftovers(tmp_path) == []


def test_unknown_target(capsys, tmp_path, tiny_models):
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--target", "ascend999"],
                         "ascend999", "ascend910b", "ascend310p")


def test_310p_needs_float16(capsys, tmp_path, tiny_models):
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--target", "ascend310p"],
                         "ascend310p", "bfloat16", "--dtype float16")


@pytest.mark.parametrize("passes, needles", [
    ("w9a9", ["unknown pass", "w9a9", "w8a8"]),
    ("w8a8:foo=1", ["w8a8", "unknown option", "foo"]),
    ("w8a8:", ["key=value"]),
    (",", ["empty pass name", "name[:key=value"]),
    ("w8a8,,w8a8", ["empty pass name"]),
    ("lower", ["lower", "internal", "--passes"]),
    ("w8a8,w8a8", ["w8a8", "twice"]),
])
def test_bad_passes(capsys, tmp_path, tiny_models, passes, needles):
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--passes", passes], *needles)


def test_exclude_invalid_regex(capsys, tmp_path, tiny_models):
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--exclude", "("],
                         "--exclude", "'('", "regular expression")


def test_exclude_splits_fused_group(capsys, tmp_path, tiny_models, monkeypatch):
    import qcompiler.driver as driver

    def no_work(*a, **k):
        raise AssertionError("work started before --exclude was checked")
    monkeypatch.setattr(driver, "_compile_into", no_work)
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--exclude", "q_proj"],
                         "q_proj", "k_proj", "v_proj", "exclude all of them or none")


def test_exclude_matching_no_linear(capsys, tmp_path, tiny_models, monkeypatch):
    """A typo in --exclude (here 'porj') compiled every down_proj quantized without a word."""
    import qcompiler.driver as driver
    monkeypatch.setattr(driver, "_compile_into", lambda *a, **k: pytest.fail("work started"))
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--exclude", r"mlp\.down_porj"],
                         r"--exclude 'mlp\.down_porj'", "matches no Linear", "model.layers.0.mlp.down_proj")


def test_exclude_of_modules_float_anyway_is_accepted(moe_models):
    """lm_head, the embedding and a MoE router are float anyway: naming them excludes nothing, and is no error. A
    dense model's `mlp\\.down_proj` matches no Linear of a Qwen3-MoE whose layers are all sparse (its experts are
    mlp.experts.E.down_proj): an error there."""
    from qcompiler.driver import check_exclude_matches
    config = json.loads((moe_models["qwen3_moe"] / "config.json").read_text())
    check_exclude_matches(["lm_head", "embed_tokens", r"mlp\.gate$", r"experts\.\d+\.down_proj"], config)
    with pytest.raises(QCError, match="matches no Linear"):
        check_exclude_matches([r"mlp\.down_proj"], config)


@pytest.mark.parametrize("command, option", [
    ("compile", "MODEL_DIR"), ("compile", "-o"), ("compile", "--passes"), ("compile", "--target"),
    ("compile", "--calib"), ("compile", "--recipe"), ("compile", "--dump"), ("compile", "--exclude"),
    ("eval", "OUT|MODEL_DIR"), ("eval", "--data"), ("run", "OUT|MODEL_DIR"), ("inspect", "OUT|MODEL_DIR"),
])
def test_empty_option_value(capsys, tmp_path, tiny_models, calib_file, monkeypatch, command, option):
    """An empty value (`--dump ""`, an unset shell variable) was taken as the current folder (`--dump ""` wrote
    layerNNN/ there, `-o ""` said ". already exists") or as the default (`--target ""`, `--passes ""` compiled
    w8a8 for ascend910b): now a usage error naming the option."""
    argv = {"compile": [tiny_models["llama"], "-o", tmp_path / "out", "--calib", calib_file, *SMALL],
            "eval": ["eval", tiny_models["llama"], "--data", calib_file],
            "run": ["run", tiny_models["llama"], "--prompt", "hi"],
            "inspect": ["inspect", tiny_models["llama"]]}[command]
    argv = [str(a) for a in argv]
    if option.isupper() or "|" in option:
        argv[1 if command != "compile" else 0] = ""
    elif option in argv:
        argv[argv.index(option) + 1] = ""
    else:
        argv += [option, ""]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    expect_usage_error(capsys, argv, f"argument {option.replace('-o', '-o/--out')}", "empty value; expected")
    assert os.listdir(cwd) == [] and leftovers(tmp_path) == []


@pytest.mark.parametrize("argv, label", [
    (["compile", "--calib"], "--calib"), (["compile", "--recipe"], "recipe"), (["eval", "--data"], "--data"),
    (["quant", "--calib_file"], "--calib_file"), (["quant", "--config_path"], "--config_path"),
])
def test_input_file_is_a_folder(capsys, tmp_path, tiny_models, argv, label):
    """A folder given where a file is expected was reported as "does not exist"."""
    command, option = argv
    folder = tmp_path / "afolder"
    folder.mkdir()
    model = str(tiny_models["llama"])
    full = {"compile": [model, "-o", tmp_path / "out", option, folder],
            "eval": ["eval", model, option, folder],
            "quant": ["quant", "--model_path", model, "--save_path", tmp_path / "out", option, folder]}[command]
    expect_error(capsys, full, f"{label} {folder} is a folder; expected a file")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("option, value, needle", [
    ("--calib-samples", "0", "--calib-samples must be >= 1"),
    ("--calib-samples", "-3", "--calib-samples must be >= 1"),
    ("--seq-len", "1", "--seq-len must be >= 2"),
    ("--seq-len", "0", "--seq-len must be >= 2"),
    ("--batch-size", "0", "--batch-size must be >= 1"),
])
def test_bad_sizes(capsys, tmp_path, tiny_models, option, value, needle):
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], [option, value], needle)


# ------------------------------------------------------------------------------------------- calibration

def test_calib_missing(capsys, tmp_path, tiny_models):
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--calib", tmp_path / "nope.jsonl"],
                         "--calib", "nope.jsonl", "does not exist")


def test_calib_empty(capsys, tmp_path, tiny_models):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--calib", path],
                         "empty.jsonl", "empty", "inputs_pretokenized")


def test_calib_bad_line(capsys, tmp_path, tiny_models):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine line"}\n\n{"text": broken\n')
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--calib", path],
                         "bad.jsonl", "line 3", "not valid JSON")


def test_calib_wrong_key(capsys, tmp_path, tiny_models):
    path = tmp_path / "key.jsonl"
    path.write_text('{"text": "fine"}\n{"prompt": "x"}\n')
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--calib", path],
                         "line 2", "inputs_pretokenized")


def test_calib_wrong_extension(capsys, tmp_path, tiny_models):
    path = tmp_path / "calib.csv"
    path.write_text("text\nhello world\n")
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--calib", path],
                         "calib.csv", ".csv", ".jsonl", ".txt")


# ------------------------------------------------------------------------------------------------ recipes

def test_recipe_missing(capsys, tmp_path, tiny_models):
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--recipe", tmp_path / "r.yaml"],
                         "recipe", "r.yaml", "does not exist")


def test_recipe_invalid_yaml(capsys, tmp_path, tiny_models):
    path = tmp_path / "r.yaml"
    path.write_text("passes: [w8a8\ntarget: : :\n")
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--recipe", path], "r.yaml", "invalid YAML")


def test_recipe_unknown_key(capsys, tmp_path, tiny_models):
    path = tmp_path / "r.yaml"
    path.write_text("passes: [w8a8]\nalpha: 0.8\n")
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--recipe", path],
                         "unknown recipe keys", "alpha", "passes")


def test_recipe_calib_not_a_path(capsys, tmp_path, tiny_models):
    path = tmp_path / "r.yaml"
    path.write_text("calib: 5\n")
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--recipe", path], "'calib' must be a string", "5")


@pytest.mark.parametrize("body", ["passes: []\n", "passes:\n", "target: ''\n", "calib: ''\n", "dtype:\n"])
def test_recipe_empty_value(capsys, tmp_path, tiny_models, body):
    """`passes: []` compiled the default w8a8, `target: ''` said "unknown --target ''", `calib: ''` sampled from the
    model: an empty recipe value is refused, naming the key."""
    path = tmp_path / "r.yaml"
    path.write_text(body)
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--recipe", path],
                         str(path), f"'{body.split(':')[0]}' is empty")


def test_recipe_bad_pass_option(capsys, tmp_path, tiny_models):
    path = tmp_path / "r.yaml"
    path.write_text("passes:\n  - w8a8: {foo: 1}\n")
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--recipe", path], "w8a8", "unknown option", "foo")


def test_recipe_pass_forms(tmp_path):
    """A recipe's passes: a list mixing {name: {option: value}} and 'name:key=value' strings, or one string."""
    from qcompiler.config import load_recipe
    path = tmp_path / "r.yaml"
    path.write_text("passes:\n  - smooth: {alpha: 0.8}\n  - w8a8\n  - 'kv8:bits=8'\n")
    assert load_recipe(path)["passes"] == [("smooth", {"alpha": 0.8}), ("w8a8", {}), ("kv8", {"bits": "8"})]
    path.write_text("passes: smooth:alpha=0.8,w8a8\n")
    assert load_recipe(path)["passes"] == [("smooth", {"alpha": "0.8"}), ("w8a8", {})]


def test_valid_recipe_compiles(capsys, tmp_path, tiny_models, calib_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"passes:\n  - w8a8: {{}}\ntarget: ascend910b\ndtype: bfloat16\nexclude: 'mlp\\.down_proj'\n"
                      f"calib: {calib_file}\ncalib_samples: 2\nseq_len: 32\n")
    out = tmp_path / "out"
    rc = cli.main([str(tiny_models["llama"]), "--recipe", str(recipe), "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "qcompile_report.json").read_text())
    assert report["passes"][0] == "w8a8" and report["dtype"] == "bfloat16"
    assert report["exclude"] == ["mlp\\.down_proj"]
    assert report["layers"][0]["linears"]["mlp.down_proj"] == "FLOAT"
    assert report["layers"][0]["linears"]["self_attn.q_proj"] == "W8A8"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --------------------------------------------------------------------------------------- output folder

def test_out_exists_needs_force(capsys, tmp_path, tiny_models, calib_file):
    out = make_old_out(tmp_path / "out", "keep me")
    argv = [tiny_models["llama"], "-o", out, "--calib", calib_file, *SMALL]
    expect_error(capsys, argv, "already exists", "--force")
    assert (out / "old.txt").read_text() == "keep me"

    assert cli.main([str(a) for a in argv] + ["--force"]) == 0
    assert not (out / "old.txt").exists()
    assert (out / "quant_model_description.json").is_file()
    assert leftovers(tmp_path) == ["out"]


def _fail_mid_work(monkeypatch, tmp_path, exc):
    """Make saving layer 0's executable program raise `exc` (the temp folder holds partial output by then)."""
    import qcompiler.driver as driver
    calls = []

    def fail(*args, **kwargs):
        tmp = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        assert len(tmp) == 1 and any(tmp[0].rglob("*")), "work should be happening in a temp sibling of OUT"
        calls.append(args)
        raise exc
    if hasattr(driver, "ExecutableWriter"):
        monkeypatch.setattr(driver.ExecutableWriter, "add", fail)
    else:
        monkeypatch.setattr(driver, "_save_executable_layer", fail)
    return calls


def test_failure_mid_work_leaves_nothing(capsys, tmp_path, tiny_models, calib_file, monkeypatch):
    calls = _fail_mid_work(monkeypatch, tmp_path, QCError("simulated failure while saving layer 0"))
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--calib", calib_file], "simulated failure")
    assert len(calls) == 1


def test_internal_error_mid_work_leaves_nothing(tmp_path, tiny_models, calib_file, monkeypatch):
    """A bug (not a QCError) keeps its traceback (exit 1 from the console script) but still cleans up."""
    _fail_mid_work(monkeypatch, tmp_path, RuntimeError("simulated bug"))
    with pytest.raises(RuntimeError, match="simulated bug"):
        cli.main([str(tiny_models["llama"]), "-o", str(tmp_path / "out"), "--calib", str(calib_file), *SMALL])
    assert leftovers(tmp_path) == []


def test_interrupt_mid_work_leaves_nothing(capsys, tmp_path, tiny_models, calib_file, monkeypatch):
    _fail_mid_work(monkeypatch, tmp_path, KeyboardInterrupt())
    rc = cli.main([str(tiny_models["llama"]), "-o", str(tmp_path / "out"), "--calib", str(calib_file), *SMALL])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_failure_mid_work_with_force_keeps_old_out(capsys, tmp_path, tiny_models, calib_file, monkeypatch):
    out = make_old_out(tmp_path / "out")
    _fail_mid_work(monkeypatch, tmp_path, QCError("simulated failure"))
    expect_error(capsys, [tiny_models["llama"], "-o", out, "--calib", calib_file, "--force", *SMALL], "simulated")
    assert (out / "old.txt").read_text() == "old"
    assert leftovers(tmp_path) == ["out"]


# ---------------------------------------------------------------------------------------------- paths

def test_paths_that_are_not_utf8(capsys, tmp_path, tiny_models, calib_file):
    """Linux names are bytes: a model folder, --calib and OUT under a name that is not valid UTF-8. The model was
    reported as a "corrupt or unreadable safetensors file" (safetensors and tokenizers cannot open such a path), a
    compile with such a --calib died with a traceback writing the report after all the work, and an OUT compiled
    there could not be read back by eval / run / inspect."""
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/n\xff\xfe"))
    folder.mkdir()
    model = shutil.copytree(tiny_models["llama"], folder / "model")
    calib = shutil.copy(calib_file, folder / "calib.jsonl")
    out = folder / "out"
    assert cli.main([str(model), "-o", str(out), "--calib", str(calib), *SMALL]) == 0, capsys.readouterr().err
    assert "\\udcff\\udcfe" in (out / "qcompile_report.md").read_text(encoding="utf-8")  # as stderr shows it
    assert cli.main(["eval", str(out), "--data", str(calib), "--seq-len", "32", "--max-windows", "1"]) == 0
    assert cli.main(["run", str(out), "--prompt", "hi", "--raw", "--max-new-tokens", "1"]) == 0
    assert cli.main(["inspect", str(out)]) == 0
    assert cli.main(["eval", str(model), "--data", str(calib), "--seq-len", "32", "--max-windows", "1"]) == 0
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------ other subcommands

def test_eval_missing_data(capsys, tmp_path, tiny_models):
    expect_error(capsys, ["eval", tiny_models["llama"], "--data", tmp_path / "nope.jsonl"],
                 "--data", "nope.jsonl", "does not exist")


@pytest.mark.parametrize("body, needle", [("", "is empty"), ("not json\n", "line 1: not valid JSON")])
def test_eval_bad_data_names_data(capsys, tmp_path, tiny_models, body, needle):
    """An empty or broken --data file of eval was called a "calibration set"."""
    data = tmp_path / "eval.jsonl"
    data.write_text(body)
    expect_error(capsys, ["eval", tiny_models["llama"], "--data", data], f"--data {data}", needle)


def test_eval_on_unknown_folder(capsys, tmp_path, calib_file):
    folder = tmp_path / "random"
    folder.mkdir()
    (folder / "notes.txt").write_text("hi")
    expect_error(capsys, ["eval", folder, "--data", calib_file], "random", "config.json")


def test_eval_on_missing_folder(capsys, tmp_path, calib_file):
    expect_error(capsys, ["eval", tmp_path / "nope", "--data", calib_file], "nope", "not found")


@pytest.mark.parametrize("option, value, needle", [
    ("--seq-len", "1", "--seq-len must be >= 2"),
    ("--batch-size", "0", "--batch-size must be >= 1"),
    ("--max-windows", "0", "--max-windows must be >= 1"),
])
def test_eval_bad_sizes(capsys, tiny_models, calib_file, option, value, needle):
    expect_error(capsys, ["eval", tiny_models["llama"], "--data", calib_file, option, value], needle)


def test_inspect_layer_out_of_range(capsys, tiny_models):
    expect_error(capsys, ["inspect", tiny_models["llama"], "--layer", "99"], "--layer 99", "0..1")


def test_run_max_new_tokens_zero(capsys, tiny_models):
    expect_error(capsys, ["run", tiny_models["llama"], "--prompt", "hi", "--max-new-tokens", "0"],
                 "--max-new-tokens", ">= 1")


def test_run_beyond_max_positions(capsys, tiny_models):
    # tiny models have max_position_embeddings 512: 2 prompt tokens + 600 new ones do not fit
    expect_error(capsys, ["run", tiny_models["llama"], "--prompt", "hi", "--raw", "--max-new-tokens", "600"],
                 "--max-new-tokens 600", "max_position_embeddings (512)")


def test_run_empty_prompt(capsys, tiny_models):
    expect_error(capsys, ["run", tiny_models["llama"], "--prompt", " ", "--raw"], "--prompt", "empty")


# ------------------------------------------------------------------------------------------------- help

def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for needle in ("--passes name[:key=value", "smooth:alpha=0.8,w8a8", "qcompile passes", "smollm2-135m",
                   "qcompile eval"):
        assert needle in out, needle


def test_eval_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for needle in ("--data", "smollm2-135m", "OUT"):
        assert needle in out, needle


@pytest.mark.parametrize("parser", ["_compile_parser", "_eval_parser", "_run_parser", "_inspect_parser"])
def test_every_argument_has_help(parser):
    """`qcompile run --help` listed --prompt and --max-new-tokens (and inspect its --layer, every subcommand its
    OUT|MODEL_DIR) with no word of what they are or their default."""
    bare = [a.option_strings or [a.dest] for a in getattr(cli, parser)()._actions if not a.help]
    assert bare == [], bare


def test_help_moe_paragraph_matches_the_checks(capsys):
    """`qcompile --help` said gptq, fallback and weight-only schemes were refused on MoE models; they are not
    (passes/moe_checks.py refuses STATISTICS_PASSES and static-activation / W8A16 expert schemes)."""
    from qcompiler.passes.moe_checks import STATISTICS_PASSES
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    moe = " ".join(out.split("mixture of experts")[1].split("other commands")[0].split())
    refused = moe.split("Refused:")[1].split(" and ")[0]
    assert sorted(x.strip(" ,") for x in refused.split("/")) == sorted(STATISTICS_PASSES), refused
    for works in ("gptq", "fallback", "w4a16"):
        assert works in moe.split("Refused:")[0], works


# ------------------------------------------------------------------------------------- console script

def test_console_script_one_line(tmp_path):
    exe = shutil.which("qcompile") or pytest.skip("qcompile console script not on PATH")
    env = dict(os.environ, QC_NO_PROGRESS="1")
    env.pop("QC_DEBUG", None)
    proc = subprocess.run([exe, str(tmp_path / "missing-model"), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qcompile: error: ") and "missing-model" in lines[0]
    assert leftovers(tmp_path) == []


def test_dump_is_a_file(capsys, tmp_path, tiny_models):
    (tmp_path / "dumpfile").write_text("x")
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--dump", tmp_path / "dumpfile"],
                         "--dump", "not a folder")


@pytest.mark.parametrize("where", [".", "dump", "a/b"])
def test_dump_in_the_model_folder(capsys, tmp_path, model_copy, calib_file, where):
    """--dump equal to or inside the model folder wrote layerNNN/ into it (an input is never written)."""
    before = sorted(p.name for p in model_copy.iterdir())
    expect_compile_error(capsys, tmp_path, model_copy, ["--calib", calib_file, "--dump", model_copy / where],
                         "--dump", "the model folder", "never written")
    assert sorted(p.name for p in model_copy.iterdir()) == before


def test_out_under_a_file(capsys, tmp_path, tiny_models):
    (tmp_path / "afile").write_text("x")
    expect_error(capsys, [tiny_models["llama"], "-o", tmp_path / "afile" / "sub", *SMALL],
                 "cannot create output folder")


@pytest.mark.parametrize("body,needle", [("exclude: 5\n", "'exclude' must be a regex string"),
                                         ("exclude: [[a]]\n", "'exclude' must be a regex string"),
                                         ("seq_len: 2.5\n", "'seq_len' must be an integer"),
                                         ("calib_samples: abc\n", "'calib_samples' must be an integer")])
def test_recipe_value_types(capsys, tmp_path, tiny_models, body, needle):
    path = tmp_path / "r.yaml"
    path.write_text(body)
    expect_compile_error(capsys, tmp_path, tiny_models["llama"], ["--recipe", path], needle)


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["run", "--help"], ["inspect", "--help"],
                                  ["quant", "--help"], ["--bogus-option"], ["run", "--bogus-option"]])
def test_help_and_a_bad_option_answer_without_importing_torch(argv):
    """Arguments are parsed before the heavy imports: `import torch` alone costs 2-3.5 s of CPU on some hosts, so
    `--help` or a mistyped option answered after it took ~5 s (measured 5.4 -> 0.25 s for `qcompile --help`).
    Run in a fresh interpreter: torch must not be in sys.modules when argparse exits (0 for help, 2 for the error)."""
    import sys
    code = ("import sys\nfrom qcompiler import cli\ntry:\n    cli.main(%r)\nexcept SystemExit as e:\n"
            "    print('torch' in sys.modules, e.code)\n" % (argv,))
    env = {k: v for k, v in os.environ.items() if k != "QC_THREADS"}  # QC_THREADS imports torch
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env).stdout
    torch_loaded, rc = out.split()[-2:]
    assert torch_loaded == "False"
    assert rc == ("0" if "--help" in argv else "2")
