"""Mixture-of-experts compiles end to end (issue 17) on tiny random Qwen3-MoE / Qwen2-MoE checkpoints (4 experts
of 128, top-2): artifact names and description entries per expert as msModelSlim writes them and vLLM-Ascend's
fused-MoE methods load them, the executable graph (eval, run, decode with a KV cache), the report's routed token
counts, and the refusals of what the compiled graph cannot do faithfully yet.

Tolerances (measured on these models, 2 x 24 random tokens):
- a layer's own contribution (output - input: the residual would hide the MLP) of the executable graph vs the
  float captured layer, relative L2: w8a8d 1.8%, w4a8d experts 3.9% measured; bounds 4% and 8%. Swapping the
  artifact tensors of experts 0 and 1 of layer 0 (w8a8d) gives 21% there, which the bounds catch.
- perplexity of the executable graph vs the float model within 2% (measured 1.00002 and 0.99997). A tiny random
  model's perplexity is near its vocabulary size and moves little with anything: this checks eval runs end to
  end on MoE graphs; the layer bound above is the discriminating check.
"""
import json
import re

import pytest
import torch
from safetensors import safe_open

from qcompiler import cli
from qcompiler.backends.ascend.engines import features_of_artifact, refusals
from qcompiler.evaluate import perplexity
from qcompiler.runtime import load_model
from tests.helpers import (assert_checker_clean, assert_checker_clean_on_moe, cached_logits, checker_w4a8_misreads,
                           edited_artifact, expect_error, layer_output_errors, recompute_logits,
                           rewrite_weights)

CALIB = ["--calib-samples", "4", "--seq-len", "32"]
PPL_TOLERANCE = 0.02
W4A8_EXPERTS = r"w4a8d:match=mlp\.experts,w8a8d"


@pytest.fixture(scope="module")
def compiled_moe(moe_models, calib_file, tmp_path_factory):
    """compile(arch, passes) -> OUT of that tiny MoE model (cached per module)."""
    done = {}

    def get(arch, passes):
        key = (arch, passes)
        if key not in done:
            out = tmp_path_factory.mktemp("moe-out") / f"{arch}-{len(done)}"
            assert cli.main([str(moe_models[arch]), "--passes", passes, "--calib", str(calib_file), *CALIB,
                             "-o", str(out)]) == 0
            done[key] = out
        return done[key]
    return get


def _description(out):
    return json.loads((out / "quant_model_description.json").read_text())


def _shapes(out):
    with safe_open(str(out / "quant_model_weights.safetensors"), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}


def _layer_errors(model_dir, out):
    """tests.helpers.layer_output_errors on 2 x 24 fixed random token ids."""
    return layer_output_errors(model_dir, out, torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(3)))


def _ppl_ratio(moe_models, arch, out):
    windows = torch.randint(0, 250, (2, 48), generator=torch.Generator().manual_seed(3))
    quant = perplexity(load_model(out), windows)["ppl"]
    ref = perplexity(load_model(moe_models[arch]), windows)["ppl"]
    return quant / ref


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_w8a8d_moe_artifact_per_expert_names_and_float_router(compiled_moe, moe_models, arch):
    out = compiled_moe(arch, "w8a8d")
    desc, shapes = _description(out), _shapes(out)
    for layer in (0, 1):
        pre = f"model.layers.{layer}.mlp."
        assert desc[pre + "gate.weight"] == "FLOAT" and shapes[pre + "gate.weight"] == ("BF16", [4, 64])
        for e in range(4):
            for proj, (n, k) in (("gate_proj", (128, 64)), ("up_proj", (128, 64)), ("down_proj", (64, 128))):
                name = f"{pre}experts.{e}.{proj}"
                assert desc[name + ".weight"] == "W8A8_DYNAMIC"
                assert shapes[name + ".weight"] == ("I8", [n, k])
                assert shapes[name + ".weight_scale"][1] == [n, 1] and desc[name + ".weight_offset"] == "W8A8_DYNAMIC"
        if arch == "qwen2_moe":  # the shared expert is a dense MLP (quantized), its sigmoid gate stays float
            assert desc[pre + "shared_expert_gate.weight"] == "FLOAT"
            assert desc[pre + "shared_expert.down_proj.weight"] == "W8A8_DYNAMIC"
    assert not [k for k in desc if "gate_up_proj" in k or k.endswith("experts.down_proj")]  # no fused names
    if arch == "qwen3_moe":  # the checker knows no structure for MoE types: it checks every tensor's layout
        assert_checker_clean(out)
    report = json.loads((out / "qcompile_report.json").read_text())
    for layer in report["layers"]:  # 4 x 32 calibration tokens, each routed to 2 experts
        assert len(layer["expert_tokens"]) == 4 and sum(layer["expert_tokens"]) == 4 * 32 * 2
    assert "## Experts: calibration tokens routed to each expert" in (out / "qcompile_report.md").read_text()


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_w8a8d_moe_layers_and_perplexity_close_to_float(compiled_moe, moe_models, arch):
    errors = _layer_errors(moe_models[arch], compiled_moe(arch, "w8a8d"))
    assert max(errors) < 0.04, errors
    ratio = _ppl_ratio(moe_models, arch, compiled_moe(arch, "w8a8d"))
    print(f"{arch} w8a8d perplexity ratio {ratio:.5f}")
    assert abs(ratio - 1) < PPL_TOLERANCE, ratio


