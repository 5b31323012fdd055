"""Runtime: the head (embedding, RoPE tables, final norm, lm_head) written without transformers'
modeling code must reproduce transformers exactly, so float and compiled models share one code path."""
import torch

from qcompiler.ir.capture import LayerInputs
from qcompiler.runtime import load_model


def _hf(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, trust_remote_code=False).eval()


def test_rope_and_norm_match_transformers(tiny_models):
    model = load_model(tiny_models["qwen3"])
    hf = _hf(tiny_models["qwen3"])
    x = torch.randn(1, 9, 64, dtype=torch.bfloat16)
    cos, sin = hf.model.rotary_emb(x, torch.arange(9)[None])
    mcos, msin = model.head.rope(9)
    assert torch.equal(mcos, cos) and torch.equal(msin, sin)
    assert torch.equal(model.head.rope(4, start=5)[0], cos[:, 5:])
    with torch.no_grad():
        assert torch.equal(model.head.final_norm(x), hf.model.norm(x))


def test_float_logits_match_transformers(tiny_models):
    for arch in ("llama", "qwen2"):
        model = load_model(tiny_models[arch])
        hf = _hf(tiny_models[arch])
        ids = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = hf(ids).logits
            h = model.head.embed(ids)
            pe = model.head.rope(11)
            for i in range(model.layers.num_layers):
                h = model.layers.get(i, LayerInputs(h, pe))(h, position_embeddings=pe)
            got = model.head.logits(h)
        # captured layers are bit-identical to eager (tests/ir); the head is the same math: exact
        assert torch.equal(got, want), arch


def test_float_layers_capture_once_per_structure_and_equal_a_real_capture(tiny_models, monkeypatch):
    """CapturedFloatLayers exports layer 0 only and binds its graph to the other layers' weights: same code,
    same tensors, same output bits as exporting that layer itself; prepared (runtime form) too."""
    from qcompiler.ir import capture, meta
    real_export = capture.export_layer
    from qcompiler.model import load_float_model
    for arch in ("llama", "qwen2", "qwen3"):
        model = load_float_model(tiny_models[arch], capture=True)  # the transformers path (ir/dense_layer.py's
        skeleton = model.layers.skeleton                              # graph is tests/ir/test_dense_layer.py's)
        ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(1))
        h = model.head.embed(ids)
        pe = model.head.rope(9)
        sample = LayerInputs(h, pe)
        exports = []
        monkeypatch.setattr(capture, "export_layer", lambda *a: exports.append(1) or real_export(*a))
        got = [model.layers.get(i, sample) for i in range(model.layers.num_layers)]
        prepared = model.layers.get(1, sample, prepared=True)
        assert len(exports) == 1, arch  # layer 0 captured, layer 1 bound to its graph
        want = skeleton.capture_layer(1, sample)  # a real export of layer 1
        assert got[1].code == want.code
        assert {k: (v.dtype, v.shape) for k, v in got[1].state_dict().items()} == \
            {k: (v.dtype, v.shape) for k, v in want.state_dict().items()}
        assert all(torch.equal(got[1].state_dict()[k], v) for k, v in want.state_dict().items())
        names = lambda gm: [n.meta.get(meta.LINEAR_NAME) for n in capture.linear_nodes(gm)]  # noqa: E731
        assert names(got[1]) == names(want) and all(names(want))
        with torch.no_grad():
            out = want(h, position_embeddings=pe)
            assert torch.equal(got[1](h, position_embeddings=pe), out), arch
            assert torch.equal(prepared(h, position_embeddings=pe), out), arch
        assert not torch.equal(got[0](h, position_embeddings=pe), out)  # layer 0 has its own weights


def test_float_model_run_prints_no_torch_deprecation(tiny_models, capsys):
    """`qcompile eval` / `run` of a float model printed torch's FutureWarning "`isinstance(treespec, LeafSpec)` is
    deprecated" (model.bind_graph deep-copies the dense layer's pytree code generator) to the user's stderr."""
    import warnings
    from qcompiler import cli
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cli.main(["run", str(tiny_models["llama"]), "--prompt", "hi", "--raw", "--max-new-tokens", "1"]) == 0
    assert [str(w.message) for w in seen if "LeafSpec" in str(w.message)] == []
