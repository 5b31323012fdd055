"""awq: scale folding keeps the float function (norms, v->o without GQA, up->down, biases), the searches
never do worse than their neutral point, the chosen codes/scales reach the artifact, order contracts."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from qcompiler.backends.ascend.encode import quantize_weight
from qcompiler.config import CompileOptions
from qcompiler.driver import compile_model
from qcompiler.errors import QCError
from qcompiler.executable import read_info, read_layer_tensors
from qcompiler.ir import meta
from qcompiler.ir.capture import HFSkeleton
from qcompiler.ir.patterns import get_tensor, linear_sites
from qcompiler.loading import open_checkpoint
from qcompiler.passes import TAIL, LayerContext, PassManager, make_pass
from qcompiler.passes.awq import group_errors, scale_loss, search_clip, search_scale
from qcompiler.passes.weight_targets import WeightTarget, column_scale, dequantize

from tests.helpers import annotate, tiny_config, tiny_tokenizer

W4G32 = WeightTarget(bits=4, group=32, scheme="w4a16", quant_type="W4A16")


@pytest.fixture(scope="module")
def mha_llama(tmp_path_factory):
    """A tiny Llama without grouped-query attention (v_proj out == o_proj in), so v -> o is scaled."""
    folder = tmp_path_factory.mktemp("mha") / "llama"
    tok = tiny_tokenizer()
    cfg, cls = tiny_config("llama", len(tok))
    cfg.num_key_value_heads = cfg.num_attention_heads
    torch.manual_seed(0)
    model = cls(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


_CAPTURED = {}


def _layer(folder):
    if str(folder) not in _CAPTURED:
        ckpt = open_checkpoint(folder)
        skel = HFSkeleton(ckpt)
        inputs = skel.layer0_inputs(torch.randint(0, 250, (8, 32), generator=torch.Generator().manual_seed(1)))
        _CAPTURED[str(folder)] = (skel.capture_layer(0, inputs), inputs, ckpt.dtype)
    gm, inputs, dtype = _CAPTURED[str(folder)]
    return copy.deepcopy(gm), inputs, dtype


def _ctx(gm, inputs, dtype, passes, exclude=()):
    """A layer context, gm annotated by the scheme passes among `passes` (they run before awq: base.Phase)."""
    ctx = LayerContext(index=0, inputs=inputs, dtype=dtype, exclude=tuple(exclude))
    annotate(gm, ctx, passes)
    return ctx


def _forward(gm, inputs):
    with torch.no_grad():
        return gm(inputs.hidden, position_embeddings=inputs.position_embeddings).float()


def _rel(got, want, inputs):
    return float((got - want).norm() / (want - inputs.hidden.float()).norm())


# ---- folding ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mha"])
def test_scaling_keeps_the_float_function(tiny_models, mha_llama, arch):
    folder = mha_llama if arch == "mha" else tiny_models[arch]
    gm, inputs, dtype = _layer(folder)
    want = _forward(gm, inputs)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    passes = [make_pass("awq", {"clip": False}), make_pass("w4a16", {"group": 32})]
    stats = passes[0].run(gm, _ctx(gm, inputs, dtype, passes)).stats
    groups = stats["groups"]
    assert groups["q_proj+k_proj+v_proj"]["into"] == "input_layernorm.weight"
    assert groups["gate_proj+up_proj"]["into"] == "post_attention_layernorm.weight"
    assert groups["down_proj"]["into"] == "mlp.up_proj"
    if arch == "mha":
        assert groups["o_proj"]["into"] == "self_attn.v_proj" and not stats["skipped"]
    else:  # grouped-query attention: v channels are shared by several heads, no folding into v_proj
        assert "o_proj" in stats["skipped"] and "grouped-query" in stats["skipped"]["o_proj"]
    changed = [k for k, v in gm.state_dict().items() if not torch.equal(v, before[k])]
    assert "input_layernorm.weight" in changed and "mlp.down_proj.weight" in changed
    if groups["down_proj"]["alpha"] > 0:
        assert "mlp.up_proj.weight" in changed
    # bf16 storage of the rescaled weights is the only difference: a tiny fraction of the layer's change
    assert _rel(_forward(gm, inputs), want, inputs) < 0.02


def test_v_to_o_scaling_divides_v_bias(tmp_path):
    """Qwen2 has a v_proj bias: folding into v's rows must scale it too (function kept)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tok = tiny_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, use_sliding_window=False,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    gm, inputs, dtype = _layer(tmp_path)
    want = _forward(gm, inputs)
    bias = get_tensor(gm, "self_attn.v_proj.bias").clone()
    passes = [make_pass("awq", {"clip": False}), make_pass("w4a16", {"group": 32})]
    stats = passes[0].run(gm, _ctx(gm, inputs, dtype, passes)).stats
    assert stats["groups"]["o_proj"]["into"] == "self_attn.v_proj"
    if stats["groups"]["o_proj"]["alpha"] > 0:
        assert not torch.equal(get_tensor(gm, "self_attn.v_proj.bias"), bias)
    assert _rel(_forward(gm, inputs), want, inputs) < 0.02