def test_w4a8d_experts_layout_and_perplexity(compiled_moe, moe_models):
    """w4a8d on the experts, w8a8d on attention: msModelSlim's 1.0.0 per-group MoE layout (weight packed along n,
    two-stage scales, scale_bias [n, 1] for gate/up and [n, 16] for down: vLLM-Ascend methods/w4a8.py
    AscendW4A8DynamicFusedMoEMethod docstring)."""
    out = compiled_moe("qwen3_moe", W4A8_EXPERTS)
    desc, shapes = _description(out), _shapes(out)
    assert desc["group_size"] == 32 and desc["version"] == "1.0.0"
    pre = "model.layers.1.mlp.experts.3."
    assert desc[pre + "gate_proj.weight"] == "W4A8_DYNAMIC" and desc["model.layers.1.self_attn.q_proj.weight"] == \
        "W8A8_DYNAMIC"
    assert shapes[pre + "gate_proj.weight"] == ("I8", [64, 64])            # [n/2, k]
    assert shapes[pre + "gate_proj.weight_scale_second"] == ("F32", [128, 2])
    assert shapes[pre + "gate_proj.scale_bias"] == ("F32", [128, 1])
    assert shapes[pre + "down_proj.weight"] == ("I8", [32, 128])
    assert shapes[pre + "down_proj.scale_bias"] == ("F32", [64, 16])
    errors = _layer_errors(moe_models["qwen3_moe"], out)
    assert max(errors) < 0.08, errors
    ratio = _ppl_ratio(moe_models, "qwen3_moe", out)
    print(f"qwen3_moe w4a8d experts perplexity ratio {ratio:.5f}")
    assert abs(ratio - 1) < PPL_TOLERANCE, ratio
    features = features_of_artifact(out)
    assert "W4A8_DYNAMIC MoE" in features.keys() and not refusals("vllm-ascend", features)


@pytest.mark.parametrize("arch,passes,linears", [("qwen3_moe", W4A8_EXPERTS, 2 * 4 * 3),
                                                  ("qwen3_moe", "w4a8d", 2 * (4 * 3 + 4))])
def test_w4a8d_checker_errors_are_only_its_packed_n_misreading(compiled_moe, arch, passes, linears):
    """The checker has no structure for MoE model types and reads each W4A8_DYNAMIC Linear's n from its packed
    weight [n/2, k] (tests/helpers.py, above `checker_w4a8_misreads`: the checker is wrong there, the artifact has
    vLLM-Ascend's methods/w4a8.py shapes, which its loader accepts: tests/e2e/test_moe_load.py). Exactly 6 errors
    per W4A8_DYNAMIC Linear (weight, weight_scale, weight_offset, weight_scale_second, weight_offset_second,
    scale_bias): the 24 expert Linears, plus the 8 attention Linears when w4a8d takes them too (the dense scheme's
    get_weight packs along n the same way); nothing else, and the checker's W4A8 rules at the true n pass."""
    out = compiled_moe(arch, passes)
    misreads = checker_w4a8_misreads(out)
    assert len(misreads) == linears * 6, len(misreads)
    assert ("model.layers.1.mlp.experts.3.down_proj.scale_bias", "W4A8_DYNAMIC.scale_bias.shape",
            "shape [64, 16], expected [32, 16]") in misreads
    assert_checker_clean_on_moe(out)


