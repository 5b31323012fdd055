"""Histogram (percentile, entropy) activation observers and the MSE weight clipping search, on synthetic
tensors, plus their scheme options and one tiny-model compile per option through the artifact checker."""

import pytest
import torch

from qcompiler.backends.ascend import encode
from qcompiler.config import CompileOptions
from qcompiler.driver import compile_model
from qcompiler.errors import QCError
from qcompiler.ir import meta
from qcompiler.calibration.histogram import HistogramObserver
from qcompiler.calibration.observers import MinMaxObserver
from qcompiler.ir.qspec import Entropy, MinMax, MSEClip, Percentile
from qcompiler.calibration.weight_clip import mse_weight_scale, weight_mse
from qcompiler.passes import make_pass
from tests.helpers import ThreadRanks, assert_checker_clean


def _outlier_tensor():
    """1e6 values uniform in [-1, 1) (a fixed grid, so quantiles are known exactly) and one outlier 50."""
    x = torch.linspace(-1.0, 1.0, 1_000_001)[:-1]
    return torch.cat([x, torch.tensor([50.0])])


def _observe(obs, x, batches=4):
    for chunk in x.chunk(batches):  # several batches: exercises the re-binning when the range grows
        obs(chunk)
    return obs


def test_percentile_clips_the_outlier_to_the_computed_quantile():
    x = _outlier_tensor()
    lo, hi = _observe(HistogramObserver(Percentile(99.9)), x).range()
    # expected: the 0.1% / 99.9% quantiles of the uniform part, -0.998 and 0.998 (the outlier is 1e-6 of the
    # mass). Tolerance: one histogram bin, 2 * absmax / (2 * 2048) = 50 / 2048 = 0.0244 (module docstring).
    tol = 50 / 2048
    assert abs(lo - (-0.998)) < tol and abs(hi - 0.998) < tol
    s_pct, _ = encode.static_activation_params(lo, hi, torch.bfloat16)
    s_mm, _ = encode.static_activation_params(*_observe(MinMaxObserver(), x).range(), torch.bfloat16)
    expected = 2 * 0.998 / 255
    assert s_pct.item() == pytest.approx(expected, rel=0.03)  # bin tolerance + bf16 rounding of the scale
    assert s_mm.item() == pytest.approx(51 / 255, rel=0.01)
    assert s_pct.item() < s_mm.item() / 20


def test_percentile_100_is_minmax():
    x = _outlier_tensor()
    assert _observe(HistogramObserver(Percentile(100.0)), x).range() == (-1.0, 50.0)


def test_entropy_gives_a_finite_positive_scale_inside_the_range():
    torch.manual_seed(0)
    x = torch.randn(400_000)
    x[7] = 60.0
    obs = _observe(HistogramObserver(Entropy()), x)
    lo, hi = obs.range()
    assert obs.min <= lo < 0 < hi <= obs.max
    # the KL threshold must clip the lone outlier but keep the bulk of a unit Gaussian (|x| < 3: 99.7%)
    assert 3.0 < hi < 30.0, (lo, hi)
    s, o = encode.static_activation_params(lo, hi, torch.bfloat16)
    assert torch.isfinite(s).all() and s.item() > 0 and -128 <= o.item() <= 127


