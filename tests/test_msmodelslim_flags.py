"""`qcompile quant` with msModelSlim's traditional script flags (quant_llama.py / quant_qwen.py).

Every command of the LLaMA quantization case (../shared/seeds/msmodelslim-llama-case.md, copied verbatim below)
runs with `python3 quant_llama.py` replaced by `qcompile quant`, its placeholder paths substituted (the tiny
Llama model, an output folder, the test calibration file for every ../common/*.jsonl) and 2 x 32 calibration
tokens added (`--calib_samples 2 --seq_len 32`, qcompile's own flags, to keep the test fast). Each produces the
quant types the document promises, or fails with one line naming the unsupported flags.
"""
import json
import re
import shlex

import pytest

from qcompiler import cli
from qcompiler.errors import QCError
from qcompiler.msmodelslim_flags import plan_from_settings

SMALL = ["--calib_samples", "2", "--seq_len", "32"]

LLAMA_CASE = [  # (anchor in the document, command, expected: description types / or error needles)
    ("llama-65b-w8a16",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {W8A16量化权重路径} --calib_file "
     "../common/teacher_qualification.jsonl --w_bit 8 --a_bit 16 --act_method 3 --trust_remote_code True",
     {"model_quant_type": "W8A16", "passes": "w8a16:group=0"}),
    ("llama-33b-稀疏量化配置",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {W8A8S量化权重路径} --calib_file "
     "../common/boolq.jsonl --act_method 2 --do_smooth True --use_sigma True --is_lowbit True --co_sparse True "
     "--w_bit 4 --trust_remote_code True",
     {"model_quant_type": "W8A8S", "passes": "smooth,sparse:ratio=0,w8a8s:act_observer=histogram:sigma=3.0",
      "float": "mlp.down_proj"}),
    ("llama2-7b13b-w8a8量化 (7b, m1)",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {W8A8量化权重路径} --calib_file "
     "../common/boolq.jsonl --device_type cpu --disable_level L0 --anti_method m1 --act_method 1 "
     "--trust_remote_code True",
     {"model_quant_type": "W8A8", "passes": "smooth:alpha=0.5:subgraphs=norm-linear,w8a8", "float": "mlp.down_proj"}),
    ("llama2-7b13b-w8a8量化 (13b, m2)",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {W8A8量化权重路径} --calib_file "
     "../common/boolq.jsonl  --device_type cpu --disable_level L0 --anti_method m2 --act_method 1 "
     "--trust_remote_code True",
     {"model_quant_type": "W8A8", "passes": "smooth:shift=true:subgraphs=norm-linear,w8a8"}),
    ("llama2-7b13b-稀疏量化配置",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {W4A8S量化权重路径} --calib_file "
     "../common/teacher_qualification.jsonl --w_bit 4 --a_bit 8 --fraction 0.011 --co_sparse True "
     "--trust_remote_code True",
     {"model_quant_type": "W8A8S", "passes": "sparse:ratio=0,w8a8s:fraction=0.011"}),
    ("llama2-70b-npu多卡w8a8量化",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {W8A8量化权重路径} --calib_file "
     "../common/boolq.jsonl  --device_type npu --disable_level L5 --trust_remote_code True",
     {"model_quant_type": "W8A8", "passes": "w8a8,fallback:level=5"}),
    ("llama2-70b-w8a16量化 (the document's `--calib_file= PATH` typo)",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {W8A16量化权重路径} --calib_file= "
     "../common/teacher_qualification.jsonl --w_bit 8 --a_bit 16 --act_method 3 --trust_remote_code True",
     ("unrecognized arguments", "--calib_file= has an empty value")),
    ("llama3-70b-w8a16量化",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {W8A16量化权重路径} --calib_file "
     "../common/boolq.jsonl  --device_type npu --a_bit 16 --w_sym False --mm_tensor False --anti_method m3 "
     "--act_method 3 --model_type llama3 --trust_remote_code True",
     ("--w_sym false", "asymmetric weights")),
    ("llama31-8b-w8a8量化",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {W8A8量化权重路径} --calib_file "
     "../common/boolq.jsonl  --device_type npu --disable_level L0 --anti_method m1 --act_method 1 "
     "--trust_remote_code True",
     {"model_quant_type": "W8A8", "passes": "smooth:alpha=0.5:subgraphs=norm-linear,w8a8"}),
    ("llama31-70b-w8a8量化",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {W8A8量化权重路径} --calib_file "
     "../common/boolq.jsonl  --device_type npu --disable_level L5 --anti_method m3 --act_method 3 "
     "--trust_remote_code True",
     {"model_quant_type": "W8A8", "passes": "awq,w8a8:act_observer=histogram,fallback:level=5"}),
    ("llama31-70b-w8a8量化搭配-kv-cache-int8量化",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {W8A8量化权重路径} --calib_file "
     "../common/boolq.jsonl  --device_type npu --disable_level L5 --anti_method m3 --act_method 3 "
     "--use_kvcache_quant True --trust_remote_code True",
     {"model_quant_type": "W8A8", "kv_cache_type": "C8", "passes": "awq,w8a8:act_observer=histogram,kv8,"
                                                                    "fallback:level=5"}),
    ("llama31-70b-w8a8量化搭配attention量化",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {W8A8量化权重路径} --calib_file "
     "../common/boolq.jsonl --w_bit 8 --a_bit 8 --device_type npu --disable_level L5 --anti_method m4 "
     "--act_method 3 --use_fa_quant True --trust_remote_code True",
     {"model_quant_type": "W8A8", "fa_quant_type": "FAQuant", "passes": "smooth,w8a8:act_observer=histogram,fa3,"
                                                                        "fallback:level=5"}),
    ("llama31-70b-w8a8-pdmix量化",
     "python3 quant_llama.py --model_path {浮点权重路径} \\ --save_directory {W8A8-pdmix量化权重路径} \\ --calib_file "
     "../common/llama_calib_prompt.jsonl  \\ --anti_calib_file ../common/llama_anti_prompt.jsonl \\ --device_type npu "
     "\\ --anti_method m6 \\ --act_method 3 \\ --use_kvcache_quant True \\ --disable_threshold 1 \\ --pdmix True \\ "
     "--trust_remote_code True",
     ("--anti_calib_file", "--disable_threshold")),
    ("llama31-8b-instruct-w4a8_dynamic量化",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {量化权重路径} --w_bit 4 --device_type npu "
     "--anti_method m3 --act_method 1 --model_type llama3.1_instruct --is_lowbit True --mm_tensor False "
     "--open_outlier False --group_size 32 --is_dynamic True --anti_calib_file ../common/llama_anti_prompt.json "
     "--trust_remote_code True",
     ("--anti_calib_file",)),
    ("llama31-70b-instruct-w4a8_dynamic量化",
     "python3 quant_llama.py --model_path {浮点权重路径} --save_directory {量化权重路径} --w_bit 4 --device_type npu "
     "--anti_method m3 --act_method 1 --model_type llama3.1_instruct --is_lowbit True --mm_tensor False "
     "--open_outlier False --group_size 32 --is_dynamic True --anti_calib_file ../common/llama_anti_prompt.json "
     "--trust_remote_code True",
     ("--anti_calib_file",)),
]


