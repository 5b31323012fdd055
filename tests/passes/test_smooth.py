"""smooth: groups found by dataflow, folding keeps the float layer function (float32 tight, bf16 loose),
GQA scale sharing, alpha search and fixed alpha, the order contract, shift structure, and the float
tensors the artifact must take from the transformed graph."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from qcompiler.errors import QCError
from qcompiler.ir import meta
from tests.helpers import collect_linear_input_stats, peak_in_subprocess
from qcompiler.ir.capture import HFSkeleton
from qcompiler.ir.patterns import get_tensor, linear_sites
from qcompiler.loading import open_checkpoint
from qcompiler.passes import TAIL, LayerContext, PassManager, make_pass
from qcompiler.passes.instruments import StatsInstrument
from qcompiler.ir.folding import find_fold_groups
from qcompiler.passes.smooth import smooth_scales
from tests.helpers import annotate, assert_checker_clean

aten = torch.ops.aten


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory):
    """Tiny float32 checkpoints: capture in float32 too, so folding can be checked to float32 rounding."""
    from tests.helpers import make_tiny_model
    root = tmp_path_factory.mktemp("tiny32")
    return {a: make_tiny_model(root / a, a, dtype=torch.float32) for a in ("llama", "qwen2", "qwen3")}


_CAPTURED = {}


class _Layer:
    """A captured layer 0 (captured once per model/dtype/outlier; `_gm` hands out fresh copies)."""

    def __init__(self, skel, inputs, gm):
        self.skel, self.ckpt, self.inputs, self._gm = skel, skel.ckpt, inputs, gm


def _setup(folder, dtype=None, outlier=None):
    key = (str(folder), dtype, outlier)
    if key not in _CAPTURED:
        ckpt = open_checkpoint(folder)
        if dtype is not None:
            ckpt.dtype = dtype  # float32: not a compile dtype, but capture and passes work in it
        skel = HFSkeleton(ckpt)
        inputs = skel.layer0_inputs(torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(1)))
        if outlier is not None:  # a massive channel in the residual stream, as real LLMs have
            inputs.hidden[..., outlier] *= 40
        _CAPTURED[key] = _Layer(skel, inputs, skel.capture_layer(0, inputs))
    layer = _CAPTURED[key]
    return layer, LayerContext(index=0, inputs=layer.inputs, dtype=torch.bfloat16)


def _gm(layer, ctx, scheme="w8a8"):
    """A fresh copy of the layer graph, annotated by `scheme` (None: not annotated) as the PassManager does
    before smooth runs (passes/base.py Phase): smooth reads each Linear's spec from its node."""
    gm = copy.deepcopy(layer._gm)
    return annotate(gm, ctx, [make_pass(scheme)]) if scheme else gm


def _run(gm, ctx):
    with torch.no_grad():
        return gm(ctx.inputs.hidden, position_embeddings=ctx.inputs.position_embeddings).float()


def _rel(got, want, resid):
    """Error relative to the layer's own contribution (output - residual input)."""
    return float((got - want).norm() / (want - resid.float()).norm())


