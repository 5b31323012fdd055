"""sparse: exact per-row ratio for every method, Wanda's score, SparseGPT's error compensation, outlier
protection, the pass on tiny layers (sequential stages, --exclude, records), and its pipeline contract
(scheme after it keeps zeros; gptq after it keeps zero codes)."""
import copy

import pytest
import torch

from qcompiler.errors import QCError
from qcompiler.ir import meta
from qcompiler.ir.capture import HFSkeleton
from qcompiler.ir.patterns import get_tensor, linear_sites
from qcompiler.loading import open_checkpoint
from qcompiler.passes import TAIL, LayerContext, PassManager, make_pass
from qcompiler.passes.gptq import output_error
from tests.helpers import hessian_peak_units
from qcompiler.passes.sparse import (magnitude_prune, protected_mask, prune_count, sparsegpt_prune,
                                     wanda_prune)


def _correlated(n_tokens=2048, k=128, seed=0):
    """Inputs with correlated channels of very different scales (like a real Linear's)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_tokens, k // 4, generator=g)
    x = z @ torch.randn(k // 4, k, generator=g) + 0.1 * torch.randn(n_tokens, k, generator=g)
    x *= torch.rand(k, generator=g) * 4 + 0.1
    return x


def _zeros_per_row(w):
    return (w == 0).sum(1)


# ---- the algorithms on synthetic data ------------------------------------------------------------
@pytest.mark.parametrize("ratio,k", [(0.5, 128), (0.3, 77), (0.75, 100)])
def test_every_method_prunes_exactly_per_row(ratio, k):
    x = _correlated(k=k)
    w = torch.randn(24, k, generator=torch.Generator().manual_seed(1))
    h = 2 * x.T @ x / x.shape[0]
    want = prune_count(k, ratio)
    for pruned in (magnitude_prune(w, ratio), wanda_prune(w, x.norm(dim=0), ratio),
                   sparsegpt_prune(w, h, ratio, block=32)):
        assert torch.equal(_zeros_per_row(pruned), torch.full((24,), want)), _zeros_per_row(pruned)


def test_wanda_picks_lowest_weight_times_input_norm():
    """Scores |W_ij| * ||X_j||: a small weight on a loud channel survives a larger one on a quiet channel."""
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, -3.0, 2.0, 1.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 0.1])
    pruned = wanda_prune(w, norms, 0.5)
    # row 0 scores 10, 2, 3, 0.4 -> prune cols 3 and 1; row 1 scores 40, 3, 2, 0.1 -> prune 3 and 2
    assert torch.equal(pruned == 0, torch.tensor([[False, True, False, True], [False, False, True, True]]))
    assert torch.equal(pruned[pruned != 0], w[pruned != 0])   # survivors unchanged
    # magnitude alone would prune the loud channel's 1.0 in row 0
    assert magnitude_prune(w, 0.5)[0, 0] == 0


def test_sparsegpt_beats_wanda_beats_magnitude_on_output_error():
    """Calibration-aware choices lose less output error tr(dW H dW^T) at the same ratio. Margins (0.8x)
    are far from the measured ratios on this data (sparsegpt ~0.2x wanda, wanda ~0.6x magnitude) yet
    fail if compensation or the input norms are dropped."""
    x = _correlated()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    h = 2 * x.T @ x / x.shape[0]
    errs = {name: output_error(w, p, h) for name, p in (
        ("magnitude", magnitude_prune(w, 0.5)), ("wanda", wanda_prune(w, x.norm(dim=0), 0.5)),
        ("sparsegpt", sparsegpt_prune(w, h, 0.5)))}
    assert errs["sparsegpt"] < 0.8 * errs["wanda"] < 0.8 * errs["magnitude"], errs


def test_sparsegpt_without_correlation_is_wanda_like():
    """Diagonal H: nothing to compensate, so pruned weights are zeroed and survivors stay as they were."""
    k = 64
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, k, generator=g)
    h = torch.diag(torch.rand(k, generator=g) + 0.1)
    pruned = sparsegpt_prune(w, h, 0.5, block=16)
    kept = pruned != 0
    assert torch.allclose(pruned[kept], w[kept])
    assert torch.equal(_zeros_per_row(pruned), torch.full((8,), 32))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_fraction_protects_the_largest_weights(method):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2048, 128, generator=g) * (torch.rand(128, generator=g) + 0.5)
    w = torch.randn(16, 128, generator=g)
    # outliers on a quiet input channel: Wanda / SparseGPT would prune them without protection
    x[:, 5] *= 1e-3
    w[:, 5] = 4.0
    h = 2 * x.T @ x / x.shape[0]
    protect = protected_mask(w, 0.05)
    assert torch.equal(protect.sum(1), torch.full((16,), prune_count(128, 0.05)))
    assert protect[:, 5].all()
    prune = {"magnitude": lambda p: magnitude_prune(w, 0.5, p),
             "wanda": lambda p: wanda_prune(w, x.norm(dim=0), 0.5, p),
             "sparsegpt": lambda p: sparsegpt_prune(w, h, 0.5, p, block=32)}[method]
    pruned = prune(protect)
    assert (pruned[protect] != 0).all()
    assert torch.equal(_zeros_per_row(pruned), torch.full((16,), 64))
    if method != "magnitude":
        assert (prune(None)[:, 5] == 0).all()   # the protection is what kept them


def test_sparsegpt_exact_when_outliers_crowd_the_last_block():
    """Protected weights filling the last block: the row total is still exact (rest pruned by magnitude)."""
    k = 64
    w = torch.randn(4, k, generator=torch.Generator().manual_seed(5))
    w[:, 48:] = 100.0 + torch.arange(16.0)
    protect = protected_mask(w, 0.25)
    pruned = sparsegpt_prune(w, torch.eye(k), 0.75, protect, block=16)
    assert torch.equal(_zeros_per_row(pruned), torch.full((4,), 48))
    assert (pruned[protect] != 0).all()


def test_options_are_validated():
    with pytest.raises(QCError, match="ratio"):
        make_pass("sparse", {"ratio": "1.0"})
    with pytest.raises(QCError, match="method"):
        make_pass("sparse", {"method": "obs"})
    with pytest.raises(QCError, match="fraction"):
        make_pass("sparse", {"ratio": "0.95", "fraction": "0.1"})
    assert make_pass("sparse").options.method == "sparsegpt"


# ---- the pass on a tiny decoder layer ------------------------------------------------------------
_CAPTURED = {}


def _layer(folder):
    if folder not in _CAPTURED:
        ckpt = open_checkpoint(folder)
        skel = HFSkeleton(ckpt)
        ids = torch.randint(0, 250, (6, 32), generator=torch.Generator().manual_seed(1))
        inputs = skel.layer0_inputs(ids)
        _CAPTURED[folder] = (skel.capture_layer(0, inputs), inputs, ckpt.dtype)
    gm, inputs, dtype = _CAPTURED[folder]
    return copy.deepcopy(gm), inputs, dtype


def _run(folder, names, exclude=(), tail=True):
    gm, inputs, dtype = _layer(folder)
    passes = [make_pass(n, o) for n, o in names] + ([make_pass(n) for n in TAIL] if tail else [])
    ctx = LayerContext(index=0, inputs=inputs, dtype=dtype, exclude=tuple(exclude))
    results = {}
    for p in PassManager(passes).execution_order():  # schemes annotate before sparse (base.Phase)
        r = p.run(gm, ctx)
        gm, results[p.name] = r.gm, r
    return gm, ctx, results, inputs


def _forward(gm, inputs):
    with torch.no_grad():
        return gm(inputs.hidden, position_embeddings=inputs.position_embeddings).float()


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_pass_prunes_every_linear_exactly(tiny_models, method):
    gm, ctx, res, _ = _run(tiny_models["qwen2"], [("sparse", {"method": method})], exclude=[r"o_proj"],
                           tail=False)
    recs = res["sparse"].stats["linears"]
    assert set(recs) == {s.name for s in linear_sites(gm)} - {"self_attn.o_proj"}
    for site in linear_sites(gm):
        w = get_tensor(gm, site.weight.target)
        if site.name == "self_attn.o_proj":    # excluded: dense and unmarked
            assert (w != 0).all() and meta.SPARSITY not in site.node.meta
            continue
        assert w.dtype == ctx.dtype
        assert torch.equal(_zeros_per_row(w), torch.full((w.shape[0],), w.shape[1] // 2)), site.name
        assert recs[site.name]["sparsity"] == 0.5 == site.node.meta[meta.SPARSITY]
        assert ("rel_err" in recs[site.name]) == (method != "magnitude")


def test_calibration_aware_methods_lose_less_on_a_layer(tiny_models):
    """Layer output error vs the dense layer: sparsegpt and wanda below magnitude (random tiny weights
    leave Wanda little to exploit, so only a strict inequality for it; SparseGPT 0.9x)."""
    gm, inputs, _ = _layer(tiny_models["llama"])
    want = _forward(gm, inputs)
    err = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        out, _, _, _ = _run(tiny_models["llama"], [("sparse", {"method": method})], tail=False)
        err[method] = float((_forward(out, inputs) - want).norm())
    assert err["sparsegpt"] < 0.9 * err["magnitude"] and err["wanda"] < err["magnitude"], err


def test_scheme_after_sparse_keeps_zeros(tiny_models):
    for schemes in ([("w8a8", {})], [("gptq", {}), ("w8a8", {})]):
        gm, ctx, _, _ = _run(tiny_models["llama"], [("sparse", {"method": "wanda"})] + schemes)
        for name, art in ctx.artifact.items():
            q = art.tensors["weight"]
            assert ((q == 0).sum(1) >= q.shape[1] // 2).all(), (schemes, name)


def test_pipeline_order_contract():
    tail = [make_pass(n) for n in TAIL]
    for bad in (["w8a8", "sparse"], ["gptq", "sparse"], ["awq", "sparse"]):
        with pytest.raises(QCError, match="sparse must run before"):
            PassManager([make_pass(n) for n in bad] + tail).validate()
    PassManager([make_pass(n) for n in ("smooth", "sparse", "gptq", "w8a8")] + tail).validate()
    PassManager([make_pass(n) for n in ("sparse", "w4a16")] + tail).validate()


_PEAK_BODY = """
from qcompiler.passes.sparse import sparsegpt_prune
sparsegpt_prune(w[:, :64], h[:64, :64], 0.5)  # warm up
print(peak(lambda: sparsegpt_prune(w, h, 0.5)))
"""


def test_sparsegpt_holds_a_few_hessian_sized_buffers():
    """Peak memory of one SparseGPT call above the caller's H, in units of H (float32 k x k), as GPTQ's
    (tests/passes/test_gptq.py): the float64 buffer (2; the float32 factor is narrowed into its own storage) and
    transients (~0.5 at this k 2048). Its float32 copy of H (which received the factor before issue 15's
    narrowing) measured 3.47 and fails the bound 3. Measured 2.47."""
    units = hessian_peak_units(_PEAK_BODY)
    assert units < 3, f"sparsegpt_prune peaked at {units:.2f} x the Hessian's size"


_WIDE_PEAK_BODY = """
from qcompiler.passes.sparse import sparsegpt_prune
sparsegpt_prune(w[:, :64], h[:64, :64], 0.5)  # warm up
W = torch.randn(8 * k, k, generator=g)  # a weight of 8 units: 16384 x 2048 float32
print(peak(lambda: sparsegpt_prune(W, h, 0.5)))
"""


def test_sparsegpt_holds_one_weight_sized_copy():
    """Peak of one SparseGPT call on a weight 8x the Hessian's size (16384 x 2048), in units of H: the column-major
    working copy (8), the float64 factor buffer (2.5 measured) and the block loop's transients (argsort indices,
    scores: ~3.5 at n 16384). The result is the working copy's transposed view; `Wt.T.contiguous()` made a second
    weight-sized copy at the return: measured 18.07 units then, 14.07 now (the peak moved into the block loop).
    Bound 16: between the two, 2 units (32 MiB) from each."""
    units = hessian_peak_units(_WIDE_PEAK_BODY)
    assert units < 16, f"sparsegpt_prune peaked at {units:.2f} x the Hessian's size"


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_pass_reads_each_weight_once(tiny_models, method, monkeypatch):
    """`_prune_group` reads each pruned Linear's weight from the graph once (it read each twice: once for the row
    counts, once for the stacked copy). Counts the pass module's get_tensor calls per target."""
    import collections
    import qcompiler.passes.sparse as sparse_mod
    reads = collections.Counter()
    real = sparse_mod.get_tensor

    def counting(gm, target):
        reads[target] += 1
        return real(gm, target)
    monkeypatch.setattr(sparse_mod, "get_tensor", counting)
    gm, _, res, _ = _run(tiny_models["llama"], [("sparse", {"method": method})], tail=False)
    assert len(res["sparse"].stats["linears"]) == len(linear_sites(gm))
    assert reads and set(reads.values()) == {1}, dict(reads)