def test_histogram_of_all_zeros_and_no_data():
    obs = HistogramObserver(Entropy())
    with pytest.raises(RuntimeError):
        obs.range()
    obs(torch.zeros(10))
    assert obs.range() == (0.0, 0.0)


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 0), (4, 16)])
def test_mse_search_never_worse_than_minmax(bits, group):
    torch.manual_seed(1)
    w = torch.randn(48, 64) * 0.05
    w[3, 5] = 1.0  # an outlier row: clipping helps there
    _, s_mm = encode.quantize_weight(w, bits, group)
    s = mse_weight_scale(w, bits, group)
    assert s.shape == s_mm.shape and (s <= s_mm).all()
    assert weight_mse(w, s, bits) <= weight_mse(w, s_mm, bits)
    # per row/group too (the search is per channel/group), not only on average
    qmax = 127 if bits == 8 else 7
    n, k = w.shape
    g = s.shape[1]

    def err(scale):
        x, s3 = w.reshape(n, g, k // g), scale.unsqueeze(-1)
        return (x - torch.round(x / s3).clamp(-qmax, qmax) * s3).pow(2).sum(-1)
    assert (err(s) <= err(s_mm)).all()
    if bits == 4:  # int4 Gaussian weights: clipping strictly helps somewhere
        assert weight_mse(w, s, bits) < 0.95 * weight_mse(w, s_mm, bits)


def test_mse_search_equals_minmax_when_no_clipping_helps():
    # every value is a multiple of absmax / 7: min-max codes them exactly (zero error); any clip adds error
    torch.manual_seed(2)
    codes = torch.randint(-7, 8, (16, 32)).float()
    codes[:, 0] = 7.0
    w = codes * torch.rand(16, 1)
    w[5] = 0.0  # a zero row keeps scale 1.0 as the encoder does
    _, s_mm = encode.quantize_weight(w, 4, 0)
    s = mse_weight_scale(w, 4, 0)
    assert torch.equal(s, s_mm)


def test_observer_options_validate_and_reach_the_spec():
    spec = make_pass("w8a8", {"act_observer": "percentile", "percentile": "99.9",
                              "weight_observer": "mse"}).observed_spec()
    assert spec.activation.observer == Percentile(99.9) and spec.weight.observer == MSEClip()
    assert make_pass("w8a8", {"act_observer": "percentile"}).observed_spec().activation.observer == Percentile(99.99)
    assert make_pass("w8a8").observed_spec().activation.observer == MinMax()
    assert make_pass("w8a8", {"act_observer": "entropy"}).observed_spec().activation.observer == Entropy()
    assert make_pass("w4a16", {"weight_observer": "mse"}).observed_spec(64).weight.observer == MSEClip()
    assert make_pass("w8a8d", {"weight_observer": "mse"}).observed_spec().activation.observer == MinMax()
    for name, opts, words in [
            ("w8a8", {"act_observer": "kl"}, "act_observer must be one of minmax|percentile|entropy"),
            ("w8a8", {"percentile": "99.9"}, "needs act_observer=percentile"),
            ("w8a8", {"act_observer": "percentile", "percentile": "40"}, "percentile must be in (50, 100]"),
            ("w8a8", {"act_observer": "percentile", "percentile": "abc"}, "not a valid float"),
            ("w4a16", {"weight_observer": "gptq"}, "weight_observer must be one of minmax|mse"),
            ("w8a8d", {"act_observer": "entropy"}, "unknown option 'act_observer'")]:
        with pytest.raises(QCError) as e:
            make_pass(name, opts)
        assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("passes", [
    (("w8a8", {"act_observer": "entropy", "weight_observer": "mse"}),),
    (("w8a8", {"act_observer": "percentile", "percentile": "99.9"}),),
    (("w4a16", {"weight_observer": "mse", "group": "32"}),),
])
def test_compile_with_observers_passes_checker(tiny_models, calib_file, tmp_path, passes):
    from qcompiler.runtime import load_model
    out = tmp_path / "out"
    compile_model(CompileOptions(model=str(tiny_models["llama"]), out=out, passes=passes, calib=calib_file,
                                 calib_samples=4, seq_len=32), log=lambda m: None)
    model = load_model(str(out))  # the executable graph loads and runs on a few tokens
    ids = torch.randint(0, 250, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        h = model.layers.get(0)(model.head.embed(ids), position_embeddings=model.head.rope(8))
    assert h.shape == (1, 8, 64) and torch.isfinite(h.float()).all()
    assert_checker_clean(out)  # last: skips when ../shared is absent


def _layer(folder):
    from qcompiler.ir.capture import HFSkeleton
    from qcompiler.loading import open_checkpoint
    from qcompiler.passes import LayerContext
    ckpt = open_checkpoint(folder)
    skel = HFSkeleton(ckpt)
    inputs = skel.layer0_inputs(torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(1)))
    return skel.capture_layer(0, inputs), LayerContext(index=0, inputs=inputs, dtype=ckpt.dtype)


def test_options_reach_observers_and_lowering(tiny_models):
    from qcompiler.passes import TAIL, PassManager
    scales = {}
    for kind in ("minmax", "entropy"):
        gm, ctx = _layer(tiny_models["llama"])
        make_pass("w8a8", {"act_observer": kind}).run(gm, ctx)
        make_pass("observe").run(gm, ctx)
        mods = [gm.get_submodule(n.target) for n in gm.graph.nodes if meta.OBSERVER in n.meta]
        assert len(mods) == 4 and all(type(m) is (MinMaxObserver if kind == "minmax" else HistogramObserver)
                                      for m in mods)
        make_pass("calibrate").run(gm, ctx)
        make_pass("lower").run(gm, ctx)
        scales[kind] = ctx.artifact["mlp.down_proj"].tensors["input_scale"].item()
    assert 0 < scales["entropy"] <= scales["minmax"]
    w = {}
    for kind in ("minmax", "mse"):
        gm, ctx = _layer(tiny_models["llama"])
        PassManager([make_pass("w4a16", {"group": 32, "weight_observer": kind}),
                     *[make_pass(n) for n in TAIL]]).run(gm, ctx)
        w[kind] = ctx.artifact["mlp.down_proj"].tensors["weight_scale"]
    assert (w["mse"] <= w["minmax"]).all() and (w["mse"] < w["minmax"]).any()


def test_recipe_takes_the_same_option_names_and_values(tmp_path):
    from qcompiler.config import load_recipe
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - w8a8: {act_observer: percentile, percentile: 99.9, weight_observer: mse}\n")
    (name, opts), = load_recipe(recipe)["passes"]
    spec = make_pass(name, opts).observed_spec()
    assert spec.activation.observer == Percentile(99.9) and spec.weight.observer == MSEClip()


# ---- act_observer=histogram: PyTorch's L2 histogram search (msModelSlim's histogram observer; issue 14) -----
def test_l2_histogram_range_is_pytorchs_search():
    from torch.ao.quantization import HistogramObserver as TorchHistogramObserver
    from qcompiler.calibration.histogram import L2HistogramObserver
    torch.manual_seed(0)
    x = torch.randn(200_000)
    x[:20] = 30.0                                       # rare outliers
    ours = _observe(L2HistogramObserver(), x)
    ref = TorchHistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_affine)
    for chunk in x.chunk(4):
        ref(chunk)
    scale, zp = ref.calculate_qparams()
    lo, hi = ours.range()
    assert lo == pytest.approx(max(float((-128 - zp) * scale), float(x.min())))
    assert hi == pytest.approx(min(float((127 - zp) * scale), float(x.max())))
    assert ours.min <= lo < hi <= ours.max