def test_groups_found_by_dataflow(tiny_models):
    layer, ctx = _setup(tiny_models["qwen2"])
    groups, skipped = find_fold_groups(_gm(layer, ctx))
    assert skipped == {}
    got = [(g.kind, g.producer, [s.name for s in g.sites], g.heads) for g in groups]
    assert got == [
        ("norm", "input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], None),
        ("attn_v", "self_attn.v_proj", ["self_attn.o_proj"], (4, 2, 16)),
        ("norm", "post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], None),
        ("mlp_up", "mlp.up_proj", ["mlp.down_proj"], None),
    ]


# Folding in float32 is exact up to float32 rounding (~1e-7 relative); 1e-5 is a tight bound.
@pytest.mark.parametrize("arch,options", [("llama", {"grid": "4"}), ("qwen2", {"alpha": "0.8", "shift": "true"}),
                                          ("qwen3", {"alpha": "0.5"}), ("qwen2", {"grid": "4", "shift": "true"})])
def test_fold_keeps_float_function_float32(f32_models, arch, options):
    layer, ctx = _setup(f32_models[arch], torch.float32, outlier=5)
    want = _run(_gm(layer, ctx), ctx)
    gm = _gm(layer, ctx)
    result = make_pass("smooth", options).run(gm, ctx)
    assert result.modified and len(result.stats["alphas"]) == 4
    assert _rel(_run(gm, ctx), want, ctx.inputs.hidden) < 1e-5


# bf16: the folded norm weights, Linear weights and biases are rounded to bf16 again (2^-9 relative each),
# so the layer's contribution moves by ~1% (measured 0.75-0.9%); 3% is the bound.
@pytest.mark.parametrize("arch,options", [("llama", {"alpha": "0.5"}), ("qwen2", {"alpha": "0.8", "shift": "true"}),
                                          ("qwen3", {"alpha": "0.8"})])
def test_fold_keeps_float_function_bf16(tiny_models, arch, options):
    layer, ctx = _setup(tiny_models[arch])
    want = _run(_gm(layer, ctx), ctx)
    gm = _gm(layer, ctx)
    make_pass("smooth", options).run(gm, ctx)
    assert _rel(_run(gm, ctx), want, ctx.inputs.hidden) < 0.03


def test_gqa_scales_shared_by_query_heads_of_a_kv_head(f32_models):
    """4 query heads, 2 kv heads: o_proj columns of heads 0,1 share v_proj rows of kv head 0 (2,3: kv head 1)."""
    layer, ctx = _setup(f32_models["llama"], torch.float32)
    before = _gm(layer, ctx)
    gm = _gm(layer, ctx)
    make_pass("smooth", {"alpha": "0.5"}).run(gm, ctx)
    o0, o1 = get_tensor(before, "self_attn.o_proj.weight"), get_tensor(gm, "self_attn.o_proj.weight")
    v0, v1 = get_tensor(before, "self_attn.v_proj.weight"), get_tensor(gm, "self_attn.v_proj.weight")
    s = (o1 / o0)[0].view(4, 16)                       # column scales, per query head
    torch.testing.assert_close(s[0], s[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(s[2], s[3], rtol=1e-6, atol=0)
    assert not torch.allclose(s[0], s[2])              # the two kv heads get their own scales
    # v_proj's columns carry the q/k/v group's scales (read off q_proj), its rows 1 / (their kv head's scale)
    cols = (get_tensor(gm, "self_attn.q_proj.weight") / get_tensor(before, "self_attn.q_proj.weight"))[0]
    row = (v0 * cols / v1)[:, 0].view(2, 16)
    torch.testing.assert_close(row, s[[0, 2]], rtol=1e-5, atol=0)
    # and the shared scale is the max over the group's heads of the per-column formula
    x = collect_linear_input_stats(before, ctx, ["self_attn.o_proj"])
    (st,) = x.values()
    per_col = smooth_scales(st.absmax, o0.abs().amax(0), 0.5).view(2, 2, 16)
    torch.testing.assert_close(s.view(2, 2, 16)[:, 0], per_col.amax(1), rtol=1e-5, atol=0)


def test_fixed_alpha_is_the_formula(tiny_models):
    layer, ctx = _setup(tiny_models["llama"])
    before = _gm(layer, ctx)
    gm = _gm(layer, ctx)
    result = make_pass("smooth", {"alpha": "0.3"}).run(gm, ctx)
    assert set(result.stats["alphas"].values()) == {0.3}
    assert "mse" not in result.stats  # nothing searched
    stats = collect_linear_input_stats(before, ctx, ["mlp.gate_proj"])
    (st,) = stats.values()
    w = torch.stack([get_tensor(before, f"mlp.{n}_proj.weight").float().abs().amax(0) for n in ("gate", "up")])
    s = smooth_scales(st.absmax, w.amax(0), 0.3)
    norm = get_tensor(before, "post_attention_layernorm.weight")
    assert torch.equal(get_tensor(gm, "post_attention_layernorm.weight"), (norm.float() / s).to(norm.dtype))
    up = get_tensor(before, "mlp.gate_proj.weight")
    assert torch.equal(get_tensor(gm, "mlp.gate_proj.weight"), (up.float() * s).to(up.dtype))


def test_alpha_search_picks_from_grid_and_records(tiny_models):
    layer, ctx = _setup(tiny_models["llama"], outlier=7)
    gm = _gm(layer, ctx)
    pm = PassManager([make_pass("smooth", {"grid": "4"}), make_pass("w8a8")], instruments=[StatsInstrument()])
    pm.run(gm, ctx)
    rec = ctx.records["smooth"]
    assert set(rec["alphas"]) == {"input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"}
    assert set(rec["alphas"].values()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert set(rec["schemes"].values()) == {"W8A8"}
    for before, after in rec["mse"].values():
        assert after > 0 and before > 0
    # the outlier channel of the residual stream makes static per-tensor int8 of the norm output bad;
    # smoothing migrates it: the chosen alpha is strong and the group error falls a lot
    before, after = rec["mse"]["input_layernorm"]
    assert rec["alphas"]["input_layernorm"] >= 0.5 and after < 0.5 * before


def test_search_follows_a_dynamic_scheme(tiny_models):
    layer, ctx = _setup(tiny_models["llama"])
    me = make_pass("smooth", {"grid": "2"})
    result = me.run(_gm(layer, ctx, "w8a8d"), ctx)
    assert set(result.stats["schemes"].values()) == {"W8A8_DYNAMIC"}


def test_smooth_reads_the_spec_not_the_pipeline(tiny_models):
    """No look-ahead: on a layer no scheme annotated (smooth run alone) nothing is smoothed (it used to assume
    a static w8a8 would follow); the spec on each Linear's node is the only source."""
    layer, ctx = _setup(tiny_models["llama"])
    gm = _gm(layer, ctx, None)
    result = make_pass("smooth", {"alpha": "0.5"}).run(gm, ctx)
    assert not result.modified and result.stats["alphas"] == {}
    assert set(result.stats["skipped"].values()) == {"no scheme quantizes these Linears"}


def test_groups_no_scheme_quantizes_are_left_alone(tiny_models):
    layer, ctx = _setup(tiny_models["llama"])
    ctx.exclude = (r"mlp\.down_proj",)
    before = _gm(layer, ctx)
    gm = _gm(layer, ctx)
    result = make_pass("smooth", {"alpha": "0.5"}).run(gm, ctx)
    assert "mlp.up_proj" not in result.stats["alphas"]
    assert "mlp.down_proj" in result.stats["skipped"]
    assert torch.equal(get_tensor(gm, "mlp.down_proj.weight"), get_tensor(before, "mlp.down_proj.weight"))


def test_order_contract():
    with pytest.raises(QCError, match="smooth must run before w8a8"):
        PassManager([make_pass(n) for n in ("w8a8", "smooth", *TAIL)]).validate()
    assert "smoothed" in PassManager([make_pass(n) for n in ("smooth", "w8a8", *TAIL)]).validate()


@pytest.mark.parametrize("bad", [{"alpha": "1.5"}, {"grid": "0"}, {"tokens": "4"}, {"shift": "maybe"}, {"beta": "1"},
                                 {"subgraphs": "norm-linear+qkv"}, {"match": "("}])
def test_bad_options(bad):
    with pytest.raises(QCError):
        make_pass("smooth", bad)


def _params(gm):
    return {k for k, _ in gm.named_parameters()}


def test_shift_structure(tiny_models):
    """shift off: only values change. shift on (qwen2): input_layernorm gains a bias read by a new add, q/k/v's
    biases absorb W @ z; gate/up have no bias in the architecture, so that group is smoothed without shift."""
    layer, ctx = _setup(tiny_models["qwen2"])
    plain = _gm(layer, ctx)
    n_nodes = len(plain.graph.nodes)
    params = _params(plain)
    make_pass("smooth", {"alpha": "0.5"}).run(plain, ctx)
    assert len(plain.graph.nodes) == n_nodes and _params(plain) == params   # only values change

    before = _gm(layer, ctx)
    gm = _gm(layer, ctx)
    result = make_pass("smooth", {"alpha": "0.5", "shift": "true"}).run(gm, ctx)
    assert _params(gm) - params == {"input_layernorm.bias"}
    assert set(result.stats["shift_skipped"]) == {"post_attention_layernorm"}
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.add.Tensor
            and isinstance(n.args[1], torch.fx.Node) and str(n.args[1].target).endswith("norm.bias")]
    assert len(adds) == 1
    assert adds[0].args[0].target == aten.mul.Tensor      # the norm's mul feeds the add ...
    assert sorted(u.meta[meta.LINEAR_NAME] for u in adds[0].users) == [  # ... and the add feeds q/k/v only
        "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert not torch.equal(get_tensor(gm, "self_attn.q_proj.bias"), get_tensor(before, "self_attn.q_proj.bias"))

    llama, lctx = _setup(tiny_models["llama"])
    lgm = _gm(llama, lctx)
    result = make_pass("smooth", {"alpha": "0.5", "shift": "true"}).run(lgm, lctx)
    assert set(result.stats["shift_skipped"]) == {"input_layernorm", "post_attention_layernorm"}
    assert len(lgm.graph.nodes) == len(_gm(llama, lctx).graph.nodes)
    assert not [k for k in _params(lgm) if k.endswith(".bias")]


def test_shift_then_w8a8_lowers_and_stays_close(tiny_models):
    layer, ctx = _setup(tiny_models["qwen2"])
    want = _run(_gm(layer, ctx), ctx)
    gm = _gm(layer, ctx)
    passes = [make_pass("smooth", {"grid": "4", "shift": "true"}), make_pass("w8a8")] + [make_pass(n) for n in TAIL]
    gm = PassManager(passes).run(gm, ctx)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.linear.default not in targets and targets.count(torch.ops.qc.quant_matmul.default) == 7
    assert set(ctx.artifact["self_attn.q_proj"].tensors) >= {"bias", "quant_bias"}
    assert _rel(_run(gm, ctx), want, ctx.inputs.hidden) < 0.10


def test_compiled_artifact_reproduces_the_executable_layer(tiny_models, calib_file, tmp_path):
    """The artifact takes the layer's float tensors from the transformed graph: its folded norm weights, the
    new norm bias and the Linear biases (in quant_bias) compute exactly what the executable layer computes."""
    from qcompiler import driver
    from qcompiler.config import CompileOptions
    from qcompiler.runtime import load_model
    from tests.helpers import apply_rope, w8a8_linear
    out = tmp_path / "out"
    driver.compile_model(CompileOptions(model=str(tiny_models["qwen2"]), out=out, calib=calib_file, calib_samples=4,
                                        seq_len=32, passes=(("smooth", {"grid": "4", "shift": "true"}), ("w8a8", {}))),
                         log=lambda m: None)
    t = load_file(str(out / "quant_model_weights.safetensors"))
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["model.layers.0.input_layernorm.bias"] == "FLOAT"
    ckpt = open_checkpoint(tiny_models["qwen2"])
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):  # folded, not the checkpoint's
        assert not torch.equal(t["model.layers.0." + name], ckpt.tensor("model.layers.0." + name))
    cfg = json.loads((out / "config.json").read_text())
    report = json.loads((out / "qcompile_report.json").read_text())
    assert set(report["layers"][0]["passes"]["smooth"]["alphas"]) == {
        "input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"}
    model = load_model(out)
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(3))
    h = model.head.embed(ids)
    cos, sin = model.head.rope(24)
    dt = torch.bfloat16
    pre = "model.layers.0."
    lin = lambda name, x: w8a8_linear(x, {k[len(pre + name) + 1:]: v for k, v in t.items()  # noqa: E731
                                           if k.startswith(pre + name + ".")}, dt)

    def norm(x, name):
        x32 = x.float()
        rms = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg["rms_norm_eps"])
        y = t[pre + name + ".weight"] * rms.to(dt)
        return y + t[pre + name + ".bias"] if pre + name + ".bias" in t else y
    b, s, hd = 2, 24, 16
    x = norm(h, "input_layernorm")
    q = lin("self_attn.q_proj", x).view(b, s, 4, hd).transpose(1, 2)
    k = lin("self_attn.k_proj", x).view(b, s, 2, hd).transpose(1, 2)
    v = lin("self_attn.v_proj", x).view(b, s, 2, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd ** -0.5, enable_gqa=True)
    h2 = h + lin("self_attn.o_proj", att.transpose(1, 2).reshape(b, s, -1))
    x = norm(h2, "post_attention_layernorm")
    want = h2 + lin("mlp.down_proj", torch.nn.functional.silu(lin("mlp.gate_proj", x)) * lin("mlp.up_proj", x))
    with torch.inference_mode():
        got = model.layers.get(0)(h, position_embeddings=(cos, sin))
    assert torch.equal(got, want), (got - want).abs().max()
    assert_checker_clean(out)  # last: skips when ../shared is absent


# ---- selection and exponents as msModelSlim's processors take them (issue 14) ------------------------------
def test_subgraphs_and_match_select_the_groups(tiny_models):
    """subgraphs= uses msModelSlim's subgraph type names; match= is searched in the group's source module."""
    layer, ctx = _setup(tiny_models["llama"])
    result = make_pass("smooth", {"alpha": "0.5", "subgraphs": "norm-linear+up-down"}).run(_gm(layer, ctx), ctx)
    assert set(result.stats["alphas"]) == {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"}
    result = make_pass("smooth", {"alpha": "0.5", "subgraphs": "ov"}).run(_gm(layer, ctx), ctx)
    assert set(result.stats["alphas"]) == {"self_attn.v_proj"}
    result = make_pass("smooth", {"alpha": "0.5", "match": r"layers\.0\.post_attention_layernorm$"}).run(
        _gm(layer, ctx), ctx)
    assert set(result.stats["alphas"]) == {"post_attention_layernorm"}
    result = make_pass("smooth", {"alpha": "0.5", "subgraphs": "linear-linear"}).run(_gm(layer, ctx), ctx)
    assert result.stats["alphas"] == {} and not result.modified   # no linear-linear subgraph in a dense layer


def test_beta_is_the_weight_exponent(tiny_models):
    """s = act^alpha / w^beta (msModelSlim flex smooth, FlexSmoothScaleCalculator.compute_smooth_scale)."""
    layer, ctx = _setup(tiny_models["llama"])
    before = _gm(layer, ctx)
    gm = _gm(layer, ctx)
    make_pass("smooth", {"alpha": "0.75", "beta": "0.1", "subgraphs": "norm-linear"}).run(gm, ctx)
    (st,) = collect_linear_input_stats(before, ctx, ["mlp.gate_proj"]).values()
    w = torch.stack([get_tensor(before, f"mlp.{n}_proj.weight").float().abs().amax(0) for n in ("gate", "up")])
    a, wmax = st.absmax.float(), w.amax(0)
    s = (a.clamp_min(1e-12).pow(0.75) / wmax.clamp_min(1e-12).pow(0.1)).clamp(1e-5, 1e5)
    torch.testing.assert_close(smooth_scales(st.absmax, w.amax(0), 0.75, beta=0.1), s)
    norm = get_tensor(before, "post_attention_layernorm.weight")
    assert torch.equal(get_tensor(gm, "post_attention_layernorm.weight"), (norm.float() / s).to(norm.dtype))


# ---- the alpha search in row chunks of the weights (issue 15: memory at real widths) --------------------------
from qcompiler.calibration.linear_inputs import InputStats  # noqa: E402
from qcompiler.ir import qnumerics as qn  # noqa: E402
from qcompiler.ir.qspec import LinearQuantSpec, PerChannel, PerGroup, PerTensor, PerToken, TensorQuant  # noqa: E402
from qcompiler.passes import smooth as sm  # noqa: E402

_W8 = TensorQuant(8, True, PerChannel())
_SPECS = {
    "w8a8": LinearQuantSpec("W8A8", _W8, TensorQuant(8, False, PerTensor()), "t"),
    "w8a8d": LinearQuantSpec("W8A8_DYNAMIC", _W8, TensorQuant(8, True, PerToken(), dynamic=True), "t"),
    "w8a16": LinearQuantSpec("W8A16", _W8, None, "t"),
    "w4a16g16": LinearQuantSpec("W4A16", TensorQuant(4, True, PerGroup(16)), None, "t"),
}
_ROW_CUTS = [slice(0, 8), slice(8, 48), slice(48, 200)]  # multiples of 8 (smooth's chunks are)


def _search_case(n=200, k=64, tokens=48, seed=0):
    """Samples with an outlier channel, their stats, two bf16 weights [n, k] (a gate/up-like group)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * tokens, k, generator=g)
    x[:, 3] *= 30
    st = InputStats(xtx=None, abs_sum=torch.zeros(k, dtype=torch.float64), rows=x.shape[0],
                    min=x.amin(0), max=x.amax(0), samples=x[:tokens].clone())
    weights = [(torch.randn(n, k, generator=g) * 0.05).bfloat16() for _ in range(2)]
    return st, weights


def _legacy_group_error(x, weights, specs, s, stats):
    """The search's MSE before it ran in chunks (main 5963e75 `group_error` with its caller's float32 copies and
    whole-width refs), kept as the reference for the one-chunk case."""
    weights = [w.float() for w in weights]
    refs = [x @ w.T for w in weights]
    act = next(sp.activation for sp in specs if sp is not None)
    lo = hi = 0.0
    if act is not None and not act.dynamic:
        lo, hi = float((stats.min / s).min()), float((stats.max / s).max())
    xs = x / s
    xq = sm.quant_activation(xs, act, lo, hi) if act is not None else None
    total, count = 0.0, 0
    for w, spec, ref in zip(weights, specs, refs):
        ws = w * s
        if spec is None:
            out = xs @ ws.T
        elif xq is None:
            out = xs @ sm.quant_weight(ws, spec.weight).dequant().T
        else:
            out = sm.quant_matmul(xq, sm.quant_weight(ws, spec.weight))
        out -= ref
        total += float(torch.linalg.vector_norm(out)) ** 2
        count += out.numel()
    return total / count


@pytest.mark.parametrize("scheme", sorted(_SPECS))
def test_search_chunks_have_the_unchunked_codes_and_outputs(scheme):
    """A row chunk of a Linear quantizes to the rows of the whole weight's codes and scales (per-channel and
    per-group quantization are per row), bit for bit; through the exact int8 product (w8a8, w8a8d) its output
    columns are the whole output's, bit for bit. Float products (weight-only schemes here) are float32 GEMMs whose
    blocking follows the width: equal to float32 rounding (rtol 1e-5, atol 1e-5 on outputs of magnitude ~1)."""
    st, (w, _) = _search_case()
    spec = _SPECS[scheme]
    s = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(2)) + 0.5
    whole = sm.quant_weight(w.float() * s, spec.weight)
    parts = [sm.quant_weight(w[sl].float() * s, spec.weight) for sl in _ROW_CUTS]
    assert torch.equal(torch.cat([p.codes for p in parts]), whole.codes)
    assert torch.equal(torch.cat([p.scale for p in parts]), whole.scale)
    xs = st.samples / s
    xq = (sm.quant_activation(xs, spec.activation, float((st.min / s).min()), float((st.max / s).max()))
          if spec.activation is not None else None)
    out = sm._chunk_output(xs, xq, w, spec, s)
    got = torch.cat([sm._chunk_output(xs, xq, w[sl], spec, s, w.shape[0]) for sl in _ROW_CUTS], 1)
    if xq is not None:
        assert torch.equal(got, out)
    else:
        torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("specs", [("w8a8", "w8a8"), ("w8a8d", "w8a8d"), ("w8a16", "w8a16"),
                                   ("w4a16g16", "w4a16g16"), (None, "w8a8")])
def test_group_error_one_chunk_is_the_unchunked_formula_several_chunks_within_1e6(specs):
    """One chunk per Linear (every SmolLM2 / tiny Linear at the default ROW_CHUNK_ELEMENTS): the MSE is the old
    unchunked formula's bit for bit. Several chunks: the float32 norm is taken per chunk and the squares summed in
    float64 (and float GEMMs may block differently), a different summation order: relative difference ~1e-7 here (a
    few float32 ulps, 2^-24 = 6e-8 each, over 48 x 200 outputs); 1e-6 bounds it. (At 7B widths the one-chunk
    float32 norm itself is off by ~2e-3 over 19M squares: bench/probe_smooth_memory.py.)"""
    st, weights = _search_case()
    specs = [None if n is None else _SPECS[n] for n in specs]
    s = sm.smooth_scales(st.absmax, sm.column_absmax(weights), 0.5)
    x = st.samples
    one = sm.float_outputs(x, weights)
    assert [len(c) for c in one] == [1, 1]
    want = _legacy_group_error(x, weights, specs, s, st)
    assert sm.group_error(x, one, weights, specs, s, st) == want
    several = sm.float_outputs(x, weights, elements=64 * 24)  # 24 rows a chunk: 9 chunks of 200 rows
    assert [len(c) for c in several] == [9, 9]
    got = sm.group_error(x, several, weights, specs, s, st)
    assert abs(got - want) <= 1e-6 * want, (got, want)


def test_column_absmax_in_chunks_is_exact():
    _, weights = _search_case()
    want = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)
    assert torch.equal(sm.column_absmax(weights), want)
    assert torch.equal(sm.column_absmax(weights, elements=64 * 5), want)



def test_column_absmax_of_empty_linears():
    """A Linear without rows adds nothing to the column maxima (amax over no rows raised); with no rows at all every
    column's max is 0.0 (|W| >= 0), float32 [k] as otherwise."""
    w = torch.tensor([[1.0, -3.0], [-2.0, 0.5]], dtype=torch.bfloat16)
    empty = torch.zeros(0, 2, dtype=torch.bfloat16)
    assert torch.equal(sm.column_absmax([empty, w, empty]), torch.tensor([2.0, 3.0]))
    assert torch.equal(sm.column_absmax([empty]), torch.zeros(2))

def test_fold_in_row_chunks_is_exact(monkeypatch):
    """fold rescales weights in row chunks (elementwise: the unchunked formula's values)."""
    from qcompiler.ir import folding
    _, (w, _) = _search_case()
    s = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(3)) + 0.5
    r = torch.rand(w.shape[0], generator=torch.Generator().manual_seed(4)) + 0.5
    monkeypatch.setattr(qn, "ROW_CHUNK_ELEMENTS", 64 * 7)
    assert torch.equal(folding._rescaled(w, columns=s), (w.float() * s).to(w.dtype))
    assert torch.equal(folding._rescaled(w, rows=r), (w.float() / r[:, None]).to(w.dtype))


