"""ArtifactWriter end to end: tiny random Llama / Qwen2 models encoded per quant type, checked by the conformance
checker (shared/tools/check_ascend_artifact.py), plus file layout, config, sharding, determinism and errors."""
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qcompiler.backends.ascend import encode as E
from qcompiler.backends.ascend.artifact import ArtifactWriter, natural_key, write_json
from qcompiler.errors import QCError

CHECKER = Path(__file__).resolve().parents[3].parent / "shared/tools/check_ascend_artifact.py"
LINEAR = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+_proj))\.weight$")
# made-up calibration ranges per Linear input; q/k/v and gate/up read the same input, so they share one
RANGES = {"q_proj": (-3.1, 2.7), "k_proj": (-3.1, 2.7), "v_proj": (-3.1, 2.7), "o_proj": (-1.5, 1.8),
          "gate_proj": (-2.0, 2.5), "up_proj": (-2.0, 2.5), "down_proj": (-6.0, 5.0)}
SOURCE_EXTRAS = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "special_tokens_map.json": "{}",
                 "vocab.json": "{}", "merges.txt": "#v\n", "tokenizer.model": "spm", "chat_template.jinja": "{{x}}",
                 "added_tokens.json": "{}", "modeling_custom.py": "# remote code\n",
                 "model.safetensors.index.json": "{}", "README.md": "not copied\n"}