def _argv(command: str, model, out, calib) -> list[str]:
    """The document's command with the program name replaced and the placeholder paths substituted."""
    words = [w for w in shlex.split(command.replace("\\ ", " ")) if w]
    assert words[:2] == ["python3", "quant_llama.py"], words
    subst = []
    for w in words[2:]:
        w = w.replace("{浮点权重路径}", str(model))
        w = re.sub(r"\{[^}]*路径\}", str(out), w)
        w = re.sub(r"\.\./common/\w+\.jsonl?", str(calib), w)
        subst.append(w)
    return ["quant", *subst, *SMALL]


@pytest.mark.parametrize("anchor,command,expected", LLAMA_CASE, ids=[c[0] for c in LLAMA_CASE])
def test_llama_case_command(capsys, tiny_models, calib_file, tmp_path, anchor, command, expected):
    out = tmp_path / "out"
    rc = cli.main(_argv(command, tiny_models["llama"], out, calib_file))
    captured = capsys.readouterr()
    if isinstance(expected, tuple):  # one error line naming every unsupported flag
        lines = captured.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("qcompile: error:"), captured.err
        assert all(n in lines[0] for n in expected), lines[0]
        assert not out.exists()
        return
    assert rc == 0, captured.err
    assert f"--passes {expected['passes']} " in captured.out + " "
    desc = json.loads((out / "quant_model_description.json").read_text())
    for key in ("model_quant_type", "kv_cache_type", "fa_quant_type"):
        if key in expected:
            assert desc[key] == expected[key]
    if "float" in expected:
        assert all(desc[f"model.layers.{i}.{expected['float']}.weight"] == "FLOAT" for i in range(2))
    assert desc["model.layers.0.self_attn.q_proj.weight"] in (expected["model_quant_type"], "FLOAT")