def test_pass_with_small_chunks_chooses_the_same(tiny_models, monkeypatch):
    """The whole pass with every weight in chunks of 16 rows (ROW_CHUNK_ELEMENTS 1024 / width 64: gate/up 8 chunks,
    q/k/v 4 / 2 / 2, fold's too) vs at the default (one chunk each): the same alphas and the same smoothed layer,
    bit for bit; the recorded MSEs (4 significant digits) within 1e-3 relative (the summation order, ~1e-7, may
    move the 4th digit)."""
    layer, ctx = _setup(tiny_models["llama"], outlier=7)
    ref = make_pass("smooth", {"grid": "8"}).run(_gm(layer, ctx), ctx)
    monkeypatch.setattr(qn, "ROW_CHUNK_ELEMENTS", 1024)
    got = make_pass("smooth", {"grid": "8"}).run(_gm(layer, ctx), ctx)
    assert got.stats["alphas"] == ref.stats["alphas"]
    for name, (b, a) in ref.stats["mse"].items():
        gb, ga = got.stats["mse"][name]
        assert abs(gb - b) <= 1e-3 * b and abs(ga - a) <= 1e-3 * a, (name, (gb, ga), (b, a))
    want = dict(ref.gm.named_parameters())
    for name, p in got.gm.named_parameters():
        assert torch.equal(p, want[name]), name