@pytest.mark.parametrize("tensor,change,needle", [
    ("model.layers.0.mlp.experts.1.down_proj.scale_bias", lambda t: t[:, :8].contiguous(), "shape [64, 8]"),
    ("model.layers.1.mlp.experts.2.gate_proj.weight_offset_second", torch.ones_like, "weight_offset_second.nonzero"),
])
def test_the_checker_exception_hides_no_real_error(compiled_moe, tmp_path, tensor, change, needle):
    """A real fault in a W4A8_DYNAMIC expert still fails: a wrong shape (not the engine's: not a misreading), and
    a non-zero second-stage offset (the checker's value rules, skipped in its own run because of the misread
    shapes, run at the true n). The earlier exception (any `.shape` error on an expert tensor) let both pass."""
    broken = edited_artifact(compiled_moe("qwen3_moe", W4A8_EXPERTS), tmp_path / "broken",
                             lambda t: t.update({tensor: change(t[tensor])}))
    with pytest.raises(AssertionError, match=re.escape(needle)):
        assert_checker_clean_on_moe(broken)


W4A16_EXPERTS = r"w4a16:match=mlp\.experts:group=32,w8a8d"


def test_w4a16_experts_layout_values_and_perplexity(compiled_moe, moe_models):
    """w4a16 on the experts (w8a8d on attention): the layout vLLM-Ascend's W4A16 fused-MoE method loads
    (methods/w4a16.py AscendW4A16FusedMoEMethod: weight_packed int32 [n, k/8], weight_scale [n, k/g] in the model
    dtype, weight_shape int32 [2]; `<linear>.weight` only in the description, where its quant config looks the
    type up). Values: every expert weight decoded the engine's way (unpack_from_int32: nibble - 8, times the group
    scale) lies within half a scale of the checkpoint's float weight, so the layout carries the weights, not just
    the shapes. Layer bound 8% as for w4a8d (measured 3.9%); perplexity within 2% (measured 0.9997)."""
    from safetensors.torch import load_file
    out = compiled_moe("qwen3_moe", W4A16_EXPERTS)
    desc, shapes = _description(out), _shapes(out)
    assert desc["group_size"] == 32 and desc["model_quant_type"] == "W4A16"
    pre = "model.layers.1.mlp.experts.3."
    for proj, (n, k) in (("gate_proj", (128, 64)), ("up_proj", (128, 64)), ("down_proj", (64, 128))):
        name = pre + proj
        assert desc[name + ".weight"] == "W4A16" and name + ".weight" not in shapes
        assert shapes[name + ".weight_packed"] == ("I32", [n, k // 8])
        assert shapes[name + ".weight_scale"] == ("BF16", [n, k // 32])
        assert shapes[name + ".weight_offset"] == ("BF16", [n, k // 32])
        assert shapes[name + ".weight_shape"] == ("I32", [2])
    assert desc["model.layers.1.self_attn.q_proj.weight"] == "W8A8_DYNAMIC"
    art = load_file(str(out / "quant_model_weights.safetensors"))
    ref = load_file(str(moe_models["qwen3_moe"] / "model.safetensors"))
    for layer in (0, 1):
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                packed, scale = art[name + ".weight_packed"], art[name + ".weight_scale"].float()
                assert art[name + ".weight_shape"].tolist() == list(ref[name + ".weight"].shape)
                n, k = ref[name + ".weight"].shape
                codes = torch.zeros(n, k, dtype=torch.int32)
                for i in range(8):  # the engine's unpack_from_int32, packed_dim 1
                    codes[:, i::8] = (packed >> (4 * i)) & 15
                step = scale.repeat_interleave(32, dim=1)
                deq = (codes - 8).float() * step
                assert ((deq - ref[name + ".weight"].float()).abs() <= step / 2 * 1.01).all(), name
    errors = _layer_errors(moe_models["qwen3_moe"], out)
    assert max(errors) < 0.08, errors
    ratio = _ppl_ratio(moe_models, "qwen3_moe", out)
    print(f"qwen3_moe w4a16 experts perplexity ratio {ratio:.5f}")
    assert abs(ratio - 1) < PPL_TOLERANCE, ratio
    features = features_of_artifact(out)
    assert "W4A16 MoE" in features.keys() and not refusals("vllm-ascend", features)
    assert_checker_clean(out)


def test_w4a16_experts_run_generates(compiled_moe, capsys):
    out = compiled_moe("qwen3_moe", W4A16_EXPERTS)
    assert cli.main(["run", str(out), "--prompt", "Quantization maps", "--raw", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()


def test_qwen2_moe_w4a16_experts_no_engine_loads_them(moe_models, tmp_path, capsys):
    """Qwen2-MoE: vLLM-Ascend has no qwen2_moe packed mapping (no quantized experts at all) and MindIE's W4A16 MoE
    loading was not read (it would read msModelSlim's packed int8 `weight`, not this layout): no engine, exit 2."""
    expect_error(capsys, [moe_models["qwen2_moe"], "--passes", W4A16_EXPERTS, *CALIB, "-o", tmp_path / "out"],
                 "no engine can load", "W4A16 MoE")
    assert not (tmp_path / "out").exists()


GPTQ_EXPERTS = r"gptq:min_expert_tokens=0,w4a16:match=mlp\.experts:group=32,w8a8d"


def test_gptq_on_experts_uses_routed_tokens_and_records_them(compiled_moe, moe_models):
    """gptq on a MoE model: every routed expert Linear's record says it used its routed tokens and how many (the
    report's expert_tokens of that layer); attention Linears have no such record. Layer bound 8%
    and perplexity 2% as for w4a16 experts without gptq (measured 5.6% / 1.0000; GPTQ fits the 128 tokens of the
    repetitive test text, so on these random-token inputs RTN does better (3.6%); on held-out text routed GPTQ is
    the best of the three treatments: BENCHMARKS.md "MoE experts: GPTQ statistics")."""
    out = compiled_moe("qwen3_moe", GPTQ_EXPERTS)
    report = json.loads((out / "qcompile_report.json").read_text())
    for layer in report["layers"]:
        records = layer["passes"]["gptq"]["linears"]
        for e, tokens in enumerate(layer["expert_tokens"]):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                r = records[f"mlp.experts.{e}.{proj}"]
                assert r["statistics"] == "routed tokens" and r["expert_tokens"] == tokens, r
        assert "statistics" not in records["self_attn.q_proj"]
    assert "routed tokens: 12 Linears |" in (out / "qcompile_report.md").read_text()
    errors = _layer_errors(moe_models["qwen3_moe"], out)
    assert max(errors) < 0.08, errors
    ratio = _ppl_ratio(moe_models, "qwen3_moe", out)
    print(f"qwen3_moe gptq + w4a16 experts perplexity ratio {ratio:.5f}")
    assert abs(ratio - 1) < PPL_TOLERANCE, ratio
    assert_checker_clean(out)


def test_gptq_experts_below_the_threshold_get_rtn(compiled_moe):
    """min_expert_tokens above every expert's count: few_tokens=rtn leaves the experts to the scheme's rounding, so
    their artifact tensors are byte-identical to a compile without gptq (gptq changed only attention weights, which
    experts' codes do not depend on); few_tokens=all gives other codes (GPTQ on the all-token Hessian)."""
    from safetensors.torch import load_file
    rtn = compiled_moe("qwen3_moe", r"gptq:min_expert_tokens=100000,w4a16:match=mlp\.experts:group=32,w8a8d")
    plain = compiled_moe("qwen3_moe", W4A16_EXPERTS)
    every = compiled_moe("qwen3_moe", r"gptq:min_expert_tokens=100000:few_tokens=all,w4a16:match=mlp\.experts:"
                                      r"group=32,w8a8d")
    a, b, c = (load_file(str(o / "quant_model_weights.safetensors")) for o in (rtn, plain, every))
    experts = [k for k in a if ".mlp.experts." in k]
    assert experts and all(torch.equal(a[k], b[k]) for k in experts)
    assert not torch.equal(c["model.layers.0.mlp.experts.1.up_proj.weight_packed"],
                           b["model.layers.0.mlp.experts.1.up_proj.weight_packed"])
    records = json.loads((rtn / "qcompile_report.json").read_text())["layers"][0]["passes"]["gptq"]["linears"]
    assert records["mlp.experts.3.down_proj"]["statistics"] == "rtn (few routed)"
    records = json.loads((every / "qcompile_report.json").read_text())["layers"][0]["passes"]["gptq"]["linears"]
    assert records["mlp.experts.3.down_proj"]["statistics"] == "all tokens (few routed)"


def test_qwen2_moe_gptq_shared_expert_sees_every_token(compiled_moe, moe_models):
    """Qwen2-MoE: the shared expert is a dense MLP (every token, no routing record); routed experts get theirs."""
    out = compiled_moe("qwen2_moe", r"gptq:min_expert_tokens=0,w8a8d")
    records = json.loads((out / "qcompile_report.json").read_text())["layers"][1]["passes"]["gptq"]["linears"]
    assert "statistics" not in records["mlp.shared_expert.gate_proj"]
    assert records["mlp.experts.2.gate_proj"]["statistics"] == "routed tokens"
    ratio = _ppl_ratio(moe_models, "qwen2_moe", out)
    assert abs(ratio - 1) < PPL_TOLERANCE, ratio


def test_gptq_moe_run_generates(compiled_moe, capsys):
    out = compiled_moe("qwen3_moe", GPTQ_EXPERTS)
    assert cli.main(["run", str(out), "--prompt", "Quantization maps", "--raw", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()


def test_moe_decode_with_kv_cache_matches_recomputation(compiled_moe):
    model = load_model(compiled_moe("qwen3_moe", "w8a8d"))
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(5))
    want = recompute_logits(model, ids)[:, 5:]
    got, cache = cached_logits(model, ids, prefill=6)
    # as tests/ir/test_decode.py: 1-row steps round sums in another order than the [L, D] prefill
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 0.01, err
    assert torch.equal(got.argmax(-1), want.argmax(-1)) and cache.length == 16


def test_moe_run_generates(compiled_moe, capsys):
    out = compiled_moe("qwen3_moe", "w8a8d")
    assert cli.main(["run", str(out), "--prompt", "Quantization maps", "--raw", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()


def test_moe_exclude_experts_keeps_them_float(compiled_moe):
    out = compiled_moe("qwen3_moe", r"w8a8d:match=self_attn")
    desc = _description(out)
    assert desc["model.layers.0.mlp.experts.2.up_proj.weight"] == "FLOAT"
    assert desc["model.layers.0.self_attn.o_proj.weight"] == "W8A8_DYNAMIC"


def test_moe_exclude_one_layers_whole_expert_set(moe_models, calib_file, tmp_path):
    """--exclude that takes a layer's whole expert set keeps it float (vLLM-Ascend: is_layer_skipped_ascend on the
    packed `experts` -> AscendUnquantizedFusedMoEMethod); the other layer's experts stay quantized."""
    out = tmp_path / "out"
    assert cli.main([str(moe_models["qwen3_moe"]), "--passes", "w8a8d", "--exclude", r"layers\.1\.mlp\.experts",
                     "--calib", str(calib_file), *CALIB, "-o", str(out)]) == 0
    desc = _description(out)
    for e in range(4):
        assert desc[f"model.layers.1.mlp.experts.{e}.down_proj.weight"] == "FLOAT"
        assert desc[f"model.layers.0.mlp.experts.{e}.down_proj.weight"] == "W8A8_DYNAMIC"
    assert desc["model.layers.1.self_attn.o_proj.weight"] == "W8A8_DYNAMIC"
    assert_checker_clean(out)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_moe_fallback_units_are_whole_expert_sets(moe_models, calib_file, tmp_path, arch):
    """fallback on a MoE model: a layer's routed experts are one unit (12 Linears here), measured on the layer's
    output, where the routing weights already zero what unchosen experts add; Qwen2-MoE's shared expert has the
    dense units. Qwen3-MoE: level=12 can only be met by one expert set (attention units give at most 8), so exactly
    one layer's experts fall back, all of them. Qwen2-MoE (shared-expert units too): whichever units are chosen,
    an expert set falls back whole or not at all, and level=38 (every Linear) keeps everything float."""
    out = tmp_path / "out"
    option = "level=12" if arch == "qwen3_moe" else "level=38"
    assert cli.main([str(moe_models[arch]), "--passes", f"w8a8d,fallback:{option}", "--calib", str(calib_file),
                     *CALIB, "-o", str(out)]) == 0
    report = json.loads((out / "qcompile_report.json").read_text())["fallback"]
    desc = _description(out)
    if arch == "qwen3_moe":
        assert report["linears_kept_float"] == 12 and len(report["chosen"]) == 1
        layer = report["chosen"][0]["layer"]
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert desc[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] == "FLOAT"
                assert desc[f"model.layers.{1 - layer}.mlp.experts.{e}.{proj}.weight"] == "W8A8_DYNAMIC"
    else:  # level=38: every unit, 2 x (4 attention + 12 experts + 3 shared expert) Linears
        assert report["linears_kept_float"] == report["linears_quantized_before"] == 38
        layer = next(u["layer"] for u in report["chosen"] if len(u["linears"]) == 12)
        assert not [k for k, v in desc.items() if k.endswith("_proj.weight") and v != "FLOAT"]
    for unit in report["chosen"]:
        experts = [n for n in unit["linears"] if ".mlp.experts." in n]
        assert len(experts) in (0, 12) and (not experts or len(unit["linears"]) == 12), unit
    measured = report["sensitivity_by_linear"]
    assert f"model.layers.0.mlp.experts.3.down_proj" in measured
    if arch == "qwen2_moe":
        assert "model.layers.0.mlp.shared_expert.down_proj" in measured
        assert "model.layers.0.mlp.shared_expert.gate_proj" in measured
    assert f"model.layers.{layer}.mlp.experts.* (12 Linears)" in (out / "qcompile_report.md").read_text()


def test_moe_fallback_level_unreachable_is_refused(moe_models, tmp_path, capsys):
    """Qwen3-MoE units per layer are 3 (q/k/v), 1 (o_proj), 12 (experts): level=10 is no sum of them (8 without
    experts, 12 with one expert set): one line before any work naming the MoE rule."""
    expect_error(capsys, [moe_models["qwen3_moe"], "--passes", "w8a8d,fallback:level=10", *CALIB, "-o",
                          tmp_path / "out"], "fallback:level=10", "experts all together")


@pytest.mark.parametrize("passes,extra,needles", [
    ("smooth,w8a8d", [], ("pass smooth", "mixture-of-experts")),
    ("awq,w8a8d", [], ("pass awq", "mixture-of-experts")),
    ("w8a8", [], ("static", "mlp.experts.0.gate_proj")),
    (r"w8a8:match=self_attn,w8a16", [], ("weight-only", "W8A16")),
    (r"w4a16:match=mlp\.experts:group=0,w8a8d", [], ("per-channel", "group=0")),
    (r"w4a8d:match=mlp\.experts\.0\.,w8a8d", [], ("split", "mlp.experts.*")),
    ("w8a8d", ["--exclude", r"experts\.1\.down_proj"], ("--exclude", "experts.1.down_proj")),
])
def test_moe_refusals_before_any_work(moe_models, tmp_path, capsys, passes, extra, needles):
    expect_error(capsys, [moe_models["qwen3_moe"], "--passes", passes, *extra, *CALIB, "-o", tmp_path / "out"],
                 *needles)
    assert not (tmp_path / "out").exists()


def test_engine_features_of_moe_pipelines(moe_models):
    """Routed experts are the fused-MoE features ("<type> MoE"); the shared expert and attention are dense Linears.
    vLLM-Ascend loads quantized qwen3_moe experts, not qwen2_moe ones (no packed mapping); MindIE's atb loader
    takes no W4A8_DYNAMIC experts (FlashQwenLayer: PackType.ALL_W4A8 not supported), on either model type."""
    from qcompiler.engine_check import pipeline_features
    from qcompiler.loading import open_checkpoint
    from qcompiler.passes import make_pass
    passes = [make_pass("w4a8d", {"match": r"mlp\.experts"}), make_pass("w8a8d")]
    for arch in ("qwen3_moe", "qwen2_moe"):
        ckpt = open_checkpoint(moe_models[arch])
        f = pipeline_features(passes, ckpt.config, (), ckpt.has, "ascend910b", ckpt.model_type)
        assert f.moe_types == {"W4A8_DYNAMIC"} and f.linear_types == {"W8A8_DYNAMIC"}
        assert (f.moe_intermediate_size, f.moe_group_size) == (128, 32)  # the experts' tp notes read these
        assert (refusals("vllm-ascend", f) == []) == (arch == "qwen3_moe")
        assert any("ALL_W4A8" in why for why in refusals("mindie", f))
    ckpt = open_checkpoint(moe_models["qwen3_moe"])
    floats = pipeline_features([make_pass("w8a8d", {"match": "self_attn"})], ckpt.config, (), ckpt.has, "ascend910b",
                               ckpt.model_type)
    assert floats.moe_types == frozenset() and "W8A8_DYNAMIC" in floats.linear_types
    assert (floats.moe_intermediate_size, floats.moe_group_size) == (0, 0)


def test_qwen2_moe_w4a8d_experts_no_engine_loads_them(moe_models, tmp_path, capsys):
    """Qwen2-MoE with W4A8_DYNAMIC experts: vLLM-Ascend has no qwen2_moe packed mapping and MindIE's Qwen MoE layer
    raises AssertionError on their pack type (ALL_W4A8): one line, exit 2, before any work."""
    expect_error(capsys, [moe_models["qwen2_moe"], "--passes", W4A8_EXPERTS, *CALIB, "-o", tmp_path / "out"],
                 "no engine can load", "qwen2_moe", "ALL_W4A8")
    assert not (tmp_path / "out").exists()


def test_qwen2_moe_report_says_which_engine_loads_it(compiled_moe):
    report = json.loads((compiled_moe("qwen2_moe", "w8a8d") / "qcompile_report.json").read_text())
    assert report["engines"]["mindie"]["loads"] and not report["engines"]["vllm-ascend"]["loads"]
    assert any("qwen2_moe" in w for w in report["engines"]["vllm-ascend"]["why_not"])


def test_moe_model_with_a_dense_layer_compiles(tmp_path, calib_file):
    """mlp_only_layers=[0]: layer 0 keeps a dense MLP (mlp.gate_proj ..., quantized as in a dense model), layer 1
    is MoE; the report has routed token counts for layer 1 only."""
    from tests.helpers import make_tiny_model
    model = make_tiny_model(tmp_path / "m", "qwen3_moe", mlp_only_layers=[0])
    out = tmp_path / "out"
    assert cli.main([str(model), "--passes", r"w4a8d:match=mlp\.experts,w8a8d", "--calib", str(calib_file), *CALIB,
                     "-o", str(out)]) == 0
    desc = _description(out)
    assert desc["model.layers.0.mlp.down_proj.weight"] == "W8A8_DYNAMIC"
    assert desc["model.layers.1.mlp.experts.0.down_proj.weight"] == "W4A8_DYNAMIC"
    assert "model.layers.0.mlp.gate.weight" not in desc and desc["model.layers.1.mlp.gate.weight"] == "FLOAT"
    layers = json.loads((out / "qcompile_report.json").read_text())["layers"]
    assert "expert_tokens" not in layers[0] and sum(layers[1]["expert_tokens"]) == 4 * 32 * 2


def test_quant_front_picks_the_moe_recipes(moe_models, calib_file, tmp_path, capsys):
    """`qcompile quant --quant_type` on a MoE model: the dynamic MoE pipelines (recipes.MOE_RECIPES), never a dense
    best practice that MoE refuses (smooth); a quant type without one is one line, exit 2."""
    from qcompiler.recipes import recipe_for
    assert recipe_for("w8a8_dynamic", "qwen3_moe").passes == "w8a8d"
    assert recipe_for("w8a8_dynamic", "qwen3").passes == "smooth,w8a8d"
    out = tmp_path / "q"
    assert cli.main(["quant", "--model_path", str(moe_models["qwen3_moe"]), "--save_path", str(out),
                     "--quant_type", "w4a8", "--calib_file", str(calib_file), "--calib_samples", "4",
                     "--seq_len", "32"]) == 0
    desc = _description(out)
    assert desc["model.layers.0.mlp.experts.1.gate_proj.weight"] == "W4A8_DYNAMIC"
    assert desc["model.layers.0.self_attn.q_proj.weight"] == "W8A8_DYNAMIC"
    capsys.readouterr()
    expect_error(capsys, ["quant", "--model_path", moe_models["qwen3_moe"], "--save_path", tmp_path / "q2",
                          "--quant_type", "w8a8"], "no recipe for mixture-of-experts")


def _tiny_expert_groups(folder):
    """Scale groups of layer 0 expert 1's gate_proj to tiny magnitudes (bf16 checkpoint edited in place): row 5's
    first group to absmax ~7e-6 (per-group scale ~1e-6, below float16's normal range: its subnormal grid of 2**-24
    rounds it) and row 6's first group to ~7e-9 (scale ~1e-9: float16 flushes it to 0)."""
    name = "model.layers.0.mlp.experts.1.gate_proj.weight"

    def shrink(t):
        w = t[name].float()
        w[5, :32] *= 1e-4
        w[6, :32] *= 1e-7
        t[name] = w.to(torch.bfloat16)

    rewrite_weights(folder, shrink)
    return folder


@pytest.mark.parametrize("passes", [r"w4a8d:match=mlp\.experts,w8a8d", r"gptq,w4a8d:match=mlp\.experts,w8a8d"])
def test_w4a8d_expert_scales_are_the_engines_moe_scales(tmp_path, calib_file, passes):
    """A W4A8_DYNAMIC expert's per-group scale as both engines' fused-MoE methods form it: vLLM-Ascend 0.23.0 /
    0.26.0rc1 methods/w4a8.py AscendW4A8DynamicFusedMoEMethod.process_scale `(scale * per_group_scale)
    .to(torch.float16).to(torch.float32)` on the float32 parameters; MindIE atb utils/quantize/w4a8.py
    W4A8LinearDynamic.process_scale (3-D expert stack) the same on the model-dtype tensors. The executable graph
    uses kernels.two_stage_scale (the model-dtype product): the two must be equal bit for bit for every expert
    group, also where a bf16 group scale is tiny (below 2**-14, where float16 rounds or flushes it)."""
    from qcompiler.backends.ascend.kernels import two_stage_scale
    from tests.helpers import make_tiny_model
    model = _tiny_expert_groups(make_tiny_model(tmp_path / "m", "qwen3_moe"))
    out = tmp_path / "out"
    assert cli.main([str(model), "--passes", passes, "--calib", str(calib_file), *CALIB, "-o", str(out)]) == 0
    checked = 0
    with safe_open(str(out / "quant_model_weights.safetensors"), "pt") as f:
        for k in f.keys():
            if ".mlp.experts." not in k or not k.endswith(".weight_scale_second"):
                continue
            s2, s1 = f.get_tensor(k), f.get_tensor(k[:-len("_second")])
            graph = two_stage_scale(s1, s2, torch.bfloat16)
            vllm_ascend = (s1 * s2).to(torch.float16).to(torch.float32)
            mindie = (s1.to(torch.bfloat16) * s2.to(torch.bfloat16)).to(torch.float16).to(torch.float32)
            assert torch.equal(graph, vllm_ascend) and torch.equal(graph, mindie), k
            assert (graph > 0).all(), k
            checked += 1
    assert checked == 2 * 4 * 3
