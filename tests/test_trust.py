"""Issue 11, section 2: no command runs code from a model folder or an OUT folder (trust.py).

Every crafted folder carries Python files whose import writes a marker file, and transformers' "run custom
code? [y/N]" prompt is answered "y" (builtins.input patched): a command that reached that code would write
the marker. Each case must be one exit-2 line naming the file, the marker never written, the prompt never
shown. Compiles use the tiny checkpoints of conftest.py with 2 x 32 calibration tokens.
"""
import builtins
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcompiler import cli
from qcompiler.calib_data import sample_windows_from_model
from qcompiler.ir.capture import HFSkeleton
from qcompiler.loading import load_tokenizer, open_checkpoint

from tests.helpers import SMALL, expect_error

CODE_FILES = ("configuration_custom.py", "modeling_custom.py", "tokenization_custom.py", "tokenizer.py")
CONFIG_AUTO_MAP = {"AutoConfig": "configuration_custom.CustomConfig",
                   "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """The file a payload writes; the prompt answered "y" so that reaching it is enough to run code."""
    path = tmp_path / "PAYLOAD_RAN"
    asked = []

    def answer(prompt=""):
        asked.append(prompt)
        return "y"
    monkeypatch.setattr(builtins, "input", answer)
    yield path
    assert not path.exists(), f"code from a crafted folder ran: {path.read_text()}"
    assert not asked, f"transformers asked to run custom code: {asked[0][:200]}"


def _payload(marker, what: str) -> str:
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text({what!r})\n"


def _edit_json(path, **changes):
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


def _crafted(src, dst, marker, config=None, tokenizer_config=None):
    """A copy of checkpoint `src` with payload *.py files and the given JSON changes."""
    shutil.copytree(src, dst)
    for name in CODE_FILES:
        (dst / name).write_text(_payload(marker, name) + "from transformers import LlamaConfig as CustomConfig\n"
                                "from transformers import PreTrainedTokenizerFast as CustomTokenizer\n")
    if config:
        _edit_json(dst / "config.json", **config)
    if tokenizer_config:
        _edit_json(dst / "tokenizer_config.json", **tokenizer_config)
    return dst


def _commands(folder, tmp_path, calib_file):
    """argv of every command on `folder` (compile and quant write into tmp_path)."""
    return {
        "compile": [folder, "-o", tmp_path / "out", "--calib", calib_file, *SMALL],
        "quant": ["quant", "--model_path", folder, "--save_path", tmp_path / "out_quant", "--calib_file", calib_file,
                  "--calib_samples", "2", "--seq_len", "32"],
        "eval": ["eval", folder, "--data", calib_file, "--seq-len", "16", "--max-windows", "1"],
        "run": ["run", folder, "--prompt", "hello", "--max-new-tokens", "2"],
        "inspect": ["inspect", folder, "--layer", "1"],
    }


COMMANDS = ("compile", "quant", "eval", "run", "inspect")


# --------------------------------------------------------------------------------------------- model folders

@pytest.mark.parametrize("command", COMMANDS)
def test_config_auto_map_is_refused_by_every_command(capsys, tiny_models, tmp_path, calib_file, marker, command):
    folder = _crafted(tiny_models["llama"], tmp_path / "m", marker, config={"auto_map": CONFIG_AUTO_MAP})
    expect_error(capsys, _commands(folder, tmp_path, calib_file)[command],
                 f"{folder / 'config.json'}: auto_map", "never runs", "--trust-remote-code")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out_quant").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_tokenizer_auto_map_is_refused_by_every_command(capsys, tiny_models, tmp_path, calib_file, marker, command):
    folder = _crafted(tiny_models["llama"], tmp_path / "m", marker,
                      tokenizer_config={"auto_map": TOKENIZER_AUTO_MAP, "tokenizer_class": "CustomTokenizer"})
    expect_error(capsys, _commands(folder, tmp_path, calib_file)[command],
                 f"{folder / 'tokenizer_config.json'}: auto_map", "never runs", "--trust-remote-code")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("trusted", [False, True], ids=["plain", "trust-flag"])
def test_custom_model_type_is_refused_with_or_without_the_flag(capsys, tiny_models, tmp_path, calib_file, marker,
                                                                command, trusted):
    folder = _crafted(tiny_models["llama"], tmp_path / "m", marker,
                      config={"model_type": "custom_llama", "auto_map": {"AutoConfig": CONFIG_AUTO_MAP["AutoConfig"]}})
    if trusted:
        expect_error(capsys, _commands(folder, tmp_path, calib_file)[command] + ["--trust-remote-code"],
                     f"{folder / 'config.json'}: model_type 'custom_llama' is not a type transformers knows",
                     "'llama'", "never runs")
    else:  # auto_map is named first; without auto_map the model_type alone is refused
        _edit_json(folder / "config.json", auto_map=None)
        expect_error(capsys, _commands(folder, tmp_path, calib_file)[command],
                     f"{folder / 'config.json'}: model_type 'custom_llama'", "custom code")


def test_trusted_auto_map_compiles_with_the_builtin_implementation(capsys, tiny_models, tmp_path, calib_file, marker):
    """--trust-remote-code (also spelled --trust_remote_code) runs nothing: the built-in Llama computes the model,
    OUT gets no *.py and no auto_map, and the OUT then loads without the flag."""
    folder = _crafted(tiny_models["llama"], tmp_path / "m", marker, config={"auto_map": CONFIG_AUTO_MAP},
                      tokenizer_config={"auto_map": TOKENIZER_AUTO_MAP})
    out = tmp_path / "out"
    assert cli.main([str(a) for a in _commands(folder, tmp_path, calib_file)["compile"]] + ["--trust_remote_code"]) == 0
    assert sorted(p.name for p in out.glob("*.py")) == []
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((out / name).read_text()), name
    plain = tmp_path / "plain"
    assert cli.main([str(tiny_models["llama"]), "-o", str(plain), "--calib", str(calib_file), *SMALL]) == 0
    assert load_file(out / "quant_model_weights.safetensors").keys() == load_file(
        plain / "quant_model_weights.safetensors").keys()
    for a, b in zip(*(load_file(p / "quant_model_weights.safetensors").values() for p in (out, plain))):
        assert torch.equal(a, b)  # the same built-in computation as the checkpoint without auto_map
    capsys.readouterr()
    assert cli.main(["inspect", str(out), "--layer", "0"]) == 0


def test_trusted_tokenizer_without_builtin_class_is_one_line(capsys, tiny_models, tmp_path, calib_file, marker):
    """With the flag, a tokenizer whose class exists only in the folder's code cannot be loaded: exit 2."""
    folder = _crafted(tiny_models["llama"], tmp_path / "m", marker,
                      tokenizer_config={"auto_map": TOKENIZER_AUTO_MAP, "tokenizer_class": "CustomTokenizer"})
    expect_error(capsys, ["run", folder, "--prompt", "hi", "--max-new-tokens", "1", "--trust-remote-code", "true"],
                 str(folder), "cannot load the tokenizer")


def test_transformers_calls_pass_trust_remote_code_false(monkeypatch, tiny_models):
    """Defense in depth: even past our checks, transformers is told never to load custom code."""
    import transformers
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "absent")))
            return _original(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    original_config = transformers.AutoModelForCausalLM.from_config.__func__

    def spy_config(klass, *args, **kwargs):
        seen.append((klass.__name__, kwargs.get("trust_remote_code", "absent")))
        return original_config(klass, *args, **kwargs)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", classmethod(spy_config))
    ckpt = open_checkpoint(tiny_models["qwen2"])
    load_tokenizer(ckpt.path)
    HFSkeleton(ckpt)
    names = {name for name, _ in seen}
    assert {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"} <= names, seen
    assert all(flag is False for _, flag in seen), seen


# -------------------------------------------------------------------------------------------------- OUT folders

@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_models, calib_file):
    out = tmp_path_factory.mktemp("trust_out") / "out"
    assert cli.main([str(tiny_models["qwen2"]), "-o", str(out), "--passes", "w8a8d", "--calib", str(calib_file),
                     *SMALL]) == 0
    return out


@pytest.mark.parametrize("command", ["eval", "run", "inspect"])
def test_out_with_tokenizer_auto_map_is_refused(capsys, compiled, tmp_path, calib_file, marker, command):
    out = shutil.copytree(compiled, tmp_path / "crafted_out")
    for name in CODE_FILES:
        (out / name).write_text(_payload(marker, name))
    _edit_json(out / "tokenizer_config.json", auto_map=TOKENIZER_AUTO_MAP, tokenizer_class="CustomTokenizer")
    expect_error(capsys, _commands(out, tmp_path, calib_file)[command],
                 f"{out / 'tokenizer_config.json'}: auto_map", "never runs")


# ------------------------------------------------------------------------------------- self-sampled calibration

def _sample_from_pretrained(folder, n=3, seq_len=12):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, trust_remote_code=False).eval()
    return sample_windows_from_model(model, load_tokenizer(folder), n, seq_len, seed=0)