def test_histogram_act_observer_option_compiles(tiny_models, calib_file, tmp_path):
    rep = compile_model(CompileOptions(model=str(tiny_models["llama"]), out=tmp_path / "o", calib=calib_file,
                                       calib_samples=2, seq_len=32,
                                       passes=(("w8a8", {"act_observer": "histogram"}),)), log=lambda m: None)
    assert rep["model_quant_type"] == "W8A8"
    assert make_pass("w8a8", {"act_observer": "histogram"}).observed_spec().activation.observer.__class__.__name__ \
        == "L2Histogram"


# ---- several processes: histograms reduced across ranks (qcompiler/distributed.py, calibration/histogram.py) ---------
def _skewed(seed=0):
    """Activations with a heavy right tail: each rank's share has its own absmax, so ranks' grids differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400_000, generator=g)
    x[::997] *= 12.0
    return x


def _reduced_on_two_ranks(monkeypatch, make, x):
    """(the two ranks' reduced observers, one process's observer) of `make()` observers, each rank fed half of
    x's 8 batches, one process fed all of them."""
    batches = list(x.chunk(8))
    one = make()
    for b in batches:
        one(b)
    ranks, shares = ThreadRanks(2), [batches[:4], batches[4:]]
    observers = [make() for _ in shares]
    ranks.patch(monkeypatch)

    def calibrate(rank, share):
        for b in share:
            observers[rank](b)
        observers[rank].reduce_across_ranks()
    ranks.run(calibrate, shares)
    a, _ = observers
    assert (a.min, a.max, a.count) == (one.min, one.max, one.count)
    return observers, one


def _two_ranks_and_one_process(monkeypatch, method, x):
    """`_reduced_on_two_ranks` for HistogramObserver(method): both ranks hold one histogram, one process's mass."""
    (a, b), one = _reduced_on_two_ranks(monkeypatch, lambda: HistogramObserver(method), x)
    assert torch.equal(a.hist, b.hist) and (a.min, a.max, a.count, a.absmax) == (b.min, b.max, b.count, b.absmax)
    assert a.absmax == one.absmax and a.hist.sum() == one.hist.sum()
    return (a, b), one


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_histogram_reduced_over_ranks_matches_one_process(monkeypatch, percentile):
    """Two ranks, each fed half the batches, reduce to one histogram: min/max/count exact, both ranks hold the
    same histogram, and a percentile range is within two bins of one process that saw every batch (each path
    leaves a value at most one final bin from exact binning; calibration/histogram.py)."""
    (a, _), one = _two_ranks_and_one_process(monkeypatch, Percentile(percentile), _skewed())
    width = 2 * one.absmax / (2 * one.bins)
    for got, want in zip(a.range(), one.range()):
        assert abs(got - want) <= 2 * width, (got, want, width)


def test_entropy_reduced_over_ranks(monkeypatch):
    """Entropy's threshold is an argmin of KL over bin edges with several near-equal minima: one process moves
    it by up to 5% by only reversing its batch order (Gaussian data, seeds 0-2: 0%, 4.4%, 5.3%). Two ranks stay
    within that order sensitivity: tolerance 10% of one process's threshold."""
    g = torch.Generator().manual_seed(1)
    (a, _), one = _two_ranks_and_one_process(monkeypatch, Entropy(), torch.randn(400_000, generator=g))
    assert a.range()[1] == pytest.approx(one.range()[1], rel=0.10)


