"""The one calibration forward (calibration/forward.py): kv8, fa3 and the activation observers share it.

What it must keep: every observer sees every calibration token exactly once, and every statistic, scale and
graph is bit-identical to running one whole forward per pass (kv8's, fa3's, then calibrate's), which is how
they were calibrated before. Tolerance: none (torch.equal), the same kernels run on the same batches.
"""
import copy

import pytest
import torch

from qcompiler.calibration.forward import settle_pending
from qcompiler.ir import meta
from qcompiler.model import run_layer_batched
from qcompiler.passes import PassManager, make_pass
from qcompiler.passes.attention_quant import AbsMaxObserver
from tests.helpers import capture_tiny_layer

PIPELINES = [("w8a8", "kv8"), ("w8a8", "fa3"), ("w8a8", "kv8", "fa3"), ("w8a8d", "kv8")]


def _one_forward_per_pass(gm, ctx, names):
    """The reference: each pending rewrite settled by its own whole forward (what kv8 / fa3 did before),
    then observe and a whole forward for the activation observers."""
    PassManager([make_pass(n) for n in names]).run(gm, ctx)
    while ctx.pending:
        item = ctx.pending.pop(0)
        run_layer_batched(gm, ctx.inputs.hidden, ctx.inputs.position_embeddings, ctx.batch_size)
        ctx.records.setdefault(item.owner, {}).update(item.finish(gm, ctx))
    make_pass("observe").run(gm, ctx)
    if any(meta.OBSERVER in n.meta for n in gm.graph.nodes):
        run_layer_batched(gm, ctx.inputs.hidden, ctx.inputs.position_embeddings, ctx.batch_size)
    return gm


def _observer_states(gm):
    return {n.target: {k: v for k, v in vars(gm.get_submodule(n.target)).items() if isinstance(v, torch.Tensor)}
            | dict(gm.get_submodule(n.target).state_dict())
            for n in gm.graph.nodes if meta.OBSERVER in n.meta}


@pytest.mark.parametrize("names", PIPELINES, ids=lambda n: ",".join(n))
def test_one_forward_equals_a_forward_per_pass(tiny_models, names):
    gm, ctx = capture_tiny_layer(tiny_models["qwen2"], seqs=5)
    ctx.batch_size = 2  # three batches, the last one short
    ref_gm, ref_ctx = copy.deepcopy(gm), copy.deepcopy(ctx)
    _one_forward_per_pass(ref_gm, ref_ctx, names)

    calls = {}

    def count(module, args, out):
        calls[module] = calls.get(module, 0) + 1

    PassManager([make_pass(n) for n in (*names, "observe")]).run(gm, ctx)
    observers = [gm.get_submodule(n.target) for n in gm.graph.nodes if meta.OBSERVER in n.meta]
    handles = [m.register_forward_hook(count) for m in observers]
    make_pass("calibrate").run(gm, ctx)
    for h in handles:
        h.remove()
    # every observer (activation and absmax) saw each of the three batches once
    assert observers and all(calls.get(m) == 3 for m in observers), [calls.get(m) for m in observers]
    assert not ctx.pending
    assert not any(isinstance(m, AbsMaxObserver) for m in gm.modules())
    assert str(gm.graph) == str(ref_gm.graph)  # same nodes, names and order
    assert ctx.extra_tensors.keys() == ref_ctx.extra_tensors.keys()
    for name, (t, qtype) in ctx.extra_tensors.items():
        assert qtype == ref_ctx.extra_tensors[name][1] and torch.equal(t, ref_ctx.extra_tensors[name][0]), name
    assert ctx.description == ref_ctx.description
    for owner in names[1:]:
        assert ctx.records[owner] == ref_ctx.records[owner]
    got, want = _observer_states(gm), _observer_states(ref_gm)
    assert got.keys() == want.keys()
    for name in got:
        assert got[name].keys() == want[name].keys()
        for k in got[name]:
            assert torch.equal(got[name][k], want[name][k]), (name, k)
    args = (ctx.inputs.hidden, ctx.inputs.position_embeddings, ctx.batch_size)
    assert torch.equal(run_layer_batched(gm, *args), run_layer_batched(ref_gm, *args))


def test_a_forward_with_rewrites_pending_is_refused(tiny_models):
    """Any other forward while kv8's observers wait (a pass placed before them) would feed them twice."""
    gm, ctx = capture_tiny_layer(tiny_models["llama"])
    for name in ("w8a8d", "kv8"):
        make_pass(name).run(gm, ctx)
    with pytest.raises(RuntimeError, match=r"rewrites pending \(kv8\)"):
        ctx.run_layer(gm)
    from qcompiler.calibration.linear_inputs import LayerRunner
    with pytest.raises(RuntimeError, match=r"rewrites pending \(kv8\)"):
        LayerRunner(gm, ctx)
    assert settle_pending(gm, ctx) and not ctx.pending
    assert "self_attn.k_proj.kv_cache_scale" in ctx.extra_tensors
    ctx.run_layer(gm)  # settled: allowed
