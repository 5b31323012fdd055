"""Capture: torch.export of each decoder layer equals the eager transformers layer, for every architecture."""
import pytest
import torch

from qcompiler.ir import meta
from qcompiler.ir.capture import HFSkeleton, LayerInputs
from qcompiler.ir.patterns import attention_nodes, linear_sites, shared_input_groups
from qcompiler.loading import open_checkpoint

ARCHS = ["llama", "qwen2", "qwen3"]


def _eager(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, trust_remote_code=False).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_layer0_inputs_and_graph_match_eager(tiny_models, arch):
    ckpt = open_checkpoint(tiny_models[arch])
    skel = HFSkeleton(ckpt)
    ids = torch.randint(0, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    inputs = skel.layer0_inputs(ids)
    model = _eager(tiny_models[arch])
    # the pre-hook captured what the real model feeds layer 0: the embedding output
    assert torch.equal(inputs.hidden, model.model.embed_tokens(ids))
    h = inputs.hidden
    with torch.no_grad():
        for i in range(ckpt.num_layers):
            gm = skel.capture_layer(i, LayerInputs(h, inputs.position_embeddings))
            want = model.model.layers[i](h, position_embeddings=inputs.position_embeddings)
            got = gm(h, position_embeddings=inputs.position_embeddings)
            # same aten ops in the same order on the same inputs: bit-identical
            assert torch.equal(got, want), f"layer {i}"
            h = want


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_structure(tiny_models, arch):
    ckpt = open_checkpoint(tiny_models[arch])
    skel = HFSkeleton(ckpt)
    inputs = skel.layer0_inputs(torch.zeros(2, 8, dtype=torch.long))
    gm = skel.capture_layer(0, inputs)
    sites = linear_sites(gm)
    assert [s.name for s in sites] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert all(s.node.meta[meta.LINEAR_NAME] == s.name for s in sites)
    assert len(attention_nodes(gm)) == 1
    groups = [[s.name.split(".")[-1] for s in g] for g in shared_input_groups(sites)]
    assert groups == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert (sites[0].bias is not None) == (arch == "qwen2")
    names = {k for k, _ in gm.named_parameters()}
    assert "self_attn.q_proj.weight" in names and "input_layernorm.weight" in names


def test_dynamic_batch_and_sequence(tiny_models):
    ckpt = open_checkpoint(tiny_models["llama"])
    skel = HFSkeleton(ckpt)
    inputs = skel.layer0_inputs(torch.zeros(2, 8, dtype=torch.long))
    gm = skel.capture_layer(0, inputs)
    model = _eager(tiny_models["llama"])
    for batch, seq in [(1, 1), (1, 5), (4, 17)]:
        ids = torch.randint(0, 200, (batch, seq), generator=torch.Generator().manual_seed(seq))
        x = skel.layer0_inputs(ids)
        with torch.no_grad():
            want = model.model.layers[0](x.hidden, position_embeddings=x.position_embeddings)
        assert torch.equal(gm(x.hidden, position_embeddings=x.position_embeddings), want)


def test_capture_releases_eager_weights(tiny_models):
    ckpt = open_checkpoint(tiny_models["llama"])
    skel = HFSkeleton(ckpt)
    skel.capture_layer(1, skel.layer0_inputs(torch.zeros(2, 4, dtype=torch.long)))
    assert all(p.device.type == "meta" for p in skel.model.model.layers[1].parameters())


@pytest.mark.parametrize("arch", [*ARCHS, "qwen3_moe", "qwen2_moe"])
def test_copied_layer_equals_a_fresh_export(tiny_models, moe_models, arch):
    """Layers after the first of a structure are copies of an exported template holding their own tensors:
    the same graph (code, node metadata) and the same numbers as exporting that layer itself."""
    from qcompiler.ir.capture import annotate_linears, export_layer
    ckpt = open_checkpoint({**tiny_models, **moe_models}[arch])
    skel = HFSkeleton(ckpt)
    inputs = skel.layer0_inputs(torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(3)))
    skel.capture_layer(0, inputs)
    copied = skel.capture_layer(1, inputs)
    assert len(skel._templates) == 1  # one export for both layers
    template = next(iter(skel._templates.values()))
    assert all(p.is_meta for p in template.parameters())  # the template holds no weights
    layer = skel.model.model.layers[1]
    skel._load(layer, "model.layers.1.")
    fresh = export_layer(layer, inputs)
    annotate_linears(fresh)
    layer.to("meta")
    assert copied.code == fresh.code
    state_c, state_f = copied.state_dict(), fresh.state_dict()
    assert state_c.keys() == state_f.keys() and all(torch.equal(state_c[k], state_f[k]) for k in state_c)
    assert {k for k, _ in copied.named_parameters()} == {k for k, _ in fresh.named_parameters()}
    for a, b in zip(copied.graph.nodes, fresh.graph.nodes):
        assert (a.name, a.op, a.target) == (b.name, b.op, b.target)
        assert a.meta.get(meta.LINEAR_NAME) == b.meta.get(meta.LINEAR_NAME)
        assert a.meta.get(meta.ROUTER) == b.meta.get(meta.ROUTER)
        va, vb = a.meta.get("val"), b.meta.get("val")
        if isinstance(va, torch.Tensor):
            assert str(va.shape) == str(vb.shape) and va.dtype == vb.dtype
    x = skel.layer0_inputs(torch.randint(0, 200, (3, 7), generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        assert torch.equal(copied(x.hidden, position_embeddings=x.position_embeddings),
                           fresh(x.hidden, position_embeddings=x.position_embeddings))


def test_structure_key_sees_what_changes_the_graph(tiny_models):
    from qcompiler.ir.capture import structure_key
    ckpt = open_checkpoint(tiny_models["qwen2"])
    layers = HFSkeleton(ckpt).model.model.layers
    assert structure_key(layers[0]) == structure_key(layers[1])  # layer_idx aside, identical
    layers[1].self_attn.sliding_window = 4                        # a sliding layer exports another graph
    assert structure_key(layers[0]) != structure_key(layers[1])