_SEARCH_PEAK_SCRIPT = """
import gc, re, sys, torch
from qcompiler.calibration.linear_inputs import InputStats
from qcompiler.ir import qnumerics as qn
from qcompiler.ir.qspec import LinearQuantSpec, PerChannel, PerTensor, TensorQuant
from qcompiler.passes import smooth as sm
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
torch.set_num_threads(1)
n, k, t = 8192, 1024, 64
qn.ROW_CHUNK_ELEMENTS = 1 << 18  # 256 rows a chunk: 32 per Linear
g = torch.Generator().manual_seed(0)
x = torch.randn(t, k, generator=g)
x[:, :4] *= 20
st = InputStats(xtx=None, abs_sum=torch.zeros(k, dtype=torch.float64), rows=t, min=x.amin(0), max=x.amax(0), samples=x)
weights = [torch.empty(n, k, dtype=torch.bfloat16) for _ in range(2)]
for w in weights:
    for r in range(0, n, 256):
        w[r:r + 256] = torch.randn(256, k, generator=g) * 0.02
spec = LinearQuantSpec("W8A8", TensorQuant(8, True, PerChannel()), TensorQuant(8, False, PerTensor()), "t")
def search(ws, xs):
    return sm.search_alpha(xs, ws, [spec, spec], st, st.absmax, sm.column_absmax(ws), [0.0, 0.5, 1.0])
search([w[:512] for w in weights], x)  # warm up (libraries, kernels and their buffers for these GEMM shapes)
gc.collect()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
search(weights, x)
print((status("VmHWM") - before) / (n * k * 4))
"""


