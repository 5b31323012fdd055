"""Refuse what the graph does not compute, instead of compiling it wrong (issue 11, section 4).

RoPE whose tables depend on the sequence length (whichever config key holds the type), a sliding attention
window that can take effect, non-finite activations on the calibration data, --seq-len beyond
max_position_embeddings: exit 2 with one line, before any work where config.json suffices. A calibration set
shorter than asked is a warning (stderr and report). `--passes smooth` says which schemes can follow it.
Tiny checkpoints from conftest.py, 2 x 32 calibration tokens.
"""
import json
import shutil

import pytest
import torch

from qcompiler import cli
from tests.helpers import SMALL, edit_config, expect_error, expect_refused, leftovers, rewrite_weights


@pytest.fixture
def qwen_copy(tiny_models, tmp_path):
    return shutil.copytree(tiny_models["qwen2"], tmp_path / "model")


# --------------------------------------------------------------------------------------------- RoPE

LONGROPE = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "original_max_position_embeddings": 256}


@pytest.mark.parametrize("rope", [{"type": "dynamic", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0},
                                  {"rope_type": "longrope", **LONGROPE}, {"type": "no_such_rope", "factor": 2.0}],
                         ids=["dynamic-type", "dynamic-rope_type", "longrope", "unknown"])
@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_length_dependent_rope_refused(capsys, monkeypatch, tmp_path, model_copy, calib_file, key, rope):
    """`dynamic` under rope_parameters (transformers 5's key) compiled and gave wrong logits at other lengths."""
    edit_config(model_copy, **{key: dict(rope, rope_theta=10000.0)})
    name = rope.get("rope_type") or rope["type"]
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file, "config.json", repr(name),
                   "supported: default", "linear")


def test_length_dependent_rope_refused_in_eval(capsys, monkeypatch, tmp_path, model_copy, calib_file):
    edit_config(model_copy, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    expect_refused(capsys, monkeypatch, tmp_path, "eval", model_copy, calib_file, "'dynamic'", "sequence length")


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}


@pytest.mark.parametrize("config", [{"partial_rotary_factor": 0.5},
                                    {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.5}},
                                    {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.5}}],
                         ids=["top-level", "rope_parameters", "llama3"])
@pytest.mark.parametrize("command", ["compile", "eval"])
def test_partial_rotary_factor_refused(capsys, monkeypatch, tmp_path, model_copy, calib_file, config, command):
    """partial_rotary_factor 0.5 on a Llama: vLLM's get_rope rotates half of each head. With the "default" RoPE
    type transformers' rotary module ignores the factor, so the compile silently rotated every dim; with llama3
    RoPE the table was half as wide as the heads and the capture died in torch.export (traceback, exit 1)."""
    edit_config(model_copy, **config)
    expect_refused(capsys, monkeypatch, tmp_path, command, model_copy, calib_file, "config.json",
                   "partial_rotary_factor 0.5", "vLLM rotates only")


def test_partial_rotary_factor_one_compiles(capsys, tmp_path, model_copy, calib_file):
    edit_config(model_copy, partial_rotary_factor=1.0)
    rc = cli.main([str(model_copy), "-o", str(tmp_path / "out"), "--calib", str(calib_file), *SMALL])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0}, {"rope_type": "yarn", "factor": 2.0}],
                         ids=["linear", "yarn"])
def test_static_rope_scaling_compiles(capsys, tmp_path, model_copy, calib_file, rope):
    """Scalings whose tables do not depend on the length are one table: the graph computes them exactly."""
    edit_config(model_copy, rope_parameters=dict(rope, rope_theta=10000.0))
    rc = cli.main([str(model_copy), "-o", str(tmp_path / "out"), "--calib", str(calib_file), *SMALL])
    assert rc == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------- bidirectional attention

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3_moe"])
@pytest.mark.parametrize("command", ["compile", "eval"])
def test_non_causal_config_refused(capsys, monkeypatch, tmp_path, tiny_models, moe_models, calib_file, arch,
                                   command):
    """is_causal false (gte-Qwen2-style embedding models): transformers and vLLM attend bidirectionally, the compile
    captured causal layers silently (float eval vs transformers: relative logit error 0.84 on a tiny Qwen2)."""
    model = shutil.copytree({**tiny_models, **moe_models}[arch], tmp_path / "model")
    edit_config(model, is_causal=False)
    expect_refused(capsys, monkeypatch, tmp_path, command, model, calib_file, "config.json", "is_causal is false",
                   "bidirectionally")