def test_l2_histogram_reduced_over_ranks(monkeypatch):
    """PyTorch's histogram moved onto the common [min, max] and summed: counts and ends exact; the L2 search
    on it picks a range within 1% of the span of one process's (the search steps over whole bins, and the
    reduced histogram differs from one process's by bin-centre rebinning only)."""
    from qcompiler.calibration.histogram import L2HistogramObserver
    x = _skewed(1)
    (a, b), one = _reduced_on_two_ranks(monkeypatch, L2HistogramObserver, x)
    assert torch.equal(a.torch_observer.histogram, b.torch_observer.histogram)
    assert float(a.torch_observer.histogram.sum()) == x.numel()
    span = one.max - one.min
    for got, want in zip(a.range(), one.range()):
        assert abs(got - want) <= 0.01 * span, (got, want, span)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_min_max_observer_equals_the_extrema_of_the_float32_copy(dtype):
    """MinMaxObserver takes min / max in the input's dtype (no float32 copy) and widens the two values: equal to
    the extrema of x.float() for every dtype, float64 included (10 + 2**-30 rounds to 10.0 in float32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1000, generator=g, dtype=torch.float64)
    x[0, 5], x[1, 7] = -(10 + 2.0 ** -30), 10 + 2.0 ** -30  # the extremes, and not float32 values
    x = x.to(dtype)
    obs = _observe(MinMaxObserver(), x, batches=2)
    want = x.float()
    assert obs.range() == (want.min().item(), want.max().item())
    assert obs.count == x.numel()


# ---- counts past 2**24 values a call (torch.histc counts in float32 per thread) -----------------------------
from qcompiler.calibration import histogram as hg  # noqa: E402
from qcompiler.calibration.histogram import L2HistogramObserver  # noqa: E402


def test_histogram_counts_every_value_of_a_call_past_2_24():
    """2**25 + 3 values in one forward, most in the centre bins: torch.histc alone counts a bin only to 2**24 per
    thread (a 7B down_proj input of 8 x 512 tokens is 77.6M values), so the histogram must still hold every value
    (exact: integer counts in float64), and its percentile range must be that of the values."""
    n = 2 ** 25 + 3
    x = torch.zeros(n, dtype=torch.bfloat16)
    x[:1000] = torch.linspace(-1, 1, 1000, dtype=torch.bfloat16)
    obs = HistogramObserver(Percentile(99.0))
    obs(x)
    assert obs.count == n and float(obs.hist.sum()) == n
    # 99.99% of the values are 0: both quantiles lie within one bin (A / bins = 1 / 2048) of 0
    assert max(map(abs, obs.range())) <= 1 / 2048


def test_extremes_first_slices_are_a_permutation_with_the_range_in_the_first():
    g = torch.Generator().manual_seed(0)
    for n, size in [(10, 3), (10, 10), (11, 4), (2, 2), (3, 2), (1, 5), (5000, 1000)]:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, generator=g).to(dtype)
            keep = x.clone()
            chunks = list(hg.extremes_first_slices(x, size))
            assert torch.equal(x, keep)  # the caller's tensor is not written
            assert all(c.dtype == torch.float32 and c.numel() <= size for c in chunks)
            assert torch.equal(torch.cat(chunks).sort().values, x.float().sort().values)
            assert chunks[0].min() == x.float().min() and chunks[0].max() == x.float().max()
    x = torch.tensor([1.0, float("inf"), -2.0, float("-inf"), 3.0])
    assert torch.equal(torch.cat(list(hg.extremes_first_slices(x, 2))).sort().values, torch.tensor([-2.0, 1.0, 3.0]))


def test_l2_histogram_fed_in_slices_equals_one_call(monkeypatch):
    """Past HISTC_MAX_VALUES values a forward feeds torch's observer slices with the range in the first: its
    histogram, range and qparams must equal those of one call (here the limit is lowered to 1000 values so the
    one-call reference still counts exactly); the second batch widens the range (the rebinning path)."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(64, 80, generator=g), 3 * torch.randn(64, 80, generator=g)]
    whole, sliced = L2HistogramObserver(), L2HistogramObserver()
    for b in batches:
        whole(b)
    monkeypatch.setattr(hg, "HISTC_MAX_VALUES", 1000)
    for b in batches:
        sliced(b)
    assert torch.equal(sliced.torch_observer.histogram, whole.torch_observer.histogram)
    assert sliced.range() == whole.range() and sliced.count == whole.count