def test_scaling_after_shifting_smooth_divides_the_norm_bias(tiny_models):
    """smooth:shift=true gives Qwen2's input_layernorm a bias; awq must scale it with the norm weight."""
    gm, inputs, dtype = _layer(tiny_models["qwen2"])
    passes = [make_pass("smooth", {"shift": True}), make_pass("awq", {"clip": False}),
              make_pass("w4a16", {"group": 32})]
    ctx = _ctx(gm, inputs, dtype, passes)
    passes[0].run(gm, ctx)
    want = _forward(gm, inputs)
    stats = passes[1].run(gm, ctx).stats
    assert stats["groups"]["q_proj+k_proj+v_proj"]["into"] == "input_layernorm.weight+input_layernorm.bias"
    assert _rel(_forward(gm, inputs), want, inputs) < 0.02


# ---- searches -----------------------------------------------------------------------------------------
def _synthetic(k=64, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, k, generator=g) * (torch.rand(k, generator=g) * 4) ** 2   # uneven channels
    return x, torch.randn(n, k, generator=g), x.T @ x / x.shape[0]


def test_scale_search_never_worse_than_unscaled():
    x, w, h = _synthetic()
    s, a, loss, base = search_scale(x.abs().mean(0), [w], [W4G32], h, grid=20)
    assert loss <= base
    assert loss == pytest.approx(scale_loss([w], [W4G32], h, s))
    assert a > 0 and loss < 0.95 * base   # uneven channels: scaling helps


def test_scale_search_ignores_float_consumers():
    x, w, h = _synthetic()
    assert scale_loss([w], [None], h, torch.ones(64)) == 0.0


@pytest.mark.parametrize("target", [W4G32, WeightTarget(4, 0, "w4a8d", "W4A8_DYNAMIC"),
                                    WeightTarget(8, 0, "w8a16", "W8A16")])
