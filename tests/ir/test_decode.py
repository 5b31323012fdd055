"""Decode graph (ir/decode.py) and cached generation (generate.py) on a tiny float model: the rewrite's
structure, and cached logits vs recomputing the whole sequence."""
import pytest
import torch

from qcompiler.errors import QCError
from qcompiler.generate import generate_ids_cached
from qcompiler.ir.capture import LayerInputs
from qcompiler.ir.decode import build_decode_graph
from qcompiler.runtime import load_model
from tests.helpers import cached_logits, recompute_logits

CACHED = torch.ops.qc.cached_attention.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default


@pytest.fixture(scope="module")
def float_model(tiny_models):
    return load_model(tiny_models["llama"])


def test_rewrite_replaces_attention_by_cached_attention(float_model):
    ids = torch.arange(10)[None] % 250
    sample = LayerInputs(float_model.head.embed(ids), float_model.head.rope(10))
    gm = float_model.layers.get(0, sample)
    dgm, spec = build_decode_graph(gm, torch.bfloat16)
    targets = [n.target for n in dgm.graph.nodes]
    assert SDPA not in targets and targets.count(CACHED) == 1
    assert [n.name for n in dgm.graph.nodes if n.op == "placeholder"][-3:] == ["k_cache", "v_cache", "cache_pos"]
    assert (spec.kv_heads, spec.head_dim, spec.k_dtype, spec.v_dtype) == (2, 16, "bfloat16", "bfloat16")
    assert SDPA in [n.target for n in gm.graph.nodes]  # the layer graph itself is left as it was


def test_rewrite_rejects_a_graph_without_attention(float_model):
    ids = torch.arange(6)[None]
    gm = float_model.layers.get(0, LayerInputs(float_model.head.embed(ids), float_model.head.rope(6)))
    (attn,) = [n for n in gm.graph.nodes if n.target == SDPA]
    attn.replace_all_uses_with(attn.args[2])
    gm.graph.erase_node(attn)
    with pytest.raises(QCError, match="expected one scaled_dot_product_attention node, found 0"):
        build_decode_graph(gm, torch.bfloat16)


def test_cached_logits_match_recomputation(float_model):
    ids = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(5))
    want = recompute_logits(float_model, ids)[:, 7:]
    got, cache = cached_logits(float_model, ids, prefill=8)
    # bf16 model: the cached step multiplies [1, D] rows where recomputation multiplies [L, D] blocks, so
    # sums are rounded in another order; 1% of the logits' range covers that, and the argmax agrees.
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 0.01, err
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert cache.length == 20 and cache.buffers[0][0].dtype == torch.bfloat16


def test_cached_generation_equals_recomputing_generation(float_model):
    from qcompiler.generate import generate
    cached = generate(float_model, "Quantization maps", max_new_tokens=8, raw=True, use_cache=True)
    recomputed = generate(float_model, "Quantization maps", max_new_tokens=8, raw=True, use_cache=False)
    assert cached == recomputed
    ids = float_model.tokenizer("The NPU")["input_ids"]
    assert len(generate_ids_cached(float_model, ids, 5, stop_at_eos=False)) == 5


def test_cli_run_with_and_without_cache(tiny_models, capsys):
    from qcompiler.cli import main
    outs = []
    for extra in ([], ["--no-cache"]):
        assert main(["run", str(tiny_models["llama"]), "--prompt", "Quantization", "--raw",
                     "--max-new-tokens", "4", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()
