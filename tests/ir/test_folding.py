"""The folding module (ir/folding.py): the producer -> consumers table found by dataflow, the GQA choice, one fold
that keeps the float layer function for every mapping, and the one tensor setter (patterns.replace_tensor)."""
import pytest
import torch

from qcompiler.ir.folding import MAPPINGS, find_fold_groups, fold, kv_rows, share_heads
from qcompiler.ir.patterns import get_tensor, replace_tensor
from tests.helpers import make_tiny_model


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory):
    """float32 checkpoints (GQA: 4 query heads, 2 kv heads) and one without GQA, so a fold is exact to float32."""
    root = tmp_path_factory.mktemp("fold32")
    models = {a: make_tiny_model(root / a, a, dtype=torch.float32) for a in ("llama", "qwen2", "qwen3")}
    models["mha"] = make_tiny_model(root / "mha", "qwen2", dtype=torch.float32, num_key_value_heads=4)
    return models


def capture_tiny_layer(folder):
    """Layer 0 captured in float32 (not a compile dtype, but capture and folding work in it)."""
    from qcompiler.ir.capture import HFSkeleton
    from qcompiler.loading import open_checkpoint
    from qcompiler.passes import LayerContext
    ckpt = open_checkpoint(folder)
    ckpt.dtype = torch.float32
    skel = HFSkeleton(ckpt)
    inputs = skel.layer0_inputs(torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(1)))
    return skel.capture_layer(0, inputs), LayerContext(index=0, inputs=inputs, dtype=torch.float32)


def _run(gm, ctx):
    with torch.no_grad():
        return gm(ctx.inputs.hidden, position_embeddings=ctx.inputs.position_embeddings).float()


def test_table_names_msmodelslim_subgraphs():
    assert {k: v[0] for k, v in MAPPINGS.items()} == {"norm": "norm-linear", "attn_v": "ov", "mlp_up": "up-down"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mha"])
def test_groups_found_by_dataflow(f32_models, arch):
    gm, _ = capture_tiny_layer(f32_models[arch])
    groups, skipped = find_fold_groups(gm)
    kvh = 4 if arch == "mha" else 2
    assert skipped == {}
    assert [(g.kind, g.producer, [s.name for s in g.sites], g.heads) for g in groups] == [
        ("norm", "input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], None),
        ("attn_v", "self_attn.v_proj", ["self_attn.o_proj"], (4, kvh, 16)),
        ("norm", "post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], None),
        ("mlp_up", "mlp.up_proj", ["mlp.down_proj"], None),
    ]
    # a pass that cannot share scales over heads (awq) asks without GQA: only then is v -> o skipped
    groups, skipped = find_fold_groups(gm, gqa=False)
    if arch == "mha":
        assert skipped == {} and len(groups) == 4
    else:
        assert list(skipped) == ["self_attn.o_proj"] and "grouped-query" in skipped["self_attn.o_proj"]


# float32 folding is exact up to float32 rounding (~1e-7 relative to the layer's contribution); 1e-5 bounds it.
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mha"])
def test_fold_keeps_the_float_function(f32_models, arch):
    gm, ctx = capture_tiny_layer(f32_models[arch])
    want = _run(gm, ctx)
    groups, _ = find_fold_groups(gm)
    g = torch.Generator().manual_seed(0)
    for group in groups:
        k = get_tensor(gm, group.sites[0].weight.target).shape[1]
        s = torch.rand(k, generator=g) * 4 + 0.25
        if group.heads is not None:   # v rows are shared by the query heads of a kv head
            s = share_heads(s, group.heads)
        fold(gm, group, s)
    got = _run(gm, ctx)
    assert float((got - want).norm() / (want - ctx.inputs.hidden.float()).norm()) < 1e-5


def test_kv_rows_takes_one_copy_per_kv_head():
    heads = (4, 2, 3)
    s = share_heads(torch.arange(12.0), heads)
    assert s.tolist() == [3, 4, 5, 3, 4, 5, 9, 10, 11, 9, 10, 11]
    assert kv_rows(s, heads).tolist() == [3, 4, 5, 9, 10, 11]


def test_replace_tensor_keeps_kind_place_dtype_and_shape():
    m = torch.nn.Linear(4, 3).to(torch.bfloat16)
    m.register_buffer("buf", torch.zeros(2))
    order = [n for n, _ in m.named_parameters()]
    replace_tensor(m, "weight", torch.ones(3, 4, dtype=torch.float32))
    assert [n for n, _ in m.named_parameters()] == order and m.weight.dtype == torch.bfloat16
    assert not m.weight.requires_grad and torch.equal(m.weight, torch.ones(3, 4, dtype=torch.bfloat16))
    replace_tensor(m, "buf", torch.ones(2))
    assert "buf" in dict(m.named_buffers())
    with pytest.raises(ValueError, match=r"bias: new shape \[4\] != \[3\]"):
        replace_tensor(m, "bias", torch.ones(4))
    with pytest.raises(AttributeError):
        replace_tensor(m, "extra", torch.ones(3))   # only with create=True
    replace_tensor(m, "extra", torch.ones(3, dtype=torch.float16), create=True)
    assert dict(m.named_parameters())["extra"].dtype == torch.float16
