"""The checkpoint against its config.json, before any work (issue 11, section 3).

Every tensor's name, dtype and shape is checked by open_checkpoint (checkpoint_checks.py), so compile,
eval, run and inspect all refuse a bad checkpoint with one line (exit 2); a tied embedding stored as
lm_head.weight is accepted; a config.json without a dtype takes the safetensors headers'; tokenizers whose
ids have no embedding row are refused in compile, eval and run. Tiny checkpoints from conftest.py.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from qcompiler import cli
from qcompiler.checkpoint_checks import check_token_ids
from qcompiler.errors import QCError
from tests.helpers import MODEL_COMMANDS, SMALL, edit_config, expect_error, expect_refused, leftovers, make_tiny_model, model_command_argv, rewrite_weights

COMMANDS = MODEL_COMMANDS  # compile, eval, run, inspect


# ------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("command", COMMANDS)
def test_tensor_shape_disagrees_with_config(capsys, monkeypatch, tmp_path, model_copy, calib_file, command):
    """A q_proj of [64, 32] where config.json implies [64, 64] gave a traceback after work began."""
    name = "model.layers.1.self_attn.q_proj.weight"
    rewrite_weights(model_copy, lambda t: t.update({name: t[name][:, :32].clone()}))
    expect_refused(capsys, monkeypatch, tmp_path, command, model_copy, calib_file,
                   name, "[64, 32]", "config.json implies [64, 64]", "model.safetensors")


@pytest.mark.parametrize("name, cut", [("model.embed_tokens.weight", (slice(0, 299),)),
                                       ("model.norm.weight", (slice(0, 63),)),
                                       ("model.layers.0.mlp.down_proj.weight", (slice(None), slice(0, 100)))])
def test_other_shapes_checked(capsys, monkeypatch, tmp_path, model_copy, calib_file, name, cut):
    rewrite_weights(model_copy, lambda t: t.update({name: t[name][cut].clone()}))
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file, name, "config.json implies")


def test_unexpected_tensor(capsys, monkeypatch, tmp_path, model_copy, calib_file):
    name = "model.layers.0.self_attn.extra_gate"
    rewrite_weights(model_copy, lambda t: t.update({name: torch.ones(4, dtype=torch.bfloat16)}))
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file,
                   name, "not part of a LlamaForCausalLM")


def test_rotary_inv_freq_in_checkpoint_is_ignored(capsys, model_copy):
    """Older checkpoints store the rotary buffers; transformers recomputes them, so do we."""
    rewrite_weights(model_copy, lambda t: t.update({"model.rotary_emb.inv_freq": torch.ones(8)}))
    assert cli.main(["inspect", str(model_copy)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("content", ["[1, 2]", '"LlamaForCausalLM"', "null"])
def test_config_json_not_an_object(capsys, monkeypatch, tmp_path, model_copy, calib_file, command, content):
    """A config.json holding valid JSON that is not an object gave a traceback (AttributeError: 'list' object has
    no attribute 'get') in every command."""
    (model_copy / "config.json").write_text(content)
    expect_refused(capsys, monkeypatch, tmp_path, command, model_copy, calib_file,
                   "config.json", "expected a JSON object")


def test_compiled_out_config_json_not_an_object(capsys, model_copy, calib_file, tmp_path):
    """An OUT whose config.json is a list: the tokenizer was blamed (TypeError from transformers)."""
    out = tmp_path / "out"
    assert cli.main([str(model_copy), "-o", str(out), "--calib", str(calib_file), *SMALL]) == 0
    (out / "config.json").write_text("[]")
    expect_error(capsys, ["inspect", out], str(out / "config.json"), "expected a JSON object")


def test_architectures_not_a_list(capsys, monkeypatch, tmp_path, model_copy, calib_file):
    """architectures given as a string was read as its first character: "architecture 'L' is not supported"."""
    edit_config(model_copy, architectures="LlamaForCausalLM")
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file,
                   "config.json", "architectures is 'LlamaForCausalLM'", "expected a list")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_index_shard_outside_the_model_folder(capsys, monkeypatch, tmp_path, model_copy, calib_file, shard):
    """model.safetensors.index.json naming a file outside the folder ('../x', an absolute path) was read: a crafted
    folder pulled another checkpoint's weights into the artifact."""
    from safetensors import safe_open
    outside = tmp_path / "outside.safetensors"
    (model_copy / "model.safetensors").rename(outside)
    shard = str(outside) if shard == "ABSOLUTE" else shard
    with safe_open(str(outside), "pt") as f:
        names = list(f.keys())
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file,
                   "index.json", repr(shard), "inside the model folder")


