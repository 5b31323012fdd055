"""`qcompile quant` (msModelSlim-compatible front): quant_type mapping, help, error cases, one tiny compile."""
import importlib.util
import json
import shutil

import pytest

from qcompiler import cli
from qcompiler.passes import REGISTRY
from qcompiler.quant_front import QUANT_TYPES, pipeline_for

SMALL = ["--calib_samples", "2", "--seq_len", "32"]


def _error(capsys, argv):
    rc = cli.main(["quant", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("qcompile: error:"), err
    return err[0]


def test_mapping_is_the_issue_table():
    assert QUANT_TYPES == {"w8a8": "w8a8", "w8a8_dynamic": "w8a8d", "w8a16": "w8a16", "w4a16": "w4a16",
                           "w4a8": "w4a8d", "w8a8c8": "w8a8,kv8"}
    for quant_type, passes in QUANT_TYPES.items():  # every pass of every mapping is registered
        assert pipeline_for(quant_type) == passes


def test_missing_pass_is_a_one_line_error(monkeypatch, capsys, tiny_models, tmp_path):
    monkeypatch.delitem(REGISTRY, "kv8", raising=False)
    err = _error(capsys, ["--model_path", tiny_models["llama"], "--save_path", tmp_path / "o",
                          "--quant_type", "w8a8c8"])
    assert "needs the kv8 pass" in err and "--quant_type w8a8" in err
    assert not (tmp_path / "o").exists()


def test_help_names_every_quant_type_and_what_trust_remote_code_changes(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["quant", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for quant_type, passes in QUANT_TYPES.items():
        assert f"{quant_type} -> {passes}" in out
    assert "auto_map" in out and "never executes code" in out


@pytest.mark.parametrize("args,needle", [
    (["--quant_type", "w3a8"], "is not one of w8a8, w8a8_dynamic"),
    (["--trust_remote_code", "maybe"], "expected true or false"),
])
def test_bad_flag_values_are_argparse_errors(capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(["quant", "--model_path", "x", "--save_path", "y", *args])
    assert e.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize("args,needles", [
    (["--w_bit", "4"], ("--w_bit 4 contradicts --quant_type w8a8", "--w_bit 8")),
    (["--quant_type", "w4a16", "--a_bit", "8"], ("--a_bit 8 contradicts --quant_type w4a16",)),
    (["--device", "gpu"], ("--device 'gpu' is not supported", "cpu or npu")),
    (["--calib_file", "/nonexistent.jsonl"], ("--calib_file /nonexistent.jsonl does not exist",)),
])
def test_error_cases(capsys, tiny_models, tmp_path, args, needles):
    err = _error(capsys, ["--model_path", tiny_models["llama"], "--save_path", tmp_path / "o", *args])
    assert all(n in err for n in needles), err


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed")
def test_npu_without_torch_npu(capsys, tiny_models, tmp_path):
    err = _error(capsys, ["--model_path", tiny_models["llama"], "--save_path", tmp_path / "o", "--device", "npu:0"])
    assert "needs torch_npu" in err and "--device cpu" in err


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


def test_end_to_end_w8a8_dynamic_into_empty_folder_with_trusted_auto_map(capsys, tiny_models, calib_file, tmp_path):
    """Same artifact as `qcompile DIR --passes w8a8d`: W8A8_DYNAMIC description; a trusted auto_map
    checkpoint of a supported architecture compiles with the built-in implementation."""
    model = _with_config(tiny_models["llama"], tmp_path / "m", auto_map={"AutoConfig": "cfg.CustomConfig"})
    out = tmp_path / "out"
    out.mkdir()  # msModelSlim writes into an existing empty folder
    rc = cli.main(["quant", "--model_path", str(model), "--save_path", str(out), "--quant_type", "W8A8_DYNAMIC",
                   "--device", "cpu", "--trust_remote_code", "True", "--model_type", "SmolLM2-135M",
                   "--w_bit", "8", "--a_bit", "8", "--calib_file", str(calib_file), *SMALL])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "--passes w8a8d" in captured.out
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["model_quant_type"] == "W8A8_DYNAMIC"
    assert desc["model.layers.0.mlp.down_proj.weight"] == "W8A8_DYNAMIC"
    report = json.loads((out / "qcompile_report.json").read_text())
    assert report["model_quant_type"] == "W8A8_DYNAMIC"