# ----------------------------------------------------------------------------------- sliding window

@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_sliding_window_refused(capsys, monkeypatch, tmp_path, tiny_models, calib_file, arch):
    """Qwen2 with use_sliding_window compiled at --seq-len below the window; the graph attends to everything."""
    model = shutil.copytree(tiny_models[arch], tmp_path / "model")
    edit_config(model, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    argv_extra = ["--seq-len", "8"]  # below the window: it would have compiled
    monkeypatch.setattr("qcompiler.driver._compile_into", lambda *a, **k: pytest.fail("work started"))
    expect_error(capsys, [model, "-o", tmp_path / "out", "--calib", calib_file, "--calib-samples", "2", *argv_extra],
                 "sliding window of 16 tokens", "layer 0", "max_position_embeddings 512")
    assert leftovers(tmp_path) == []


def test_sliding_window_from_layer_types(capsys, monkeypatch, tmp_path, qwen_copy, calib_file):
    """Explicit layer_types win over max_window_layers: layer 1 slides."""
    edit_config(qwen_copy, use_sliding_window=True, sliding_window=16, max_window_layers=2,
                 layer_types=["full_attention", "sliding_attention"])
    expect_refused(capsys, monkeypatch, tmp_path, "inspect", qwen_copy, calib_file, "layer 1", "sliding window")


def test_llama_sliding_layer_types_refused(capsys, monkeypatch, tmp_path, model_copy, calib_file):
    """A Llama config.json with "sliding_attention" in layer_types and a sliding_window compiled with full attention:
    transformers' LlamaAttention has no window, but vLLM's llama.py gives those layers config.sliding_window, so the
    engine would attend through a window the executable graph and the calibration never saw."""
    edit_config(model_copy, sliding_window=16, layer_types=["full_attention", "sliding_attention"])
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file, "config.json", "layer 1",
                   "sliding window of 16 tokens", "layer_types")


def test_llama_sliding_window_key_refused(capsys, monkeypatch, tmp_path, model_copy, calib_file):
    """A Llama config.json with a top-level sliding_window (Mistral-style): transformers' Llama ignores it, vLLM gives
    every layer that window (its CacheConfig.sliding_window): compiled with full attention before."""
    edit_config(model_copy, sliding_window=16)
    expect_refused(capsys, monkeypatch, tmp_path, "compile", model_copy, calib_file, "layer 0",
                   "sliding window of 16 tokens")