def test_clip_search_never_increases_the_error(target):
    x, w, h = _synthetic(seed=3)
    w[0, 3] = 6.0          # an outlier weight: clipping its group pays off
    scale, err, base = search_clip(w, h, target, clip_grid=20, max_shrink=0.5)
    assert (err <= base).all()
    absmax = w.abs().reshape(w.shape[0], -1, target.group or w.shape[1]).amax(-1)
    ratio = scale * target.qmax / absmax
    assert (ratio <= 1 + 1e-6).all() and (ratio >= 0.5 - 1e-6).all()
    # the errors reported are those of the returned scales
    q, _ = quantize_weight(w, target.bits, target.group, scale)
    g = target.group or w.shape[1]
    hb = h.reshape(w.shape[1] // g, g, w.shape[1] // g, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    torch.testing.assert_close(group_errors(w - dequantize(q, scale), hb), err)
    # and on real outputs the clipped weight is no worse than the unclipped one
    q0, s0 = quantize_weight(w, target.bits, target.group)
    y = x @ w.T
    assert (x @ dequantize(q, scale).T - y).norm() <= (x @ dequantize(q0, s0).T - y).norm() * 1.0001


# ---- the pass --------------------------------------------------------------------------------------------
def test_awq_codes_reach_the_artifact_and_beat_rtn(tiny_models):
    gm, inputs, dtype = _layer(tiny_models["llama"])
    want = _forward(gm, inputs)
    rtn = copy.deepcopy(gm)
    passes = [make_pass("w4a16", {"group": 32})] + [make_pass(n) for n in TAIL]
    ctx = _ctx(rtn, inputs, dtype, passes)
    for p in passes:
        rtn = p.run(rtn, ctx).gm
    err_rtn = _rel(_forward(rtn, inputs), want, inputs)

    passes = [make_pass("awq"), make_pass("w4a16", {"group": 32})] + [make_pass(n) for n in TAIL]
    ctx = _ctx(gm, inputs, dtype, passes)
    stats = passes[0].run(gm, ctx).stats
    assert all(v <= 1.0 for v in stats["clip_err_vs_unclipped"].values())
    assert "self_attn.q_proj" not in stats["clip_err_vs_unclipped"]   # q/k are not clipped by default
    qparams = {}
    for site in linear_sites(gm):
        q, scale = site.node.meta[meta.WEIGHT_QPARAMS]
        w = get_tensor(gm, site.weight.target).float()
        n, k = w.shape
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 7 and scale.shape == (n, k // 32)
        # the float weight is clipped to the chosen range, so its codes are the chosen ones
        assert (w.abs() <= column_scale(scale, k) * 7 * (1 + 2 ** -7)).all()
        qparams[site.name] = (q, scale)
    for p in passes[1:]:
        gm = p.run(gm, ctx).gm
    for name, (q, scale) in qparams.items():
        assert torch.equal(ctx.artifact[name].tensors["weight_scale"], scale)
    err = _rel(_forward(gm, inputs), want, inputs)
    assert err < err_rtn, (err, err_rtn)


def test_awq_respects_exclude(tiny_models):
    gm, inputs, dtype = _layer(tiny_models["llama"])
    down = get_tensor(gm, "mlp.down_proj.weight").clone()
    up = get_tensor(gm, "mlp.up_proj.weight").clone()
    passes = [make_pass("awq"), make_pass("w4a16", {"group": 32})]
    stats = passes[0].run(gm, _ctx(gm, inputs, dtype, passes, exclude=[r"mlp\.down_proj"])).stats
    assert "down_proj" not in stats["groups"]
    assert torch.equal(get_tensor(gm, "mlp.down_proj.weight"), down)
    by_name = {s.name: s for s in linear_sites(gm)}
    assert meta.WEIGHT_QPARAMS not in by_name["mlp.down_proj"].node.meta
    assert not torch.equal(get_tensor(gm, "mlp.up_proj.weight"), up)   # gate/up still scaled and clipped


def test_order_contracts():
    tail = [make_pass(n) for n in TAIL]
    with pytest.raises(QCError, match=r"pass awq must run before w4a16"):
        PassManager([make_pass("w4a16"), make_pass("awq")] + tail).validate()
    with pytest.raises(QCError, match=r"pass awq must run before gptq"):
        PassManager([make_pass("gptq"), make_pass("awq"), make_pass("w4a16")] + tail).validate()
    PassManager([make_pass("awq"), make_pass("gptq"), make_pass("w4a16")] + tail).validate()


def test_compile_with_awq_writes_the_scaled_norms(tiny_models, calib_file, tmp_path):
    """The artifact's float tensors must be the graph's (awq rescales norm weights and up_proj rows)."""
    out = tmp_path / "out"
    compile_model(CompileOptions(model=str(tiny_models["llama"]), out=out, calib=calib_file, calib_samples=4,
                                 seq_len=32, passes=[("awq", {}), ("gptq", {}), ("w4a16", {"group": 32})]),
                  log=lambda m: None)
    tensors = load_file(str(out / "quant_model_weights.safetensors"))
    layer = read_layer_tensors(out / "executable", read_info(out / "executable"), 0)
    ckpt = open_checkpoint(tiny_models["llama"])
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(tensors[norm], ckpt.tensor(norm))
    assert torch.equal(tensors[norm], layer["input_layernorm.weight"])
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["group_size"] == 32 and desc[norm] == "FLOAT"


def test_losses_use_float32_products_even_for_a_bf16_hessian():
    """The search losses multiply in float32 (a bf16 GEMM is slow on CPUs without native bf16, and the former bf16
    ranking rounded each product to 8 bits): a bf16 H is widened first, so the loss is exactly the float32 one."""
    from qcompiler.passes.awq import quadratic_rows
    g = torch.Generator().manual_seed(0)
    d = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g)
    hb = (x.T @ x).bfloat16()
    want = ((d @ hb.float()) * d).sum(-1)
    assert torch.equal(quadratic_rows(d, hb), want)
    assert not torch.equal((torch.mm(d.bfloat16(), hb).float() * d).sum(-1), want)  # the bf16 product differs


def test_hessian_rescaled_in_place_is_the_out_of_place_quotient():
    """After the fold the consumers read x / factor, so H becomes H / (f_i f_j): rescaled in place a row chunk at a
    time (the outer product and the quotient were two more k x k float32 matrices: 1.34 GiB each at a 7B down_proj),
    with the same element operations, so torch.equal to the out-of-place quotient, across a chunk boundary."""
    from qcompiler.passes.awq import _rescale_hessian_
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 70, generator=g)
    h = x.T @ x / 200
    f = torch.rand(70, generator=g) + 0.5
    want = h / (f[:, None] * f[None, :])
    got = h.clone()
    assert _rescale_hessian_(got, f, rows=16) is got
    assert torch.equal(got, want)