def test_command_with_only_the_doc_calibration_absent_samples_from_the_model(capsys, tiny_models, tmp_path):
    """No --calib_file (the scripts' bundled teacher_qualification.jsonl is not shipped): calibration text is
    sampled from the float model, as `qcompile` does without --calib."""
    out = tmp_path / "out"
    rc = cli.main(["quant", "--model_path", str(tiny_models["llama"]), "--save_directory", str(out), "--w_bit", "8",
                   "--a_bit", "16", *SMALL])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "qcompile_report.json").read_text())
    assert report["calibration"].startswith("sampled from the float model")


def _plan(given, config=None, model_type="llama", **kw):
    config = config or {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                        "num_attention_heads": 4, "num_key_value_heads": 2}
    return plan_from_settings(given, config, model_type, lambda k: f"--{k}", "qcompile quant", **kw)


@pytest.mark.parametrize("given,passes,exclude", [
    ({}, "w8a8", "mlp\\.down_proj"),                                          # defaults: W8A8, down_proj float
    ({"a_bit": "16"}, "w8a16:group=0", None),                                 # llama script: no default at a_bit 16
    ({"is_dynamic": "True"}, "w8a8d", "mlp\\.down_proj"),
    ({"pdmix": "True", "act_method": "2"}, "w8a8mix:act_observer=histogram", "mlp\\.down_proj"),
    ({"w_bit": "4", "a_bit": "16"}, "w4a16:group=0", None),
    ({"w_bit": "4", "a_bit": "16", "is_lowbit": "True", "open_outlier": "False", "group_size": "32"},
     "w4a16:group=32", None),
    ({"anti_method": "m6"}, "smooth:subgraphs=norm-linear+up-down,w8a8", "mlp\\.down_proj"),
    ({"tp_size": "2", "is_dynamic": "True"}, "w8a8d,simulate_tp:size=2", "mlp\\.down_proj"),
    ({"w_method": "GPTQ", "a_bit": "16"}, "gptq,w8a16:group=0", None),
    ({"disable_names": ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "lm_head"]}, "w8a8",
     "model\\.layers\\.1\\.mlp\\.gate_proj"),
    ({"model_type": "llama3"}, "w8a8", "self_attn\\.q_proj"),                # llama3: first 5 layers float
    # the LLaMA case's W4A8_DYNAMIC recipe (its --anti_calib_file left out): issue 12's two-stage per-group form
    ({"w_bit": "4", "anti_method": "m3", "is_lowbit": "True", "open_outlier": "False", "group_size": "32",
      "is_dynamic": "True"}, "awq,w4a8d:group=32", "mlp\\.down_proj"),
    ({"w_bit": "4", "is_dynamic": "True", "is_lowbit": "True", "open_outlier": "False"}, "w4a8d:group=64",
     "mlp\\.down_proj"),                                                      # the scripts' group_size 64
])
def test_flag_mapping(given, passes, exclude):
    plan = _plan(given)
    assert plan.passes_text() == passes
    if exclude is None:
        assert plan.exclude == []
    else:
        assert len(plan.exclude) == 1 and exclude in plan.exclude[0]
        assert re.search(plan.exclude[0], "model.layers.1.mlp.down_proj" if "down" in exclude else
                         "model.layers.1.mlp.gate_proj" if "gate" in exclude else "model.layers.0.self_attn.q_proj")