@pytest.mark.parametrize("body", ["[]", '{"weight_map": ["a"]}', '{"weight_map": {"x": 5}}'])
def test_index_not_a_weight_map(capsys, monkeypatch, tmp_path, model_copy, calib_file, body):
    """An index that is a list gave a traceback (TypeError)."""
    (model_copy / "model.safetensors.index.json").write_text(body)
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file, "index.json")



@pytest.mark.parametrize("command", COMMANDS)
def test_model_folder_without_tokenizer_files(capsys, monkeypatch, tmp_path, model_copy, calib_file, command):
    """A folder copied without its tokenizer said "cannot load the tokenizer (ValueError: Couldn't instantiate the
    backend tokenizer from one of: )", the list of what was missing cut off."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / name).unlink()
    expect_refused(capsys, monkeypatch, tmp_path, command, model_copy, calib_file,
                   str(model_copy), "no tokenizer files", "tokenizer.json", "copy them")


def test_transformers_config_error_keeps_its_reason(capsys, monkeypatch, tmp_path, model_copy, calib_file):
    """transformers' config validation puts the reason on its second line; only the first was shown ("Class
    validation error for validator 'validate_architecture':")."""
    edit_config(model_copy, num_attention_heads=3)
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file, "config.json",
                   "hidden size (64) is not a multiple of the number of attention heads (3)")


def _make_special(path, kind: str) -> None:
    """Replace `path` by a FIFO or a link to a character device."""
    import os
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


@pytest.mark.parametrize("name,kind", [("model.safetensors", "fifo"), ("tokenizer_config.json", "fifo"),
                                       ("tokenizer.json", "fifo"), ("model.safetensors", "device")])