def test_qwen2_window_beyond_max_window_layers_refused(capsys, monkeypatch, tmp_path, qwen_copy, calib_file):
    """use_sliding_window with max_window_layers >= the layer count: transformers slides in no layer, vLLM slides in
    every one (it keeps config.sliding_window for the whole model): the engine would not compute the graph."""
    edit_config(qwen_copy, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    expect_refused(capsys, monkeypatch, tmp_path, "compile", qwen_copy, calib_file, "layer 0",
                   "sliding window of 16 tokens")


@pytest.mark.parametrize("arch, config", [("llama", {"sliding_window": 0}),
                                          ("qwen2", {"use_sliding_window": False, "sliding_window": 16,
                                                     "max_window_layers": 0})], ids=["llama-zero", "qwen2-unused"])
def test_sliding_window_zero_or_unused_is_accepted(capsys, tmp_path, tiny_models, arch, config):
    """0 means no window (vLLM), and Qwen2 drops the window without use_sliding_window (transformers' config)."""
    folder = shutil.copytree(tiny_models[arch], tmp_path / "model")
    edit_config(folder, **config)
    assert cli.main(["inspect", str(folder)]) == 0, capsys.readouterr().err


def test_llama_sliding_layer_types_without_window_is_accepted(capsys, model_copy):
    """No sliding_window: vLLM's llama.py gives the "sliding_attention" layers no window either."""
    edit_config(model_copy, sliding_window=None, layer_types=["full_attention", "sliding_attention"])
    assert cli.main(["inspect", str(model_copy)]) == 0, capsys.readouterr().err


def test_sliding_window_that_cannot_take_effect_is_accepted(capsys, qwen_copy):
    """A window as long as max_position_embeddings never masks anything the graph computes."""
    edit_config(qwen_copy, use_sliding_window=True, sliding_window=512, max_window_layers=0)
    assert cli.main(["inspect", str(qwen_copy)]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------- non-finite activations

def _overflowing_mlp(t):
    """Layer 1's MLP gives activations ~1e7: fine in bfloat16, Inf in float16 (weights stay within fp16's range)."""
    t["model.layers.1.mlp.up_proj.weight"] *= 3000
    t["model.layers.1.mlp.gate_proj.weight"] *= 300
    t["model.layers.1.mlp.down_proj.weight"] *= 300


def _overflowing_head(t):
    """Finite layers, but final norm x lm_head overflow float16."""
    t["model.norm.weight"] *= 3000
    t["lm_head.weight"] *= 1000


@pytest.mark.parametrize("passes", ["w8a16", "w8a8"])
def test_float16_overflow_in_a_layer(capsys, tmp_path, model_copy, calib_file, passes):
    """--dtype float16 of a bf16 model whose activations exceed fp16 exited 0 (w8a16; eval then printed
    perplexity NaN) or failed inside a pass (w8a8)."""
    rewrite_weights(model_copy, _overflowing_mlp)
    expect_error(capsys, [model_copy, "-o", tmp_path / "out", "--calib", calib_file, "--passes", passes,
                          "--dtype", "float16", *SMALL], "layer 1", "NaN/Inf", "float16", "--dtype bfloat16")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("norm_scale, where", [(3000, "final norm and lm_head"), (30000, "final norm (before lm_head)")],
                         ids=["lm_head", "final-norm"])
def test_float16_overflow_in_the_head(capsys, tmp_path, model_copy, calib_file, norm_scale, where):
    """Finite layers, but the final norm (x30000) or lm_head's logits (x3000 norm) overflow float16: the
    compile exited 0 and `qcompile eval` printed perplexity NaN."""
    def edit(t):
        _overflowing_head(t)
        t["model.norm.weight"] *= norm_scale / 3000
    rewrite_weights(model_copy, edit)
    expect_error(capsys, [model_copy, "-o", tmp_path / "out", "--calib", calib_file, "--dtype", "float16", *SMALL],
                 where, "NaN/Inf", "--dtype bfloat16")
    assert leftovers(tmp_path) == []


def test_same_model_compiles_in_bfloat16(capsys, tmp_path, model_copy, calib_file):
    rewrite_weights(model_copy, _overflowing_mlp)
    rc = cli.main([str(model_copy), "-o", str(tmp_path / "out"), "--calib", str(calib_file), "--passes", "w8a16",
                   *SMALL])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "out"), "--data", str(calib_file), "--seq-len", "32", "--json"]) == 0
    assert torch.isfinite(torch.tensor(json.loads(capsys.readouterr().out)["ppl"]))


def test_non_finite_compiled_layer_is_refused(capsys, tmp_path, tiny_models, calib_file, monkeypatch):
    """Whatever makes it (here a simulated quantization bug), a lowered layer whose output on the calibration
    data is not finite is never written: the executable graph computes exactly that output."""
    import qcompiler.driver as driver
    real = driver.run_layer_batched

    def nan_out(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0, 0, 0] = float("nan")
        return out
    monkeypatch.setattr(driver, "run_layer_batched", nan_out)
    expect_error(capsys, [tiny_models["llama"], "-o", tmp_path / "out", "--calib", calib_file, *SMALL],
                 "layer 0", "as compiled", "NaN/Inf")
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------- --seq-len

@pytest.mark.parametrize("with_calib", [True, False], ids=["calib", "self-sampled"])
def test_compile_seq_len_beyond_max_positions(capsys, monkeypatch, tmp_path, tiny_models, calib_file, with_calib):
    """--seq-len 1000 on a model with 512 positions was accepted (without --calib it sampled for minutes)."""
    monkeypatch.setattr("qcompiler.driver._compile_into", lambda *a, **k: pytest.fail("work started"))
    extra = ["--calib", calib_file] if with_calib else []
    expect_error(capsys, [tiny_models["llama"], "-o", tmp_path / "out", "--seq-len", "1000", *extra],
                 "--seq-len 1000", "max_position_embeddings (512)")
    assert leftovers(tmp_path) == []


def test_eval_seq_len_beyond_max_positions(capsys, monkeypatch, tmp_path, tiny_models, calib_file):
    out = tmp_path / "out"
    assert cli.main([str(tiny_models["llama"]), "-o", str(out), "--calib", str(calib_file), *SMALL]) == 0
    capsys.readouterr()
    monkeypatch.setattr("qcompiler.evaluate.perplexity", lambda *a, **k: pytest.fail("work started"))
    for model in (tiny_models["llama"], out):
        expect_error(capsys, ["eval", model, "--data", calib_file, "--seq-len", "1000"],
                     "--seq-len 1000", "max_position_embeddings (512)")