@pytest.fixture(scope="module")
def checker():
    if not CHECKER.is_file():
        pytest.skip(f"conformance checker not found at {CHECKER}")
    spec = importlib.util.spec_from_file_location("check_ascend_artifact", CHECKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _source(root: Path, arch: str, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = model_cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)  # HF initializes biases to 0: make quant_bias carry something
    src = root / f"{arch}{'_tied' if tied else ''}"
    model.save_pretrained(src)
    for name, text in SOURCE_EXTRAS.items():
        (src / name).write_text(text)
    config = json.loads((src / "config.json").read_text())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return src, config, state


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {"llama": _source(root, "llama"), "qwen2": _source(root, "qwen2"),
            "qwen2_tied": _source(root, "qwen2", tied=True)}


def encode_linear(quant, w, b, proj, dtype, group_size):
    if quant in (E.W8A8, E.W8A8_MIX):
        s_x, o_x = E.static_activation_params(*RANGES[proj], dtype)
        fn = E.encode_w8a8 if quant == E.W8A8 else E.encode_w8a8_mix
        return fn(w, b, s_x, o_x, dtype)
    if quant == E.W8A8_DYNAMIC:
        return E.encode_w8a8_dynamic(w, b, dtype)
    if quant == E.W8A16:
        return E.encode_w8a16(w, b, group_size, dtype)
    if quant == E.W4A16:
        return E.encode_w4a16(w, b, group_size, dtype)
    if quant == E.W4A8_DYNAMIC:
        return E.encode_w4a8_dynamic(w, b, proj in ("o_proj", "down_proj"), group_size, dtype)
    raise AssertionError(quant)


def write_artifact(out: Path, source, quant, dtype, group_size=0, max_shard_bytes=5 * 2**30, tied=False, **extra):
    """Every decoder Linear as `quant`; embeddings, norms and lm_head FLOAT in the model dtype."""
    src, config, state = source
    writer = ArtifactWriter(out, dtype, max_shard_bytes=max_shard_bytes)
    for name, t in state.items():
        if name.endswith(".bias") and LINEAR.match(name[:-5] + ".weight"):
            continue  # written with its Linear
        m = LINEAR.match(name)
        if m is None:
            if not (tied and name == "lm_head.weight"):
                writer.add(name, t.to(dtype), E.FLOAT)
            continue
        prefix, proj = m.groups()
        bias = state.get(prefix + ".bias")
        tensors = encode_linear(quant, t.to(dtype), None if bias is None else bias.to(dtype), proj, dtype, group_size)
        for suffix, v in tensors.items():
            writer.add(f"{prefix}.{suffix}", v, E.tensor_quant_type(suffix, quant))
    return writer.finish(src, config, group_size=group_size, tied_lm_head=tied, **extra)


def run_checker(checker, out: Path):
    rep, n = checker.check(str(out))
    errors = [r for r in rep if r[0] == "ERROR"]
    assert not errors, "checker errors:\n" + "\n".join(" ".join(map(str, r)) for r in errors)
    assert n > 0
    return [r for r in rep if r[0] == "WARN"]


def tensors_of(out: Path) -> dict:
    result = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            result.update({k: h.get_tensor(k) for k in h.keys()})
    return result


# ---- end to end through the checker -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w8a8_artifact_passes_checker(tmp_path, checker, sources, arch, dtype):
    out = tmp_path / "out"
    desc = write_artifact(out, sources[arch], E.W8A8, dtype)
    warnings = run_checker(checker, out)
    assert not warnings, warnings

    names = sorted(p.name for p in out.iterdir())
    # never code: modeling_custom.py stays behind (trust.py)
    copied = sorted(set(SOURCE_EXTRAS) - {"model.safetensors.index.json", "README.md", "modeling_custom.py"}
                    | {"generation_config.json"})
    assert names == sorted(copied + ["config.json", "quant_model_description.json",
                                     "quant_model_weights.safetensors"])
    assert list(desc)[:3] == ["model_quant_type", "version", "group_size"]
    assert desc["model_quant_type"] == "W8A8" and desc["version"] == "1.0.0" and desc["group_size"] == 0
    assert json.loads((out / "quant_model_description.json").read_text()) == desc
    cfg = json.loads((out / "config.json").read_text())
    dname = str(dtype).replace("torch.", "")
    assert cfg["torch_dtype"] == cfg["dtype"] == dname and cfg["quantize"] == "w8a8"
    assert "quantization_config" not in cfg

    t = tensors_of(out)
    assert set(t) == {k for k in desc if k not in ("model_quant_type", "version", "group_size")}
    q = "model.layers.1.self_attn.q_proj."
    assert t[q + "deq_scale"].dtype == (torch.int64 if dtype == torch.float16 else torch.float32)
    assert t["model.embed_tokens.weight"].dtype == dtype and desc["lm_head.weight"] == "FLOAT"
    if arch == "qwen2":  # q/k/v biases carried as FLOAT tensors of the quantized Linears
        assert desc[q + "bias"] == "FLOAT" and desc[q + "weight"] == "W8A8"
        torch.testing.assert_close(t[q + "bias"], sources[arch][2][q + "bias"].to(dtype).float())
    else:
        assert not any(k.endswith(".bias") for k in t)


@pytest.mark.parametrize("quant,group_size,dtype", [
    (E.W8A8_DYNAMIC, 0, torch.bfloat16), (E.W8A8_MIX, 0, torch.float16), (E.W8A16, 0, torch.float16),
    (E.W8A16, 32, torch.bfloat16), (E.W4A16, 0, torch.float16), (E.W4A16, 32, torch.bfloat16),
    (E.W4A8_DYNAMIC, 32, torch.bfloat16), (E.W4A8_DYNAMIC, 16, torch.float16)])
def test_other_types_pass_checker(tmp_path, checker, sources, quant, group_size, dtype):
    out = tmp_path / "out"
    # W4A8_DYNAMIC refuses a Linear bias (no engine adds it): the llama source has none
    source = sources["llama" if quant == E.W4A8_DYNAMIC else "qwen2"]
    desc = write_artifact(out, source, quant, dtype, group_size=group_size)
    warnings = run_checker(checker, out)
    # only the checker's engine-support notes for MindIE-only types are acceptable
    assert all(w[2].endswith(".support") for w in warnings), warnings
    assert desc["model_quant_type"] == quant and desc["group_size"] == group_size
    assert json.loads((out / "config.json").read_text())["quantize"] == quant.lower()


def test_sharded_artifact_passes_checker(tmp_path, checker, sources):
    out = tmp_path / "out"
    write_artifact(out, sources["llama"], E.W8A8, torch.float16, max_shard_bytes=24_000)
    assert not run_checker(checker, out)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and not (out / "quant_model_weights.safetensors").exists()
    total = len(shards)
    assert shards == [f"quant_model_weights-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    index = json.loads((out / "quant_model_weights.safetensors.index.json").read_text())
    t = tensors_of(out)
    assert set(index["weight_map"]) == set(t) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())
    for shard in shards:  # bounded unless a single tensor is larger (the embedding here: 128*64*2 bytes)
        with safe_open(str(out / shard), "pt") as h:
            assert h.metadata() == {"format": "pt"}
            assert len(list(h.keys())) == 1 or sum(
                h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys()) <= 24_000


def test_tied_lm_head_described_not_stored(tmp_path, checker, sources):
    out = tmp_path / "out"
    desc = write_artifact(out, sources["qwen2_tied"], E.W8A8_DYNAMIC, torch.bfloat16, tied=True)
    assert not run_checker(checker, out)
    assert desc["lm_head.weight"] == "FLOAT" and "lm_head.weight" not in tensors_of(out)


def test_output_is_deterministic(tmp_path, sources):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        write_artifact(out, sources["qwen2"], E.W8A8, torch.float16, max_shard_bytes=40_000)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


# ---- description, config, copying --------------------------------------------------------------------------------
def test_description_order_and_extra_keys(tmp_path, sources):
    src, config, _ = sources["llama"]
    w = ArtifactWriter(tmp_path / "out", torch.bfloat16)
    for name in ("model.layers.10.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight", "model.norm.weight"):
        w.add(name, torch.ones(2, 2), E.FLOAT)
    w.add("model.layers.2.self_attn.k_proj.kv_cache_scale", torch.ones(4), E.C8)
    desc = w.finish(src, config, extra_description={"kv_quant_type": "C8", "kv_cache_type": "C8"})
    assert list(desc) == ["model_quant_type", "version", "group_size", "kv_cache_type", "kv_quant_type",
                          "model.layers.2.mlp.up_proj.weight", "model.layers.2.self_attn.k_proj.kv_cache_scale",
                          "model.layers.10.mlp.up_proj.weight", "model.norm.weight"]
    assert desc["model_quant_type"] == "FLOAT"
    text = (tmp_path / "out" / "quant_model_description.json").read_text()
    assert text.endswith("}\n") and json.loads(text) == desc
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantize" not in cfg  # unquantized: no MindIE quantize key


def test_config_drops_quantization_config(tmp_path, sources):
    src, config, _ = sources["qwen2"]
    cfg_in = dict(config, quantization_config={"quant_method": "gptq"}, quantize="w8a16", torch_dtype="float32",
                  text_config={"quantization_config": {"quant_method": "awq"}, "dtype": "float32"})
    snapshot = json.dumps(cfg_in, sort_keys=True)
    w = ArtifactWriter(tmp_path / "out", torch.float16)
    w.add("model.layers.0.mlp.up_proj.weight", torch.ones(2, 2, dtype=torch.int8), E.W8A8_DYNAMIC)
    w.finish(src, cfg_in)
    assert json.dumps(cfg_in, sort_keys=True) == snapshot  # caller's dict untouched
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and "quantization_config" not in cfg["text_config"]
    assert cfg["torch_dtype"] == cfg["dtype"] == "float16" and cfg["quantize"] == "w8a8_dynamic"
    assert cfg["text_config"]["dtype"] == cfg["text_config"]["torch_dtype"] == "float16"


def test_write_json_format(tmp_path):
    write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert sorted(["l.10", "l.2", "l.1.x"], key=natural_key) == ["l.1.x", "l.2", "l.10"]


# ---- writer errors ------------------------------------------------------------------------------------------------
def test_writer_errors(tmp_path, sources):
    src, config, _ = sources["llama"]
    w = ArtifactWriter(tmp_path / "out", torch.bfloat16)
    w.add("a.weight", torch.ones(2), E.FLOAT)
    with pytest.raises(ValueError, match="twice"):
        w.add("a.weight", torch.ones(2), E.FLOAT)
    with pytest.raises(ValueError, match="unknown quant type"):
        w.add("b.weight", torch.ones(2), "W3A8")
    with pytest.raises(ValueError, match="extra_description"):
        w.finish(src, config, extra_description={"model.norm.weight": "FLOAT"})
    w.finish(src, config)
    with pytest.raises(RuntimeError):
        w.add("c.weight", torch.ones(2), E.FLOAT)
    with pytest.raises(QCError, match="already holds"):
        ArtifactWriter(tmp_path / "out", torch.bfloat16)  # engines would load the old weights too
    with pytest.raises(QCError, match="float16 or bfloat16"):
        ArtifactWriter(tmp_path / "other", torch.float32)
    with pytest.raises(QCError, match="no tensors"):
        ArtifactWriter(tmp_path / "empty", torch.float16).finish(src, config)


def test_shared_storage_tensors_are_saved(tmp_path, sources):
    """Tied / sliced tensors share storage; safetensors refuses that unless the writer copies them."""
    src, config, _ = sources["llama"]
    base = torch.randn(4, 4)
    w = ArtifactWriter(tmp_path / "out", torch.bfloat16)
    w.add("x.weight", base, E.FLOAT)
    w.add("y.weight", base[:2], E.FLOAT)
    w.add("z.weight", base.T, E.FLOAT)
    w.finish(src, config)
    t = tensors_of(tmp_path / "out")
    assert torch.equal(t["y.weight"], base[:2]) and torch.equal(t["z.weight"], base.T.contiguous())


def test_shards_are_save_file_bytes_and_nothing_is_held(tmp_path, sources):
    """The streaming writer writes exactly the shards the former buffering writer wrote (tensors buffered
    until the next one would pass max_shard_bytes, then safetensors' save_file), and keeps no tensor:
    an added tensor can be freed or changed at once."""
    import weakref

    from safetensors.torch import save_file
    out = tmp_path / "out"
    write_artifact(out, sources["qwen2"], E.W8A8, torch.bfloat16, max_shard_bytes=30_000)
    index = json.loads((out / "quant_model_weights.safetensors.index.json").read_text())
    by_shard: dict[str, list[str]] = {}
    for name, shard in index["weight_map"].items():
        by_shard.setdefault(shard, []).append(name)
    stored = tensors_of(out)
    assert len(by_shard) > 3
    for shard, names in by_shard.items():
        save_file({n: stored[n] for n in names}, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
        assert (out / shard).read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), shard
    assert not list(out.glob(".*spill"))

    src, config, _ = sources["llama"]
    w = ArtifactWriter(tmp_path / "held", torch.bfloat16)
    t = torch.ones(256, 256)  # larger than a file buffer
    alive = weakref.ref(t)
    w.add("x.weight", t, E.FLOAT)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "held").iterdir())
    assert on_disk >= t.numel() * t.element_size()  # written at once, not buffered until a shard is full
    t.zero_()                      # changed after add: the artifact keeps what was added
    del t
    assert alive() is None         # not referenced by the writer
    w.finish(src, config)
    assert torch.equal(tensors_of(tmp_path / "held")["x.weight"], torch.ones(256, 256))


def test_describe_adds_an_entry_without_a_tensor_and_survives_restore(tmp_path, sources):
    """`describe` (W4A16 MoE experts: `<linear>.weight` typed, weight_packed stored): in the description, not in the
    weights or the index; kept across a resumable state; a second entry of the same name is an error."""
    src, config, _ = sources["llama"]
    w = ArtifactWriter(tmp_path / "out", torch.bfloat16, resumable=True)
    w.add("e.weight_packed", torch.zeros(2, 1, dtype=torch.int32), E.W4A16)
    w.describe("e.weight", E.W4A16)
    with pytest.raises(ValueError, match="twice"):
        w.describe("e.weight", E.W4A16)
    state = json.loads(json.dumps(w.state()))
    w2 = ArtifactWriter.restore(tmp_path / "out", torch.bfloat16, state)
    desc = w2.finish(src, config)
    assert desc["e.weight"] == E.W4A16 and desc["e.weight_packed"] == E.W4A16
    assert set(tensors_of(tmp_path / "out")) == {"e.weight_packed"}
