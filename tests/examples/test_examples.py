"""The two example passes of README "Writing a pass", each one file under tests/examples/ plus one registry line:
a 6-bit weight-only scheme (w6a16.py) and an outlier-migration pass (equalize.py)."""
import pytest
import torch
from safetensors.torch import load_file

from qcompiler import cli
from qcompiler.ir import model_dtype as md
from qcompiler.passes import REGISTRY, LayerContext, PassManager, make_pass
from tests.examples.equalize import Equalize
from tests.examples.w6a16 import W6A16
from tests.helpers import assert_checker_clean, capture_layer_and_output, fresh_layer


@pytest.fixture
def registered(monkeypatch):
    """The registry line (`register(cls)`), undone after the test so other tests see the package's passes only."""
    def add(cls):
        monkeypatch.setitem(REGISTRY, cls.name, cls)
    return add


def _compile(model, calib, out, passes, *extra):
    argv = [model, "--passes", passes, "--calib", calib, "--calib-samples", "4", "--seq-len", "32", "-o", out, *extra]
    assert cli.main([str(a) for a in argv]) == 0
    return load_file(out / "quant_model_weights.safetensors")


def _relative_weight_error(weights, float_model) -> float:
    """sum ||W - deq||^2 / sum ||W||^2 over the decoder's quantized Linears (W from the float checkpoint)."""
    ref = {}
    for f in float_model.glob("*.safetensors"):
        ref.update(load_file(f))
    num = den = 0.0
    for name, scale in weights.items():
        if not name.endswith(".weight_scale"):
            continue
        base = name[: -len(".weight_scale")]
        w = ref[base + ".weight"].float()
        deq = weights[base + ".weight"].float() * scale.float()  # per-channel [n, 1]
        num += float(((w - deq) ** 2).sum())
        den += float((w ** 2).sum())
    return num / den


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_w6a16_writes_6_bit_codes_in_w8a16(registered, tmp_path, tiny_models, calib_file, arch):
    """Every W8A16 weight holds codes in [-31, 31] with the 6-bit scale (absmax / 31 rounded to the model dtype,
    exact: ir/model_dtype.py); the artifact is a plain W8A16 one (checker clean). Its weight error lies between
    int8's and int4's (the quantization step is 127/31 ~ 4.1x int8's, 7/31 of int4's: a strict ordering)."""
    registered(W6A16)
    w6 = _compile(tiny_models[arch], calib_file, tmp_path / "w6", "w6a16")
    w8 = _compile(tiny_models[arch], calib_file, tmp_path / "w8", "w8a16")
    codes = [t for n, t in w6.items() if n.endswith(".weight") and t.dtype == torch.int8]
    assert codes and all(int(t.abs().max()) == 31 for t in codes)
    ref = {}
    for f in tiny_models[arch].glob("*.safetensors"):
        ref.update(load_file(f))
    name = "model.layers.0.mlp.down_proj"
    want = md.engine_scale(ref[name + ".weight"].float().abs().amax(1, keepdim=True) / 31, torch.bfloat16)
    assert torch.equal(w6[name + ".weight_scale"].float(), want.float())
    e6, e8 = _relative_weight_error(w6, tiny_models[arch]), _relative_weight_error(w8, tiny_models[arch])
    assert e8 < e6 < 16 * 16 * e8  # 6 bits: coarser than 8, far finer than 4 (whose step is 127/7 ~ 18x int8's)
    assert_checker_clean(tmp_path / "w6")


def test_equalize_keeps_the_float_layer_and_flattens_outliers(tiny_models):
    """After equalize (before lowering) the layer computes the float function up to rounding the folded tensors
    to bf16 (relative error <= 2e-2: bf16 keeps 8 significant bits, ~4e-3 per weight, summed over the folds), and
    the q/k/v input's per-channel absmax spread (max / median) shrinks: the outliers went into the weights."""
    from qcompiler.calibration.linear_inputs import LayerRunner
    from qcompiler.ir.folding import find_fold_groups
    layer = capture_layer_and_output(tiny_models["llama"])
    gm, ctx = fresh_layer(layer)
    want = layer[3]

    def spread(g):
        groups, _ = find_fold_groups(g)
        norm = next(x for x in groups if x.kind == "norm")
        a = LayerRunner(g, LayerContext(index=0, inputs=ctx.inputs, dtype=ctx.dtype)).collect(
            [norm.input], hessian=False, abs_mean=False, extrema=True)[norm.input].absmax
        return float(a.max() / a.median())
    before = spread(gm)
    PassManager([Equalize(Equalize.Options(alpha=0.5)), make_pass("w8a8")]).run(gm, ctx)
    with torch.no_grad():
        got = gm(ctx.inputs.hidden, position_embeddings=ctx.inputs.position_embeddings).float()
    err = float((got - want).norm() / want.norm())
    assert err <= 2e-2, err
    assert spread(gm) < before


def test_equalize_compiles_end_to_end(registered, tmp_path, tiny_models, calib_file):
    """`--passes equalize,w8a8`: validated in the user's order (before the scheme), run after annotation; the
    artifact passes the checker and the report carries the pass's per-layer stats."""
    registered(Equalize)
    _compile(tiny_models["qwen2"], calib_file, tmp_path / "out", "equalize,w8a8")
    import json
    report = json.loads((tmp_path / "out" / "qcompile_report.json").read_text())
    assert report["passes"][:2] == ["equalize", "w8a8"]
    assert report["policy"] == "none"  # migrates_outliers: the auto policy keeps no down_proj float
    assert any("equalize" in layer["passes"] for layer in report["layers"])
    assert_checker_clean(tmp_path / "out")
