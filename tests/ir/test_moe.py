"""Mixture-of-experts capture (ir/moe.py): the MoE block as a graph with per-expert Linear sites under the
checkpoint's names, a float router, explicit routing; the float captured layer equals transformers' own layer.

Tolerance: none. The captured block computes transformers' routing (float32 softmax, top-k, renormalisation,
cast to the model dtype) and sums the experts in index order with an exact 0 for unchosen ones, which is what
Qwen3MoeExperts / Qwen2MoeExperts' index_add_ over the chosen experts computes, so the outputs are compared
bit for bit (torch.equal), against transformers' default experts implementation.
"""
import pytest
import torch

from qcompiler.ir import meta
from qcompiler.ir.capture import HFSkeleton
from qcompiler.ir.moe import is_moe_layer, moe_fused_groups
from qcompiler.ir.patterns import linear_sites
from qcompiler.loading import open_checkpoint
from qcompiler.passes.group_size import layer_linear_shapes
from tests.helpers import make_tiny_model

MOE_ARCHS = ("qwen3_moe", "qwen2_moe")


def _transformers_layer_output(folder, index, hidden, pe):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, trust_remote_code=False).eval()
    with torch.no_grad():
        out = model.model.layers[index](hidden, position_embeddings=pe, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def _layer_inputs(folder, seed=1, seqs=3, length=12):
    skel = HFSkeleton(open_checkpoint(folder))
    ids = torch.randint(0, 250, (seqs, length), generator=torch.Generator().manual_seed(seed))
    return skel, skel.layer0_inputs(ids)


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("index", [0, 1])
def test_float_captured_moe_layer_equals_transformers(moe_models, arch, index):
    skel, inputs = _layer_inputs(moe_models[arch])
    # a different input per layer index (layer 1 would see layer 0's output; any hidden state serves here)
    hidden = inputs.hidden if index == 0 else inputs.hidden * 1.5
    gm = skel.capture_layer(index, inputs)
    with torch.no_grad():
        got = gm(hidden, position_embeddings=inputs.position_embeddings)
    want = _transformers_layer_output(moe_models[arch], index, hidden, inputs.position_embeddings)
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_linear_sites_are_the_checkpoints_per_expert_linears_and_the_router_is_none(moe_models, arch):
    skel, inputs = _layer_inputs(moe_models[arch])
    gm = skel.capture_layer(0, inputs)
    names = [s.name for s in linear_sites(gm)]
    experts = [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")]
    shared = ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"]
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] + experts + (
        shared if arch == "qwen2_moe" else [])
    assert sorted(names) == sorted(layer_linear_shapes(skel.ckpt.config, 0))  # config.json's view agrees
    routers = [n.meta[meta.LINEAR_NAME] for n in gm.graph.nodes if n.meta.get(meta.ROUTER)]
    assert routers == (["mlp.gate", "mlp.shared_expert_gate"] if arch == "qwen2_moe" else ["mlp.gate"])
    # routing is explicit in the graph: softmax, top-k
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.topk.default in targets
    # every checkpoint tensor of the layer is a graph tensor under its own name
    stored = {k[len("model.layers.0."):] for k in skel.ckpt.weight_map if k.startswith("model.layers.0.")}
    assert stored == set(gm.state_dict())


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_mlp_only_layers_and_norm_topk_prob_as_transformers(tmp_path, norm_topk_prob):
    """mlp_only_layers=[0]: layer 0 is a dense MLP (mlp.gate_proj ...), layer 1 MoE; both routings equal
    transformers'."""
    folder = make_tiny_model(tmp_path / "m", "qwen3_moe", mlp_only_layers=[0], norm_topk_prob=norm_topk_prob)
    skel, inputs = _layer_inputs(folder)
    config = skel.ckpt.config
    assert not is_moe_layer(config, 0) and is_moe_layer(config, 1)
    dense = skel.capture_layer(0, inputs)
    assert [s.name for s in linear_sites(dense)][4:] == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for index in (0, 1):
        gm = skel.capture_layer(index, inputs)
        with torch.no_grad():
            got = gm(inputs.hidden, position_embeddings=inputs.position_embeddings)
        want = _transformers_layer_output(folder, index, inputs.hidden, inputs.position_embeddings)
        assert torch.equal(got, want)


def test_decoder_sparse_step():
    config = {"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_local_experts": 4, "decoder_sparse_step": 2,
              "mlp_only_layers": [3]}
    assert [is_moe_layer(config, i) for i in range(4)] == [False, True, False, False]
    assert not is_moe_layer({"model_type": "qwen3", "num_experts": 4}, 0)


def test_experts_of_a_layer_form_one_fused_group():
    config = {"model_type": "qwen2_moe", "hidden_size": 8, "moe_intermediate_size": 4, "num_experts": 2,
              "shared_expert_intermediate_size": 4}
    experts, shared = moe_fused_groups(config)
    assert experts == tuple(f"mlp.experts.{e}.{p}" for e in range(2) for p in ("gate_proj", "up_proj", "down_proj"))
    assert shared == ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")


def test_routed_input_statistics_are_the_rows_the_router_sends(moe_models):
    """LayerRunner.collect(routes=): each expert's Gram matrix and row count come from exactly the tokens whose top-k
    holds it (computed here from the graph's own top-k and its gate/up input, by an fx Interpreter), not from every
    token the dense dispatch feeds it; the all-token statistics stay as they were."""
    from qcompiler.calibration.linear_inputs import LayerRunner
    from qcompiler.ir.moe import router_index_node
    from qcompiler.ir.patterns import linear_sites
    from tests.helpers import capture_tiny_layer
    gm, ctx = capture_tiny_layer(moe_models["qwen3_moe"], seqs=3, length=16)
    route = router_index_node(gm)
    x_node = next(s.input for s in linear_sites(gm) if s.name == "mlp.experts.0.gate_proj")
    down2 = next(s.input for s in linear_sites(gm) if s.name == "mlp.experts.2.down_proj")
    seen = {}

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in (route, x_node, down2):
                seen[n] = out
            return out

    with torch.no_grad():
        Spy(gm).run(ctx.inputs.hidden, *ctx.inputs.position_embeddings)
    stats = LayerRunner(gm, ctx).collect([x_node, down2], routes={x_node: [0, 1, 2, 3], down2: [2]},
                                         route_node=route)
    chosen = seen[route].reshape(-1, seen[route].shape[-1])
    total = 0
    for e in range(4):
        rows = seen[x_node].reshape(-1, 64)[(chosen == e).any(-1)].float()
        got = stats[x_node].routed[e]
        assert got.rows == rows.shape[0] > 0
        total += got.rows
        # accumulate_gram multiplies in float32 (bf16 inputs widened): only the summation order can differ from
        # this product (1e-4 is far above float32 rounding of 48-row sums, far below the O(1) relative difference
        # of another expert's rows or all tokens)
        want = rows.T @ rows
        assert torch.allclose(got.xtx, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        assert not torch.allclose(stats[x_node].xtx, want, rtol=0.1, atol=0.1 * want.abs().max().item())
    assert total == 3 * 16 * 2 and stats[x_node].rows == 3 * 16  # top-2: every token counted at two experts
    rows = seen[down2].reshape(-1, 128)[(chosen == 2).any(-1)].float()
    assert stats[down2].routed[2].rows == rows.shape[0] and list(stats[down2].routed) == [2]
    want = rows.T @ rows
    assert torch.allclose(stats[down2].routed[2].xtx, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