def test_model_folder_file_that_is_a_fifo_or_device(tmp_path, model_copy, calib_file, name, kind):
    """A FIFO named model.safetensors / tokenizer*.json made the compile block in open() forever (its SIGTERM handler
    never ran); a link to /dev/zero was read as a corrupt header. In a subprocess with a timeout: on the code before
    the fix the FIFO cases time out."""
    from tests.helpers import run_cli
    _make_special(model_copy / name, kind)
    proc = run_cli([model_copy, "-o", tmp_path / "out", "--calib", calib_file, *SMALL], timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(model_copy / name) in last and "not a regular file" in last, last
    assert leftovers(tmp_path) == []


def test_out_folder_file_that_is_a_fifo(tmp_path, model_copy, calib_file):
    """`qcompile eval OUT` with a FIFO as OUT/tokenizer.json blocked forever too."""
    from tests.helpers import run_cli
    out = tmp_path / "out"
    assert cli.main([str(model_copy), "-o", str(out), "--calib", str(calib_file), *SMALL]) == 0
    _make_special(out / "tokenizer.json", "fifo")
    proc = run_cli(["eval", out, "--data", calib_file, "--seq-len", "32", "--max-windows", "1"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "tokenizer.json: not a regular file" in proc.stderr.strip().splitlines()[-1]

def _split_into_two_shards(folder, index: bool, edit=None):
    """folder/model.safetensors split into two shards (the second from the tensor 'model.layers.1' on), with an
    index unless `index` is False; `edit(weight_map, shard_tensors)` may corrupt them first."""
    from safetensors.torch import save_file
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    shards = {"a.safetensors": {n: t for n, t in tensors.items() if not n.startswith("model.layers.1.")},
              "b.safetensors": {n: t for n, t in tensors.items() if n.startswith("model.layers.1.")}}
    wmap = {n: f for f, part in shards.items() for n in part}
    if edit:
        edit(wmap, shards)
    for f, part in shards.items():
        save_file(part, folder / f, metadata={"format": "pt"})
    if index:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("lie", ["other shard", "no shard"])
def test_index_names_a_tensor_its_shard_lacks(capsys, monkeypatch, tmp_path, model_copy, calib_file, command, lie):
    """An index naming a tensor under a shard that does not store it (the other shard, or a tensor no shard has)
    gave a traceback (SafetensorError: File does not contain tensor ...)."""
    name = "model.layers.1.mlp.up_proj.weight" if lie == "other shard" else "model.layers.0.extra.weight"
    _split_into_two_shards(model_copy, True, lambda wmap, shards: wmap.update({name: "a.safetensors"}))
    expect_refused(capsys, monkeypatch, tmp_path, command, model_copy, calib_file,
                   "model.safetensors.index.json", repr(name), "a.safetensors")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("index", [True, False], ids=["index", "no index"])
def test_tensor_stored_in_two_shards(capsys, monkeypatch, tmp_path, model_copy, calib_file, command, index):
    """A tensor stored in two shards with different values was compiled from whichever copy was read (without an
    index: the last file in name order; with one: the index's, while vLLM-Ascend iterates both)."""
    name = "model.layers.0.mlp.down_proj.weight"
    _split_into_two_shards(model_copy, index,
                           lambda wmap, shards: shards["b.safetensors"].update({name: shards["a.safetensors"][name] * 2}))
    expect_refused(capsys, monkeypatch, tmp_path, command, model_copy, calib_file,
                   repr(name), "a.safetensors", "b.safetensors")


def test_two_shards_with_and_without_index_compile(tmp_path, model_copy, calib_file):
    """The split above is a valid checkpoint when nothing lies: both forms compile."""
    _split_into_two_shards(model_copy, True)
    assert cli.main([str(model_copy), "-o", str(tmp_path / "out"), "--calib", str(calib_file), *SMALL]) == 0
    (model_copy / "model.safetensors.index.json").unlink()
    assert cli.main(["inspect", str(model_copy)]) == 0


def test_model_type_must_build_the_architecture(capsys, monkeypatch, tmp_path, model_copy, calib_file):
    edit_config(model_copy, model_type="qwen2")
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file,
                   "architectures says LlamaForCausalLM", "'qwen2'", "Qwen2ForCausalLM")


# ----------------------------------------------------------------------------------- quantized weights

def _fp8(t):
    for k in list(t):
        if k.endswith("_proj.weight"):
            t[k] = t[k].to(torch.float8_e4m3fn)


def _int8_with_scale(t):
    for k in list(t):
        if k.endswith("_proj.weight"):
            t[k.replace(".weight", ".weight_scale")] = t[k].float().abs().amax(1, keepdim=True) / 127
            t[k] = torch.zeros_like(t[k], dtype=torch.int8)


def _gptq(t):
    for k in list(t):
        if k.endswith("_proj.weight"):
            n, kk = t.pop(k).shape
            base = k[: -len(".weight")]
            t[base + ".qweight"] = torch.zeros(kk // 8, n, dtype=torch.int32)
            t[base + ".qzeros"] = torch.zeros(kk // 128 or 1, n // 8, dtype=torch.int32)
            t[base + ".scales"] = torch.ones(kk // 128 or 1, n, dtype=torch.float16)
            t[base + ".g_idx"] = torch.zeros(kk, dtype=torch.int32)


def _packed_int4(t):
    for k in list(t):
        if k.endswith("_proj.weight"):
            n, kk = t[k].shape
            t[k] = torch.zeros(n, kk // 2, dtype=torch.uint8)


def _float_scales_beside_float_weights(t):  # e.g. a compressed-tensors / fp8 export restored to float
    t["model.layers.0.mlp.up_proj.input_scale"] = torch.ones(1)


@pytest.mark.parametrize("layout, needle", [(_fp8, "float8_e4m3fn"), (_int8_with_scale, "int8"),
                                            (_gptq, "qweight"), (_packed_int4, "uint8"),
                                            (_float_scales_beside_float_weights, "input_scale")],
                         ids=["fp8", "int8+weight_scale", "gptq", "packed-int4", "scale-tensor"])
@pytest.mark.parametrize("command", ["compile", "eval"])
def test_already_quantized_weights(capsys, monkeypatch, tmp_path, model_copy, calib_file, layout, needle, command):
    """float8 projection weights without a quantization_config crashed with NotImplementedError."""
    rewrite_weights(model_copy, layout)
    expect_refused(capsys, monkeypatch, tmp_path, command, model_copy, calib_file,
                   needle, "already quantized", "float checkpoint")


def test_compression_config_is_quantized(capsys, monkeypatch, tmp_path, model_copy, calib_file):
    edit_config(model_copy, compression_config={"quant_method": "compressed-tensors"})
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file,
                   "already quantized", "compression_config")


# --------------------------------------------------------------------------------- tied embedding

def _tied(folder, keep):
    """Make `folder` a tied checkpoint storing the shared matrix only under `keep`."""
    edit_config(folder, tie_word_embeddings=True)

    def edit(t):
        shared = t.pop("model.embed_tokens.weight")
        t.pop("lm_head.weight")
        t[keep] = shared
    rewrite_weights(folder, edit)


def test_tied_embedding_stored_as_lm_head(capsys, tmp_path, tiny_models, calib_file):
    """transformers loads a tied model whose only copy is lm_head.weight; it was rejected as
    'embed_tokens missing'. It compiles, and the float model computes what the embed_tokens form does."""
    import shutil
    as_head = shutil.copytree(tiny_models["llama"], tmp_path / "as_head")
    as_embed = shutil.copytree(tiny_models["llama"], tmp_path / "as_embed")
    _tied(as_head, "lm_head.weight")
    _tied(as_embed, "model.embed_tokens.weight")
    out = tmp_path / "out"
    rc = cli.main([str(as_head), "-o", str(out), "--calib", str(calib_file), *SMALL])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    ppl = []
    for model in (as_head, as_embed, out):
        assert cli.main(["eval", str(model), "--data", str(calib_file), "--seq-len", "32", "--json"]) == 0
        ppl.append(json.loads(capsys.readouterr().out)["ppl"])
    assert ppl[0] == ppl[1]  # same matrix, same code path: bit-identical
    assert abs(ppl[2] / ppl[0] - 1) < 0.05  # W8A8 of a tiny random model: within 5 % of float
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["model.embed_tokens.weight"] == "FLOAT" and desc["lm_head.weight"] == "FLOAT"
    stored = load_file(out / "quant_model_weights.safetensors")
    assert torch.equal(stored["model.embed_tokens.weight"], load_file(as_head / "model.safetensors")["lm_head.weight"])


@pytest.mark.parametrize("command", ["compile", "eval"])
def test_tied_config_with_a_different_stored_lm_head_refused(capsys, monkeypatch, tmp_path, model_copy, calib_file,
                                                             command):
    """tie_word_embeddings true, but lm_head.weight stored with its own values: compiled with the embedding as the
    head (what vLLM-Ascend loads) while transformers 5 keeps the stored lm_head; the float eval disagreed with
    transformers by a relative logit error of 1.4 on a tiny Llama."""
    edit_config(model_copy, tie_word_embeddings=True)
    expect_refused(capsys, monkeypatch, tmp_path, command, model_copy, calib_file, "config.json",
                   "tie_word_embeddings is true", "lm_head.weight", "differs from model.embed_tokens.weight")


def test_tied_config_storing_both_copies_equal_compiles(capsys, tmp_path, model_copy, calib_file):
    """Both names stored with the same values (some exporters write both): nothing is ambiguous."""
    edit_config(model_copy, tie_word_embeddings=True)
    rewrite_weights(model_copy, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    rc = cli.main([str(model_copy), "-o", str(tmp_path / "out"), "--calib", str(calib_file), *SMALL])
    assert rc == 0, capsys.readouterr().err


def test_untied_model_needs_lm_head(capsys, monkeypatch, tmp_path, model_copy, calib_file):
    rewrite_weights(model_copy, lambda t: t.pop("lm_head.weight"))
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file, "lm_head.weight", "missing")


# ----------------------------------------------------------------------------------------- dtype

@pytest.mark.parametrize("absent", [{}, {"dtype": None}, {"torch_dtype": None, "dtype": None}],
                         ids=["no-key", "dtype-null", "both-null"])
def test_dtype_from_safetensors_headers(capsys, tmp_path, calib_file, absent):
    """A float16 checkpoint whose config.json has no torch_dtype/dtype (or null: transformers reads null as absent)
    was compiled as bfloat16; the dtype read from the safetensors headers was not said."""
    model = make_tiny_model(tmp_path / "fp16", "qwen2", dtype=torch.float16)
    cfg = json.loads((model / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg.pop("dtype", None)
    (model / "config.json").write_text(json.dumps({**cfg, **absent}))
    out = tmp_path / "out"
    rc = cli.main([str(model), "-o", str(out), "--calib", str(calib_file), *SMALL])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "config.json states no dtype (nor torch_dtype): the checkpoint's dtype is float16, read from its " \
           "safetensors headers" in err
    assert json.loads((out / "qcompile_report.json").read_text())["dtype"] == "float16"
    assert cli.main(["eval", str(model), "--data", str(calib_file), "--seq-len", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "float16"


@pytest.mark.parametrize("key, value", [("torch_dtype", "bfloat17"), ("dtype", 7), ("torch_dtype", "auto"),
                                        ("dtype", "torch.float16"), ("torch_dtype", "int8"), ("dtype", ""),
                                        ("torch_dtype", ["bfloat16"])])
@pytest.mark.parametrize("command", ["compile", "eval"])
def test_unknown_config_dtype_is_refused(capsys, monkeypatch, tmp_path, model_copy, calib_file, key, value, command):
    """config.json's torch_dtype / dtype not a float dtype transformers accepts ("bfloat17", 7, "auto", ...) was
    compiled as bfloat16 (loading._source_dtype fell back to it); transformers' AutoConfig fails on most of them."""
    edit_config(model_copy, **{key: value})
    if key == "torch_dtype":
        edit_config(model_copy, dtype=None)  # else `dtype` (bfloat16, as saved) is the key transformers reads
    line = expect_refused(capsys, monkeypatch, tmp_path, command, model_copy, calib_file,
                          f"{model_copy / 'config.json'}: {key} is {json.dumps(value)}",
                          "expected one of bfloat16, float16, float32, float64")
    assert "Traceback" not in line


def test_config_dtype_key_is_transformers_one(capsys, tmp_path, calib_file):
    """Both keys given: transformers keeps `dtype` (PretrainedConfig.__init__); torch_dtype won here, so a
    float16 checkpoint whose config.json says torch_dtype bfloat16, dtype float16 was compiled as bfloat16."""
    from transformers import AutoConfig
    model = make_tiny_model(tmp_path / "fp16", "llama", dtype=torch.float16)
    edit_config(model, torch_dtype="bfloat16", dtype="float16")
    assert AutoConfig.from_pretrained(str(model)).dtype == torch.float16
    rc = cli.main([str(model), "-o", str(tmp_path / "out"), "--calib", str(calib_file), *SMALL])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "qcompile_report.json").read_text())["dtype"] == "float16"


def test_config_dtype_float64(model_copy):
    """float64 is a float dtype transformers and the safetensors checks accept: the checkpoint's own dtype, compiled
    as bfloat16 like float32 (it was taken for bfloat16)."""
    from qcompiler.loading import open_checkpoint
    edit_config(model_copy, dtype="float64")
    ckpt = open_checkpoint(model_copy)
    assert ckpt.source_dtype == torch.float64 and ckpt.dtype == torch.bfloat16


# ------------------------------------------------------------------------------ tokenizer vs embedding

@pytest.fixture
def chat_token_model(model_copy):
    """The tiny model with an added special token '<|chat|>' whose id (300) has no embedding row."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_copy))
    tok.add_special_tokens({"additional_special_tokens": ["<|chat|>"]})
    tok.save_pretrained(str(model_copy))
    assert tok.convert_tokens_to_ids("<|chat|>") == 300
    return model_copy


@pytest.mark.parametrize("command", ["compile", "eval", "run"])
def test_token_ids_beyond_embedding(capsys, monkeypatch, tmp_path, chat_token_model, command):
    """A tokenizer emitting ids beyond vocab_size crashed compile/eval/run with IndexError."""
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"text": "Quantization maps weights <|chat|> to small integers. " * 8}) + "\n")
    argv = model_command_argv(command, chat_token_model, tmp_path, data)
    if command == "run":
        argv[argv.index("hello")] = "hello <|chat|>"
    line = expect_error(capsys, argv, "'<|chat|>'", "id 300", "300 rows")
    assert leftovers(tmp_path) == [], line


def test_bos_beyond_embedding_when_sampling(capsys, tmp_path, chat_token_model):
    """Self-sampled calibration starts every row with BOS: an id without a row is refused, not an IndexError."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(chat_token_model))
    tok.bos_token = "<|chat|>"
    tok.save_pretrained(str(chat_token_model))
    expect_error(capsys, [chat_token_model, "-o", tmp_path / "out", *SMALL], "'<|chat|>'", "300 rows", "BOS")
    assert leftovers(tmp_path) == []


def test_check_token_ids_unit():
    check_token_ids(torch.tensor([[0, 5], [9, 2]]), 10, None, "x")  # all ids have rows
    check_token_ids([], 10, None, "x")
    with pytest.raises(QCError, match=r"token None \(id 12\).*10 rows \(ids 0\.\.9\)"):
        check_token_ids([1, 12, 3], 10, None, "x")


# ------------------------------------------------------------------- auxiliary files OUT copies

@pytest.mark.parametrize("name,content,needle", [
    ("generation_config.json", b'{"eos_token_id": 2,', "not valid JSON"),     # was copied into OUT as is
    ("generation_config.json", b"[1, 2]", "a JSON list, expected a JSON object"),
    ("generation_config.json", b'{"temperature": NaN}', "not valid JSON"),
    ("tokenizer_config.json", b"{", "not valid JSON"),
    ("special_tokens_map.json", b"{", "not valid JSON"),
    ("added_tokens.json", b'"x"', "a JSON str, expected a JSON object"),
    ("chat_template.json", b"{", "not valid JSON"),                          # was copied into OUT as is
    ("vocab.json", b"{", "not valid JSON"),                                   # was copied into OUT as is
    ("merges.txt", b"#version: 0.2\n\xff\xfe\n", "not UTF-8 text"),           # was copied into OUT as is
    ("chat_template.jinja", b"{{ \xc3 }}", "not UTF-8 text"),
])
def test_broken_auxiliary_file_is_refused_before_work(capsys, monkeypatch, tmp_path, model_copy, calib_file, name,
                                                      content, needle):
    """Every auxiliary file OUT copies from the model folder (artifact.copy_source_files) is checked first
    (loading.check_aux_files): a broken one is one line naming it, not a file the engines fail on in OUT."""
    (model_copy / name).write_bytes(content)
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file, f"{model_copy / name}:", needle)


def test_broken_generation_config_in_out_is_refused_by_run(capsys, tmp_path, tiny_models, calib_file):
    """load_tokenizer checks the folder it reads (a compiled OUT too)."""
    from qcompiler.loading import load_tokenizer
    import shutil
    folder = shutil.copytree(tiny_models["llama"], tmp_path / "m")
    (folder / "generation_config.json").write_text("{")
    with pytest.raises(QCError, match="generation_config.json: not valid JSON"):
        load_tokenizer(folder)


def test_model_folder_is_scanned_once_per_process(monkeypatch, tmp_path, model_copy, calib_file):
    """open_checkpoint and load_tokenizer both checked the model folder's files (the scan and every JSON parse
    twice per compile): once now, and again when the folder changed (the check is not lost)."""
    from qcompiler import loading
    calls = []
    for name in ("check_special_files", "check_aux_files"):
        real = getattr(loading, name)
        monkeypatch.setattr(loading, name, lambda path, _real=real, _name=name: (calls.append(_name), _real(path)))
    assert cli.main([str(model_copy), "--passes", "w8a8", "--calib", str(calib_file), *SMALL,
                     "-o", str(tmp_path / "o")]) == 0
    assert calls == ["check_special_files", "check_aux_files"], calls
    import os
    os.mkfifo(model_copy / "tokenizer.model")               # the folder changed: checked again, and refused
    with pytest.raises(QCError, match="tokenizer.model: not a regular file"):
        loading.load_tokenizer(model_copy)
