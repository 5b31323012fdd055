"""ir/dense_layer.py: the float layer graph written from config.json equals torch.export's capture, bit for bit.

For every variant the module accepts (Llama with and without biases, plain multi-head attention, an explicit
head_dim, a tied embedding, float16; Qwen2's q/k/v biases, including a config in the pre-5.0 RoPE layout;
Qwen3's q/k norms, with and without attention biases):
- the graph (op, target, arguments, keyword arguments, in order), the pytree signature and the Linear names
  equal the captured layer's, for every layer; so do the bound tensors;
- logits are bit-identical to the captured path (`load_float_model(..., capture=True)`, the path of every
  earlier release): the whole model recomputed (what `qcompile eval` runs, prepared layers) and with the KV
  cache (what `qcompile run` runs); tolerance: none, it is the same graph on the same tensors;
- the RoPE table equals transformers' rotary module's, and the tensor table (names, shapes, Linears) equals
  transformers' meta model's, so the checkpoint checks give the same answers and messages.
Configs it does not understand fall back to the capture (MoE, a RoPE type other than default, a sliding window,
an unknown key, another activation, a model_type that disagrees with the architecture).
These tests fail when an installed transformers builds another graph than the one written here.
"""
import pytest
import torch

from qcompiler.checkpoint_checks import meta_model
from qcompiler.ir import meta
from qcompiler.ir.capture import LayerInputs
from qcompiler.ir.dense_layer import describe, model_tensors
from qcompiler.loading import open_checkpoint
from qcompiler.model import CapturedFloatLayers, DenseFloatLayers, load_float_model
from tests.helpers import cached_logits, edit_config, make_tiny_model

VARIANTS = {
    "llama": ("llama", {}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-head-dim": ("llama", {"head_dim": 32}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-fp16": ("llama", {"dtype": torch.float16}),
    "qwen2": ("qwen2", {}),
    "qwen2-old-rope": ("qwen2", {"old_rope": True}),
    "qwen3": ("qwen3", {}),
    "qwen3-biases": ("qwen3", {"attention_bias": True}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    overrides = dict(overrides)
    old_rope = overrides.pop("old_rope", False)
    dtype = overrides.pop("dtype", torch.bfloat16)
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param) / "m", arch, dtype=dtype, **overrides)
    if old_rope:  # config.json as transformers 4 wrote it: top-level rope_theta, rope_scaling null
        import json
        cfg = json.loads((folder / "config.json").read_text())
        theta = cfg.pop("rope_parameters")["rope_theta"]
        (folder / "config.json").write_text(json.dumps({**cfg, "rope_theta": theta, "rope_scaling": None}))
    return request.param, folder


def _signature(gm):
    """(op, target, args, kwargs) of every node but export's `_guards_fn` module, node arguments as positions."""
    nodes = [n for n in gm.graph.nodes if not (n.op == "call_module" and n.target == "_guards_fn")]
    index = {n: i for i, n in enumerate(nodes)}
    arg = lambda a: torch.fx.node.map_arg(a, lambda n: ("node", index[n]))  # noqa: E731
    return [(n.op, str(n.target), arg(n.args), arg(n.kwargs), n.meta.get(meta.LINEAR_NAME)) for n in nodes]


def test_built_graph_equals_the_capture(variant):
    name, folder = variant
    dense, ref = load_float_model(folder), load_float_model(folder, capture=True)
    assert isinstance(dense.layers, DenseFloatLayers) and isinstance(ref.layers, CapturedFloatLayers), name
    assert torch.equal(dense.head.inv_freq, ref.head.inv_freq), name
    assert dense.head.attention_scaling == ref.head.attention_scaling == 1.0
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(1))
    sample = LayerInputs(dense.head.embed(ids), dense.head.rope(9))
    for i in range(dense.layers.num_layers):
        got, want = dense.layers.get(i, sample), ref.layers.get(i, sample)
        assert _signature(got) == _signature(want), (name, i)
        assert got.graph._codegen.pytree_info == want.graph._codegen.pytree_info, name
        assert got.state_dict().keys() == want.state_dict().keys()
        assert all(torch.equal(got.state_dict()[k], v) and got.state_dict()[k].dtype == v.dtype
                   for k, v in want.state_dict().items()), (name, i)


def test_logits_are_bit_identical_to_the_capture(variant):
    """Whole model, recomputed through prepared layers (eval) and with the KV cache (run): exact equality."""
    name, folder = variant
    dense, ref = load_float_model(folder), load_float_model(folder, capture=True)
    ids = torch.randint(0, 250, (3, 12), generator=torch.Generator().manual_seed(2))

    def logits(model):
        h, pe = model.head.embed(ids), model.head.rope(ids.shape[1])
        with torch.inference_mode():
            for i in range(model.layers.num_layers):
                h = model.layers.get(i, LayerInputs(h[:1], pe), prepared=True)(h, position_embeddings=pe)
            return model.head.logits(h).float()
    want = logits(ref)
    assert torch.isfinite(want).all() and want.abs().max() > 0
    assert torch.equal(logits(dense), want), name
    got_cached, _ = cached_logits(dense, ids[:1], 5)
    want_cached, _ = cached_logits(ref, ids[:1], 5)
    assert torch.equal(got_cached, want_cached), name


def test_tensor_table_equals_transformers_meta_model(variant):
    name, folder = variant
    ckpt = open_checkpoint(folder, dense=True)
    assert ckpt.dense_spec is not None and ckpt.dense_spec == describe(ckpt)
    model = meta_model(ckpt)
    expected = {n: list(t.shape) for n, t in model.state_dict().items()}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert model_tensors(ckpt.dense_spec, ckpt.num_layers) == (expected, linears), name


@pytest.mark.parametrize("change", [
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    {"hidden_act": "gelu"},
    {"some_new_key": 1},
    {"model_type": "qwen2"},
    {"rms_norm_eps": None},
], ids=["rope-llama3", "partial-rotary", "gelu", "unknown-key", "model-type", "no-eps"])
def test_configs_it_does_not_understand_are_captured(tiny_models, tmp_path, change):
    import shutil
    folder = shutil.copytree(tiny_models["llama"], tmp_path / "m")
    edit_config(folder, **change)
    assert describe(_unchecked(folder)) is None


def test_sliding_window_and_moe_are_captured(tiny_models, moe_models, tmp_path):
    import shutil
    folder = shutil.copytree(tiny_models["qwen2"], tmp_path / "q")
    edit_config(folder, use_sliding_window=True, sliding_window=4096, max_window_layers=2)
    assert describe(_unchecked(folder)) is None
    for arch, path in moe_models.items():
        assert describe(_unchecked(path)) is None, arch
        assert isinstance(load_float_model(path).layers, CapturedFloatLayers), arch
    assert isinstance(load_float_model(tiny_models["llama"]).layers, DenseFloatLayers)


def _unchecked(folder):
    """A Checkpoint of `folder` without the checks (describe() reads only its config and architecture)."""
    import json

    from qcompiler.loading import Checkpoint, _architecture
    cfg = json.loads((folder / "config.json").read_text())
    return Checkpoint(path=folder, config=cfg, architecture=_architecture(cfg, folder), dtype=torch.bfloat16,
                      source_dtype=torch.bfloat16, weight_map={})
