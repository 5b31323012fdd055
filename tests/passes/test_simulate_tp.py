"""simulate_tp (msModelSlim tp_size): the row-parallel Linears computed as N cards compute them.

Layer-level: every scheme's lowered layer equals an independent per-card formula written from the artifact
tensors (each card: its k columns, its own per-token scale for dynamic schemes, bias / quant_bias on card 0,
partial outputs in the model dtype summed in float32 and rounded once). Model-level: the artifact is the one
without simulate_tp (engines shard it themselves), checks before any work, and the mapping of --tp_size.
"""
import json

import pytest
import torch

from qcompiler import cli
from qcompiler.config import CompileOptions
from qcompiler.driver import compile_model
from qcompiler.errors import QCError
from qcompiler.ir import meta
from qcompiler.passes import make_pass
from tests.helpers import (dynamic_linear, fresh_layer, linear_params, reference_layer, run_passes, unpack_int4,
                           w4a8_linear, w8a8_linear)

ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def _card(p: dict, r: int, n: int, k: int) -> dict:
    """Card r's view of one Linear's artifact tensors: its k columns (packed int4 along k: k/2 columns; per-group
    scales and W4A8_DYNAMIC's weight_scale_second: its groups), bias / quant_bias on card 0 only."""
    out = {}
    for name, t in p.items():
        if name in ("weight", "weight_scale_second") or (name in ("weight_scale", "weight_offset") and t.dim() == 2
                                                          and t.shape[1] > 1):
            part = t.shape[1] // n
            out[name] = t[:, r * part:(r + 1) * part]
        elif name in ("bias", "quant_bias"):
            if r == 0:
                out[name] = t
            elif name == "quant_bias":
                out[name] = torch.zeros_like(t)
        else:
            out[name] = t
    return out


def _weight_only(x, p, dtype, int4_dim):
    """W8A16 / W4A16 (spec section 3): W = (W_q + offset) * scale in the model dtype; int4_dim: the packing
    dimension of the whole Linear (1: per-channel, along k; 0: per-group, along n), None for int8."""
    w = p["weight"] if int4_dim is None else unpack_int4(p["weight"], int4_dim)
    reps = x.shape[-1] // p["weight_scale"].shape[1]
    scale = p["weight_scale"].repeat_interleave(reps, 1).to(dtype)
    offset = p["weight_offset"].repeat_interleave(reps, 1).to(dtype)
    y = x @ ((w.to(dtype) + offset) * scale).T
    return y + p["bias"].to(dtype) if "bias" in p else y


def _one(x, p, t, dtype, int4_dim=None):
    if t in ("W8A8", "W8A8_MIX"):
        return w8a8_linear(x, p, dtype)
    if t == "W8A8_DYNAMIC":
        return dynamic_linear(x, p, dtype)
    if t == "W4A8_DYNAMIC":  # two-stage per-group: the group is k / the number of weight_scale_second columns
        return w4a8_linear(x, p, dtype, x.shape[-1] // p["weight_scale_second"].shape[1])
    if t in ("W8A16", "W4A16"):
        return _weight_only(x, p, dtype, int4_dim)
    if t == "FLOAT":
        return torch.nn.functional.linear(x, p["weight"], p.get("bias"))
    raise AssertionError(t)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8d", "w8a8mix", "w8a16", "w4a16:group=32", "w4a8d:match=o_proj|mlp",
                                    "w8a8d:match=q_proj|k_proj|v_proj"])
