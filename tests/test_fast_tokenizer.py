"""fast_tokenizer.py: tokenizer.json read without transformers builds exactly AutoTokenizer's tokenizer, and
`qcompile run` / `qcompile eval` of an OUT never import transformers.

- Routing: a folder takes the fast path only where AutoTokenizer builds a TokenizersBackend (every tiny
  architecture, both tokenizer_class spellings); qwen2 (Qwen2Tokenizer) and every refusal condition of the
  module docstring fall back to AutoTokenizer (load_tokenizer then returns transformers' object).
- Equality, exact: ids with and without special tokens (texts with special-token strings, unicode, spaces,
  empty), decode with and without skip_special_tokens, chat templates (rendered text and ids: SmolLM2's, one
  with namespace / loop controls / tojson / raise_exception / generation blocks, one in tokenizer_config.json),
  special tokens and ids, len, convert_ids_to_tokens; a tokenizer.json without post-processor; add_bos_token
  in tokenizer_config.json (ignored by both when tokenizer.json exists).
- Imports: `qcompile run` and `qcompile eval` of a compiled OUT, and of a dense float checkpoint (its layers are
  written from config.json by ir/dense_layer.py), leave no `transformers` module in sys.modules (subprocess).
"""
import json
import shutil
import subprocess
import sys

import pytest

from qcompiler import cli
from qcompiler.fast_tokenizer import FastTokenizer, fast_path_refusal, load_fast_tokenizer
from qcompiler.loading import load_tokenizer

from tests.helpers import SMALL, cli_env

TEXTS = ["Quantization maps floating point weights", "  two  spaces\n\nnew lines\t tab ",
         "special <|endoftext|> inside<|endoftext|>", "é ü 中文 🙂 ∑", ""]