def test_default_seq_len_follows_a_short_max_positions(capsys, tmp_path, model_copy, calib_file):
    """Without --seq-len, a model with fewer positions than the default (512) calibrates at its maximum."""
    edit_config(model_copy, max_position_embeddings=24)
    rc = cli.main([str(model_copy), "-o", str(tmp_path / "out"), "--calib", str(calib_file), "--calib-samples", "2"])
    assert rc == 0, capsys.readouterr().err
    assert "(2 x 24 tokens)" in json.loads((tmp_path / "out" / "qcompile_report.json").read_text())["calibration"]


# ---------------------------------------------------------------------------------- short calibration

@pytest.mark.parametrize("text, argv, asked", [
    (None, ["--calib-samples", "64", "--seq-len", "32"], "64 x 32 tokens asked"),
    ("Quantization maps weights.", [], "64 x 512 tokens asked"),
], ids=["fewer-sequences", "one-short-sequence"])
def test_short_calibration_set_warns(capsys, tmp_path, tiny_models, calib_file, text, argv, asked):
    """64 x 512 asked, 2 x 512 (or 1 x 11) there: it calibrated silently on what there was."""
    calib = calib_file
    if text is not None:
        calib = tmp_path / "short.jsonl"
        calib.write_text(json.dumps({"text": text}) + "\n")
    out = tmp_path / "out"
    rc = cli.main([str(tiny_models["llama"]), "-o", str(out), "--calib", str(calib), *argv])
    err = capsys.readouterr().err
    assert rc == 0, err
    warning = next(line for line in err.splitlines() if line.startswith("warning: calibration set"))
    assert asked in warning and "available" in warning
    report = json.loads((out / "qcompile_report.json").read_text())
    assert any(asked in w for w in report["warnings"])
    assert asked in (out / "qcompile_report.md").read_text()


def test_full_calibration_set_does_not_warn(capsys, tmp_path, tiny_models, calib_file):
    assert cli.main([str(tiny_models["llama"]), "-o", str(tmp_path / "out"), "--calib", str(calib_file), *SMALL]) == 0
    assert "shorter than asked" not in capsys.readouterr().err


# ------------------------------------------------------------------------------- float passes alone

@pytest.mark.parametrize("passes", ["smooth", "awq", "gptq"])
def test_float_transform_alone_names_the_schemes(capsys, tmp_path, tiny_models, passes):
    """`--passes smooth` named the internal pass `observe`; it now says which schemes can follow smooth."""
    line = expect_error(capsys, [tiny_models["llama"], "-o", tmp_path / "out", "--passes", passes, *SMALL],
                        f"--passes {passes}", "quantization scheme", "w8a8", "w8a8d", "w4a16",
                        f"--passes {passes},w8a8")
    assert "observe" not in line and "w8a8s" not in line  # w8a8s needs sparse, it cannot follow
    assert leftovers(tmp_path) == []


def test_kv8_alone_names_what_must_come_first(capsys, tmp_path, tiny_models):
    expect_error(capsys, [tiny_models["llama"], "-o", tmp_path / "out", "--passes", "smooth,kv8", *SMALL],
                 "kv8", "smooth", "w8a8d", "--passes smooth,w8a8,kv8")


def test_logit_check_computes_logits_only_when_the_bound_needs_it():
    """The lm_head check costs a full logits pass only when max||normed|| x max||row|| reaches the limit."""
    from qcompiler.activation_checks import check_logits
    from qcompiler.model import Head
    torch.manual_seed(0)
    calls = []

    class Counting(Head):
        def logits(self, h):
            calls.append(h.shape)
            return super().logits(h)

    def head(weight):
        return Counting(embed_weight=torch.zeros(10, 16, dtype=torch.float16), norm_weight=torch.ones(16).half(),
                        lm_head_weight=weight.half(), inv_freq=torch.ones(8), attention_scaling=1.0, eps=1e-6,
                        dtype=torch.float16)
    hidden = torch.cat([torch.randn(6, 5, 8), torch.zeros(6, 5, 8)], -1).half()  # lives in the first 8 dims
    check_logits(head(torch.randn(10, 16) * 0.02), hidden, torch.float16)
    assert calls == []  # bound ~ 5.7 x 0.1: finite without computing anything
    orthogonal = torch.cat([torch.zeros(10, 8), torch.full((10, 8), 30000.0)], -1)  # logits 0, bound ~ 5e5
    check_logits(head(orthogonal), hidden, torch.float16)  # bound >= 65504: computed, and finite
    assert len(calls) == 2  # 6 windows in chunks of 4