def test_cards_match_the_per_card_formula(qwen2_layer, tiny_models, scheme):
    n = 2
    gm, ctx = fresh_layer(qwen2_layer)
    name, _, opts = scheme.partition(":")
    options = dict(o.split("=") for o in opts.split(":")) if opts else {}
    run_passes(gm, ctx, (name, options), ("simulate_tp", {"size": str(n)}))
    pre = "model.layers.0."
    tensors = {f"{pre}{lin}.{sfx}": t for lin, art in ctx.artifact.items() for sfx, t in art.tensors.items()}
    tensors.update({pre + k: v for k, v in gm.named_parameters()})
    desc = {f"{pre}{lin}.weight": art.quant_type for lin, art in ctx.artifact.items()}
    assert {desc[pre + r + ".weight"] for r in ROW_PARALLEL} <= {"FLOAT", "W8A8", "W8A8_MIX", "W8A8_DYNAMIC",
                                                                 "W8A16", "W4A16", "W4A8_DYNAMIC"}
    cfg = json.loads((tiny_models["qwen2"] / "config.json").read_text())
    dtype = ctx.dtype

    def lin(full, x):
        p = linear_params(tensors, full)
        t = desc.get(full + ".weight", "FLOAT")  # float Linears that are no card split keep their params
        int4_dim = (1 if p["weight_scale"].shape[1] == 1 else 0) if t == "W4A16" else None
        if not full.endswith(ROW_PARALLEL):
            return _one(x, p, t, dtype, int4_dim)
        k = x.shape[-1]
        acc = None
        for r in range(n):
            y = _one(x[..., r * k // n:(r + 1) * k // n], _card(p, r, n, k), t, dtype, int4_dim).float()
            acc = y if acc is None else acc + y
        return acc.to(dtype)

    h = ctx.inputs.hidden
    cos, sin = ctx.inputs.position_embeddings
    with torch.no_grad():
        got = gm(h, position_embeddings=(cos, sin))
        want = reference_layer(lin, tensors, 0, cfg, h, cos, sin)
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def test_dynamic_cards_use_their_own_per_token_scales(qwen2_layer):
    """With per-token activations the split changes the numbers (each card's scale covers k/N columns)."""
    outs = []
    for size in ("1", "4"):
        gm, ctx = fresh_layer(qwen2_layer)
        run_passes(gm, ctx, "w8a8d", ("simulate_tp", {"size": size}))
        with torch.no_grad():
            outs.append(gm(ctx.inputs.hidden, position_embeddings=ctx.inputs.position_embeddings).float())
    assert not torch.equal(outs[0], outs[1])
    rel = (outs[0] - outs[1]).norm() / outs[0].norm()
    assert rel < 0.05, rel   # same quantization, finer activation scales: a small change


def test_marks_only_the_communication_linears(qwen2_layer):
    gm, ctx = fresh_layer(qwen2_layer)
    make_pass("w8a8d").run(gm, ctx)
    result = make_pass("simulate_tp", {"size": "2"}).run(gm, ctx)
    assert sorted(result.stats["linears"]) == sorted(ROW_PARALLEL)
    marked = {n.meta.get(meta.LINEAR_NAME) for n in gm.graph.nodes if meta.TP_SHARDS in n.meta}
    assert marked == set(ROW_PARALLEL)


def test_artifact_is_the_unsimulated_one(tiny_models, calib_file, tmp_path):
    """Engines shard the standard tensors themselves: with w8a8d (calibration-free tensors) the artifact files are
    byte-identical with and without simulate_tp; only the executable graph differs."""
    outs = []
    for passes in ((("w8a8d", {}),), (("w8a8d", {}), ("simulate_tp", {"size": 2}))):
        out = tmp_path / str(len(passes))
        compile_model(CompileOptions(model=str(tiny_models["llama"]), out=out, passes=passes, calib=calib_file,
                                     calib_samples=2, seq_len=32), log=lambda m: None)
        outs.append(out)
    for name in ("quant_model_weights.safetensors", "quant_model_description.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    from safetensors import safe_open
    with safe_open(outs[1] / "executable" / "layers" / "layer_000.safetensors", "pt") as f:
        assert "self_attn.o_proj.tp1_weight" in f.keys()   # the executable graph holds the cards' shards


def test_size_must_split_whole_groups_before_any_work(tiny_models, tmp_path):
    with pytest.raises(QCError, match=r"simulate_tp:size=2: model\.layers\.0\.self_attn\.o_proj has k=64 .* whole "
                                      r"64-groups"):
        compile_model(CompileOptions(model=str(tiny_models["llama"]), out=tmp_path / "o",
                                     passes=(("w4a16", {"group": 64}), ("simulate_tp", {"size": 2}))),
                      log=lambda m: None)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", [{"size": "3"}, {"size": "32"}, {"match": "("}])
def test_bad_options(bad):
    with pytest.raises(QCError):
        make_pass("simulate_tp", bad)


def test_tp_size_flag_runs_end_to_end(capsys, tiny_models, calib_file, tmp_path):
    """quant_llama.py's --tp_size N: simulate_tp:size=N after the scheme; eval and run work on the result."""
    out = tmp_path / "o"
    rc = cli.main(["quant", "--model_path", str(tiny_models["qwen2"]), "--save_directory", str(out), "--is_dynamic",
                   "True", "--tp_size", "4", "--calib_file", str(calib_file), "--calib_samples", "2", "--seq_len",
                   "32"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "--passes w8a8d,simulate_tp:size=4" in captured.out
    rc = cli.main(["run", str(out), "--prompt", "Quantization maps", "--max-new-tokens", "3"])
    assert rc == 0, capsys.readouterr().err