def test_search_memory_does_not_grow_with_the_output_width():
    """Peak memory of one group's search (2 Linears 1024 -> 8192, bf16, 64 sample rows, 3 alphas) above the caller's
    samples and weights, in units of one Linear's weight in float32 (32 MiB), with ROW_CHUNK_ELEMENTS 2^18 (chunks
    of 256 rows): the float outputs (2 x 64 x 8192 float32: 0.125) and one chunk's temporaries. Measured 0.20-0.23
    (tests.helpers.peak_in_subprocess fixes glibc's mmap threshold; without it freed temporaries sometimes stayed in
    the heap: 0.1-2.0). The same search in one chunk: 3.3 (whole-weight float32 temporaries); the code before
    chunking (float32 copies of both weights, main 5963e75): 6.1 without the fixed threshold. Bound 1."""
    units = peak_in_subprocess(_SEARCH_PEAK_SCRIPT)
    assert units < 1, f"the search peaked at {units:.2f} x a float32 weight"


# ---- collect's extrema and row samples without a float32 copy of the input (issue 15: memory at real widths) --
def test_collect_extrema_and_samples_of_bf16_inputs_equal_those_of_the_float32_copy(tiny_models):
    """The extrema are taken in the input's bf16 and widened after, the sampler widens only its rows: the values
    must equal those of `x.float()` exactly (min / max are picks and bf16 -> float32 is exact), float32 out."""
    from qcompiler.calibration.linear_inputs import LayerRunner, _RowSampler
    layer, ctx = _setup(tiny_models["llama"])
    gm = _gm(layer, ctx)
    node = {s.name: s for s in linear_sites(gm)}["mlp.down_proj"].input
    runner = LayerRunner(gm, ctx)
    (st,) = runner.collect([node], hessian=False, abs_mean=False, extrema=True, keep=[node], keep_rows=7,
                           seed=3).values()
    x = torch.cat([v.reshape(-1, v.shape[-1]) for v in runner.cache[node]])
    assert x.dtype == torch.bfloat16  # the case that used to be widened whole
    x32 = x.float()
    assert st.min.dtype == st.max.dtype == st.samples.dtype == torch.float32
    assert torch.equal(st.min, x32.amin(0)) and torch.equal(st.max, x32.amax(0))
    assert torch.equal(st.samples, x32[_RowSampler(7, x.shape[0], 3).keep])