def _sample_from_skeleton(folder, n=3, seq_len=12):
    skeleton = HFSkeleton(open_checkpoint(folder))
    with skeleton.float_model() as model:
        windows = sample_windows_from_model(model, load_tokenizer(folder), n, seq_len, seed=0)
    return windows, skeleton


def _tied_copy(src, dst):
    """`src` with tied embeddings: lm_head.weight dropped from the safetensors, config says tied."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    _edit_json(dst / "config.json", tie_word_embeddings=True)
    return dst


@pytest.mark.parametrize("arch", ["llama", "qwen2", "tied"])
def test_sampling_from_validated_weights_is_bit_identical_to_from_pretrained(tiny_models, tmp_path, arch):
    """The self-sampled calibration text is what today's from_pretrained model samples, exactly (tolerance 0:
    same weights, same modules, same seed)."""
    folder = _tied_copy(tiny_models["llama"], tmp_path / "tied") if arch == "tied" else tiny_models[arch]
    got, skeleton = _sample_from_skeleton(folder)
    want = _sample_from_pretrained(folder)
    assert torch.equal(got, want)
    # the skeleton is back on the meta device afterwards (capture materializes one layer at a time)
    assert all(p.is_meta for n, p in skeleton.model.named_parameters() if not n.startswith("model.embed_tokens"))


def test_sampling_reads_the_validated_safetensors_never_a_bin(capsys, tiny_models, tmp_path, monkeypatch):
    """Weights under another safetensors name and an all-zero pytorch_model.bin beside them: the compile samples
    from the safetensors (same artifact as the plain folder) and never unpickles anything."""
    import pickle
    folder = shutil.copytree(tiny_models["llama"], tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    zeros = {k: torch.zeros_like(v) for k, v in load_file(folder / "weights.safetensors").items()}
    torch.save(zeros, folder / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    sampled = ["--calib-samples", "2", "--seq-len", "8"]
    assert cli.main([str(folder), "-o", str(tmp_path / "out"), *sampled]) == 0
    assert cli.main([str(tiny_models["llama"]), "-o", str(tmp_path / "plain"), *sampled]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "out" / "qcompile_report.json").read_text())
    assert report["calibration"].startswith("sampled from the float model itself")
    got, want = (load_file(tmp_path / p / "quant_model_weights.safetensors") for p in ("out", "plain"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == []


# -------------------------------------------------------------------------------------------------------- help

@pytest.mark.parametrize("command", ["compile", "eval", "run", "inspect", "quant"])
def test_every_command_has_the_flag_and_states_what_is_trusted(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main(([] if command == "compile" else [command]) + ["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--trust-remote-code" in out and "--trust_remote_code" in out
    assert "never executes code" in out and "nothing is unpickled" in out