def test_qwen_script_defaults_disable_down_proj_at_a_bit_16():
    """quant_qwen.py's create_quant_config also keeps every down_proj float for W8A16 (a_bit in [8, 16])."""
    assert _plan({"a_bit": "16"}, model_type="qwen2").exclude
    with pytest.raises(QCError, match="quant_qwen.py's model types"):
        _plan({"model_type": "llama3"}, model_type="qwen2")


@pytest.mark.parametrize("argv,needles", [
    (["--anti_method", "m5"], ("--anti_method m5", "CBQ")),
    (["--anti_calib_file", "x.jsonl"], ("--anti_calib_file",)),
    (["--disable_threshold", "1"], ("--disable_threshold", "closed binary")),
    (["--fa_amp", "2", "--use_fa_quant", "True"], ("--fa_amp",)),
    (["--use_reduce_quant", "True"], ("--use_reduce_quant",)),
    (["--mindie_format"], ("--mindie_format",)),
    (["--layer_count", "1"], ("--layer_count",)),
    (["--disable_last_linear", "False"], ("--disable_last_linear false", "lm_head")),
    (["--input_ids_name", "ids"], ("--input_ids_name",)),
    (["--tokenizer_args", '{"use_fast": false}'], ("--tokenizer_args",)),
    (["--w_method", "HQQ"], ("--w_method HQQ",)),
    (["--a_bit", "16", "--w_sym", "False"], ("--w_sym false", "asymmetric")),
    (["--is_lowbit", "True"], ("--is_lowbit true with W8A8", "precision tuning")),
    (["--w_bit", "4"], ("W4A8_DYNAMIC", "per-group")),
    (["--w_sym", "False"], ("w_sym true when a_bit is 8",)),
    (["--fraction", "0.5"], ("--fraction 0.5", "[0.01, 0.1]")),
    (["--sigma_factor", "5"], ("--sigma_factor 5.0", "[3.0, 4.0]", "check_lowbit_config")),
    # in the example READMEs' [1.0, 3.0] but refused by msModelSlim's own check: the message says which is right
    (["--sigma_factor", "2"], ("--sigma_factor 2.0", "[3.0, 4.0]", "check_lowbit_config", "[1.0, 3.0]",
                               "example/Llama/README.md")),
    (["--use_kvcache_quant", "True", "--use_fa_quant", "True"], ("same time",)),
    (["--act_method", "4"], ("--act_method 4",)),
    (["--disable_level", "5"], ("--disable_level '5'", "L0")),
    (["--tp_size", "3"], ("--tp_size 3",)),
    (["--pdmix", "True", "--a_bit", "16"], ("--pdmix true needs the W8A8 type",)),
    (["--model_type", "qwen2"], ("quant_llama.py's model types",)),
    (["--disable_names", "model.layers.9.mlp.down_proj"], ("not a decoder Linear",)),
    (["--co_sparse", "maybe"], ("--co_sparse 'maybe'", "true or false")),
    (["--w_bit", "eight"], ("--w_bit 'eight'", "an integer")),
])
def test_unsupported_or_bad_flag_is_one_line(capsys, tiny_models, tmp_path, argv, needles):
    rc = cli.main(["quant", "--model_path", str(tiny_models["llama"]), "--save_directory", str(tmp_path / "o"),
                   *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("qcompile: error:"), lines
    assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "o").exists()


def test_calib_texts_and_part_file_size(capsys, tiny_models, tmp_path):
    """--calib_texts calibrates on the given strings; --part_file_size 0 writes one weight file."""
    from tests.helpers import TEXT
    out = tmp_path / "o"
    rc = cli.main(["quant", "--model_path", str(tiny_models["llama"]), "--save_directory", str(out), "--a_bit", "16",
                   "--calib_texts", TEXT[:1500], TEXT[1500:3000], "--part_file_size", "0", *SMALL])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "qcompile_report.json").read_text())
    assert report["calibration"].startswith("2 calibration texts given inline")
    assert [p.name for p in out.glob("*.safetensors")] == ["quant_model_weights.safetensors"]