#: SmolLM2-135M-Instruct's template (chat_template.jinja of the smollm2-135m alias)
SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                    "{% endif %}")
#: exercises what transformers' environment adds: namespace, loop controls, tojson, raise_exception,
#: generation blocks, trim_blocks / lstrip_blocks, the special tokens as variables
RICH_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{{ bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role') }}{% endif %}
    {%- set ns.n = ns.n + 1 %}
    {%- if message['content'] == 'skip' %}{% continue %}{% endif %}
    {% generation %}[{{ ns.n }}] {{ message['role'] | upper }}: {{ message['content'] | tojson }}{% endgeneration %}
{% endfor %}
{%- if tools is not none %}tools!{% endif %}
{%- if add_generation_prompt %}{{ eos_token }}assistant:{% endif %}"""


def _auto(folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def _variant(src, dest, config=None, files=None, tokenizer_json=None):
    """A copy of tokenizer folder `src` with tokenizer_config.json keys changed (None deletes), extra files
    and a tokenizer.json edit."""
    shutil.copytree(src, dest)
    if config:
        cfg = json.loads((dest / "tokenizer_config.json").read_text())
        for k, v in config.items():
            cfg.pop(k, None) if v is None else cfg.__setitem__(k, v)
        (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name, text in (files or {}).items():
        (dest / name).write_text(text)
    if tokenizer_json:
        doc = json.loads((dest / "tokenizer.json").read_text())
        tokenizer_json(doc)
        (dest / "tokenizer.json").write_text(json.dumps(doc))
    return dest


def assert_same_tokenizer(folder):
    """Every operation qcompiler uses gives the same result from FastTokenizer and AutoTokenizer."""
    fast, ref = load_fast_tokenizer(folder), _auto(folder)
    assert isinstance(fast, FastTokenizer) and type(ref).__name__ == "TokenizersBackend"
    for text in TEXTS:
        for special in (True, False):
            ids = ref(text, add_special_tokens=special)["input_ids"]
            assert fast(text, add_special_tokens=special, verbose=False)["input_ids"] == ids, (text, special)
        ids = ref(text)["input_ids"] + [i for i in (ref.eos_token_id, ref.bos_token_id) if i is not None]
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert fast.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert len(fast) == len(ref)
    for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        assert (getattr(fast, name), getattr(fast, name + "_id")) == (getattr(ref, name), getattr(ref, name + "_id"))
    assert fast.chat_template == ref.chat_template
    if ref.chat_template:
        for conv in ([{"role": "user", "content": t} for t in TEXTS[:3]],
                     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "skip"},
                      {"role": "assistant", "content": "ok"}, {"role": "user", "content": "why?"}]):
            for gen in (True, False):
                text = ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
                assert fast.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False) == text
                ids = ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True, return_dict=False)
                assert fast.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True,
                                                return_dict=False) == list(ids)


def test_routing_matches_transformers(tiny_models, moe_models, tmp_path):
    """Fast path exactly where AutoTokenizer builds TokenizersBackend; elsewhere load_tokenizer is transformers'."""
    folders = {**tiny_models, **moe_models,
               "llama PreTrainedTokenizerFast": _variant(tiny_models["llama"], tmp_path / "ptf",
                                                         {"tokenizer_class": "PreTrainedTokenizerFast"})}
    for name, folder in folders.items():
        built = type(_auto(folder)).__name__
        fast = fast_path_refusal(folder) is None
        assert fast == (built == "TokenizersBackend"), (name, built, fast_path_refusal(folder))
        assert fast == (name != "qwen2"), name  # qwen2: Qwen2Tokenizer (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)
        assert isinstance(load_tokenizer(folder), FastTokenizer) == fast, name


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_tokenizers_equal(tiny_models, arch):
    assert_same_tokenizer(tiny_models[arch])


def test_moe_tokenizers_equal(moe_models):
    for folder in moe_models.values():
        assert_same_tokenizer(folder)


@pytest.mark.parametrize("variant", ["smollm2 template file", "rich template in config", "no post-processor",
                                     "add_bos_token ignored", "eos and pad tokens"])
def test_variants_equal(tiny_models, tmp_path, variant):
    src = tiny_models["llama"]
    folder = {
        "smollm2 template file": lambda: _variant(src, tmp_path / "v", files={"chat_template.jinja": SMOLLM2_TEMPLATE}),
        "rich template in config": lambda: _variant(src, tmp_path / "v", {"chat_template": RICH_TEMPLATE}),
        "no post-processor": lambda: _variant(src, tmp_path / "v", files={"chat_template.jinja": RICH_TEMPLATE},
                                              tokenizer_json=lambda d: d.__setitem__("post_processor", None)),
        "add_bos_token ignored": lambda: _variant(src, tmp_path / "v", {"add_bos_token": True, "add_eos_token": True}),
        "eos and pad tokens": lambda: _variant(src, tmp_path / "v", {"pad_token": "<|endoftext|>", "unk_token": None},
                                               files={"chat_template.jinja": RICH_TEMPLATE}),
    }[variant]()
    assert fast_path_refusal(folder) is None
    assert_same_tokenizer(folder)


def test_smollm2_tokenizer_equal():
    """The real SmolLM2 tokenizer (chat template, 17 added tokens), when the alias is built on this machine."""
    from qcompiler import knobs
    folder = knobs.cache_dir() / "models" / "smollm2-135m"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("smollm2-135m alias not built here")
    assert fast_path_refusal(folder) is None
    assert_same_tokenizer(folder)


def _not_in_added(doc):
    doc["added_tokens"] = []


@pytest.mark.parametrize("change, reason", [
    (dict(config={"tokenizer_class": "LlamaTokenizer"}), "tokenizer_class"),
    (dict(files={"special_tokens_map.json": "{}"}), "special_tokens_map.json"),
    (dict(files={"added_tokens.json": "{}"}), "added_tokens.json"),
    (dict(config={"added_tokens_decoder": {}}), "key 'added_tokens_decoder'"),
    (dict(config={"extra_special_tokens": ["<|endoftext|>"]}), "extra special tokens"),
    (dict(config={"split_special_tokens": True}), "split_special_tokens"),
    (dict(config={"clean_up_tokenization_spaces": True}), "clean_up_tokenization_spaces"),
    (dict(config={"bos_token": {"content": "<|endoftext|>", "__type": "AddedToken"}}), "not a plain string"),
    (dict(config={"chat_template": [{"name": "default", "template": "{{x}}"}]}), "several chat templates"),
])
def test_refusals_fall_back_to_transformers(tiny_models, tmp_path, change, reason):
    folder = _variant(tiny_models["llama"], tmp_path / "v", **change)
    assert reason in fast_path_refusal(folder)
    assert load_fast_tokenizer(folder) is None


def test_special_token_missing_from_added_tokens_falls_back(tiny_models, tmp_path):
    """TokenizersBackend would add '<|endoftext|>' itself (new id): the fast path refuses rather than differ."""
    folder = _variant(tiny_models["llama"], tmp_path / "v", config={"bos_token": "<s>"})
    assert fast_path_refusal(folder) is None and load_fast_tokenizer(folder) is None
    assert not isinstance(load_tokenizer(folder), FastTokenizer)


_NO_TRANSFORMERS = """
import sys
from qcompiler.cli import main
rc = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m == "transformers" or m.startswith("transformers."))
print("RC", rc, "TRANSFORMERS", len(loaded), loaded[:3])
"""


@pytest.fixture(scope="module")
def llama_out(tmp_path_factory, tiny_models, calib_file):
    out = tmp_path_factory.mktemp("fast-tok") / "out"
    assert cli.main([str(tiny_models["llama"]), "-o", str(out), "--passes", "w8a8d", "--calib", str(calib_file),
                     *SMALL]) == 0
    return out


@pytest.mark.parametrize("target", ["out", "float"])
@pytest.mark.parametrize("command", ["run", "eval"])
def test_run_and_eval_never_import_transformers(llama_out, tiny_models, calib_file, command, target):
    folder = str(llama_out if target == "out" else tiny_models["llama"])
    argv = {"run": ["run", folder, "--prompt", "Quantization maps", "--max-new-tokens", "2"],
            "eval": ["eval", folder, "--data", str(calib_file), "--seq-len", "16", "--max-windows", "1"]}
    r = subprocess.run([sys.executable, "-c", _NO_TRANSFORMERS, *argv[command]], capture_output=True, text=True,
                       env=cli_env(), timeout=600)
    assert "RC 0 TRANSFORMERS 0 []" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert_same_tokenizer(folder)  # the folder's tokenizer files take the fast path, same tokens
