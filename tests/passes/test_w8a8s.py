"""w8a8s (sparse W8A8, W8A8S) and the ascend310p target rules: artifact tensors on a tiny model (zeros
stay zeros, 4-bit code range, fp16 int64 deq_scale, checker clean, executable runs), the pipeline
contract with sparse, and the target / dtype errors raised before any work."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcompiler.config import CompileOptions
from qcompiler.driver import compile_model
from qcompiler.errors import QCError
from qcompiler.evaluate import evaluate_file
from qcompiler.executable import read_info, read_layer_tensors
from qcompiler.passes import TAIL, PassManager, make_pass
from qcompiler.runtime import load_model
from qcompiler.targets import check_target, get_target
from tests.helpers import assert_checker_clean

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _compile(model, out, calib, passes, **kw):
    return compile_model(CompileOptions(model=str(model), out=out, calib=calib, calib_samples=4, seq_len=32,
                                        passes=tuple(passes), **kw), log=lambda m: None)


@pytest.fixture(scope="module")
def w8a8s_out(tiny_models, calib_file, tmp_path_factory):
    """The tiny Llama (bf16) as sparse+w8a8s for ascend310p in fp16, and sparse alone (same calibration)."""
    root = tmp_path_factory.mktemp("w8a8s")
    sparse = ("sparse", {"ratio": "0.5", "method": "wanda"})
    rep = _compile(tiny_models["llama"], root / "w8a8s", calib_file, [sparse, ("w8a8s", {})],
                   target="ascend310p", dtype="float16")
    _compile(tiny_models["llama"], root / "sparse", calib_file, [sparse], target="ascend310p", dtype="float16")
    return root, rep


def test_w8a8s_artifact_zeros_range_and_fp16_encoding(w8a8s_out):
    root, rep = w8a8s_out
    out = root / "w8a8s"
    assert rep["model_quant_type"] == "W8A8S" and rep["target"] == "ascend310p" and rep["dtype"] == "float16"
    desc = json.loads((out / "quant_model_description.json").read_text())
    t = load_file(str(out / "quant_model_weights.safetensors"))
    dense = load_file(str(root / "sparse" / "quant_model_weights.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    md = (out / "qcompile_report.md").read_text()
    assert "## Sparsity (sparse pass, wanda)" in md and "| 1 | 0.5000 | 0.5000 |" in md
    assert cfg["torch_dtype"] == "float16" and cfg.get("quantize") == "w8a8s"
    for layer in range(2):
        for lin in LINEARS:
            p = f"model.layers.{layer}.{lin}"
            q = t[p + ".weight"]
            assert desc[p + ".weight"] == "W8A8S" and q.dtype == torch.int8
            assert int(q.abs().max()) <= 7 and int(q.abs().max()) == 7        # 4-bit range, scale absmax/7
            assert ((q == 0).sum(1) >= q.shape[1] // 2).all()                  # at least the pruned half
            assert t[p + ".deq_scale"].dtype == torch.int64                     # fp16 path
            # exactly the tensors vLLM-Ascend's 310P W8A8S scheme creates (it aborts on weight_scale/offset)
            assert {n[len(p) + 1:] for n in t if n.startswith(p + ".")} == {
                "weight", "input_scale", "input_offset", "deq_scale", "quant_bias"}
            assert rep["layers"][layer]["passes"]["sparse"]["linears"][lin]["sparsity"] == 0.5
            if layer == 0:  # same inputs in both compiles: the pruned positions are zeros in the int8 weight
                pruned = dense[p + ".weight"] == 0
                assert pruned.sum() == q.numel() // 2 and (q[pruned] == 0).all()


def test_w8a8s_checker_accepts_the_artifact(w8a8s_out):
    assert_checker_clean(w8a8s_out[0] / "w8a8s")


def test_w8a8s_executable_runs(w8a8s_out, calib_file):
    out = w8a8s_out[0] / "w8a8s"
    layer = read_layer_tensors(out / "executable", read_info(out / "executable"), 0)
    assert layer["self_attn.q_proj.deq_scale"].dtype == torch.int64
    model = load_model(out)
    result = evaluate_file(model, calib_file, 32, 2)
    assert math.isfinite(result["ppl"]) and result["dtype"] == "float16"


def test_w8a8s_needs_sparse_and_pruned_linears(tiny_models, calib_file, tmp_path):
    tail = [make_pass(n) for n in TAIL]
    with pytest.raises(QCError, match=r"w8a8s requires \['weights_pruned'\] from a pass before it; put sparse before it"):
        PassManager([make_pass("w8a8s")] + tail).validate()
    with pytest.raises(QCError, match="bits"):
        make_pass("w8a8s", {"bits": "3"})
    with pytest.raises(QCError, match="sparse pass did not prune it"):
        _compile(tiny_models["llama"], tmp_path / "o", calib_file,
                 [("sparse", {"match": "mlp", "method": "magnitude"}), ("w8a8s", {})],
                 target="ascend310p", dtype="float16")


def test_w8a8s_bits8_uses_the_int8_range(tiny_models, calib_file, tmp_path):
    out = tmp_path / "o"
    _compile(tiny_models["qwen2"], out, calib_file, [("sparse", {"method": "magnitude"}), ("w8a8s", {"bits": "8"})],
             target="ascend310p", dtype="float16")
    q = load_file(str(out / "quant_model_weights.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert int(q.abs().max()) == 127 and ((q == 0).sum(1) >= q.shape[1] // 2).all()


# ---- ascend310p rules (all raised before any work: no output folder appears) ----------------------
def test_310p_rejects_bf16_without_dtype(tiny_models, calib_file, tmp_path):
    with pytest.raises(QCError, match=r"float16 only, not bfloat16 \(use --dtype float16\)"):
        _compile(tiny_models["llama"], tmp_path / "o", calib_file, [("w8a8", {})], target="ascend310p")
    assert not (tmp_path / "o").exists()


def test_w8a8s_rejected_on_910b_naming_310p(tiny_models, calib_file, tmp_path):
    with pytest.raises(QCError, match=r"ascend910b does not run W8A8S.*--target ascend310p"):
        _compile(tiny_models["llama"], tmp_path / "o", calib_file, [("sparse", {}), ("w8a8s", {})])
    assert not (tmp_path / "o").exists()


def test_310p_unsure_types_warn():
    t = get_target("ascend310p")
    # W8A8_DYNAMIC: vLLM-Ascend has a 310P scheme (_310p/quantization/methods/w8a8_dynamic.py)
    assert check_target(t, torch.float16, {"W8A8S", "W8A8", "W8A16", "W8A8_DYNAMIC"}) == []
    warnings = check_target(t, torch.float16, {"W8A8_MIX"})
    assert len(warnings) == 1 and "W8A8_MIX" in warnings[0]


def test_fp16_range_checked_before_work(tiny_models, calib_file, tmp_path):
    model = tmp_path / "big"
    shutil.copytree(tiny_models["llama"], model)
    f = model / "model.safetensors"
    tensors = load_file(str(f))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][3, 5] = 1.0e5    # fine in bf16, Inf in fp16
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(QCError, match=rf"weight '{name}' holds 9.98e\+04, outside float16's range.*ascend310p runs "
                                      "float16 only"):
        _compile(model, tmp_path / "o", calib_file, [("w8a8", {})], target="ascend310p", dtype="float16")
    assert not (tmp_path / "o").exists()
    with pytest.raises(QCError, match="compile with --dtype bfloat16"):
        _compile(model, tmp_path / "o", calib_file, [("w8a8", {})], dtype="float16")


# ---- weight outliers keep int8 codes (msModelSlim's sparse-quant fraction / use_sigma; issue 14) ----------
def test_outlier_split_codes_fraction_and_sigma():
    from qcompiler.ir.qspec import OutlierSplit
    from qcompiler.calibration.weight_clip import outlier_split_codes
    w = torch.tensor([[0.1, -0.2, 0.35, 3.0, -0.05, 0.0, 0.21, -0.14]])
    q, scale = outlier_split_codes(w, 4, OutlierSplit(fraction=0.125))        # 1 outlier of 8: the 3.0
    assert scale.item() == pytest.approx(0.35 / 7)                           # from the inliers' absmax
    assert q.tolist() == [[2, -4, 7, 60, -1, 0, 4, -3]]                       # 3.0 / 0.05 = 60: an int8 code
    q, scale = outlier_split_codes(w, 4, OutlierSplit(sigma=2.0))            # |w - mean| > 2 std: the 3.0 again
    assert q[0, 3].item() == 60 and q.abs().masked_fill(q.abs() == 60, 0).max().item() <= 7
    q, scale = outlier_split_codes(w, 4, OutlierSplit())                      # no outliers: plain absmax / 7
    assert scale.item() == pytest.approx(3.0 / 7) and q.abs().max().item() == 7


def test_w8a8s_fraction_compiles_and_keeps_outlier_codes(tiny_models, calib_file, tmp_path):
    out = tmp_path / "o"
    _compile(tiny_models["llama"], out, calib_file, [("sparse", {"ratio": "0"}), ("w8a8s", {"fraction": "0.05"})],
             target="ascend310p", dtype="float16")
    t = load_file(str(out / "quant_model_weights.safetensors"))
    w = t["model.layers.0.mlp.gate_proj.weight"]
    big = (w.abs() > 7).float().sum(1)                      # per row at most round(0.05 * 64) = 3 outliers
    assert big.max().item() <= 3 and big.sum().item() > 0
    assert w.abs().max().item() <= 127


def test_w8a8s_fraction_refuses_gptq_codes(tiny_models, calib_file, tmp_path):
    with pytest.raises(QCError, match="fraction/sigma choose"):
        _compile(tiny_models["llama"], tmp_path / "o", calib_file,
                 [("sparse", {"ratio": "0"}), ("gptq", {}), ("w8a8s", {"fraction": "0.05"})],
                 target="ascend310p", dtype="float16")
    with pytest.raises(QCError, match="weight_observer=minmax"):
        make_pass("w8a8s", {"fraction": "0.05", "weight_observer": "mse"})


def test_sparse_ratio_zero_records_natural_sparsity(tiny_models, calib_file, tmp_path):
    """`sparse:ratio=0,w8a8s` (msModelSlim's lowbit: no pruning) prunes nothing: the stored codes are the plain
    4-bit-range round of the unpruned weights."""
    out = tmp_path / "o"
    rep = _compile(tiny_models["llama"], out, calib_file, [("sparse", {"ratio": "0"}), ("w8a8s", {})],
                   target="ascend310p", dtype="float16")
    recs = rep["layers"][0]["passes"]["sparse"]["linears"]
    assert {r["method"] for r in recs.values()} == {"none (ratio=0)"}
    assert all(r["sparsity"] < 0.01 for r in recs.values())


# ---- one range for the outlier settings, whichever entry point sets them (ir/qspec.py) ---------------------
@pytest.mark.parametrize("name,opts,needle", [
    ("w8a8s", {"sigma": "5"}, "sigma 5.0 must be in [3.0, 4.0]"),     # --sigma_factor 5 was refused, this was not
    ("w8a8s", {"sigma": "2.5"}, "sigma 2.5 must be in [3.0, 4.0]"),
    ("w8a8s", {"fraction": "0.5"}, "fraction 0.5 must be 0 (off) or in [0.01, 0.1]"),
    ("sparse", {"fraction": "0.2"}, "fraction 0.2 must be 0 (off) or in [0.01, 0.1]"),
])
def test_pass_outlier_options_take_msmodelslims_range(name, opts, needle):
    with pytest.raises(QCError) as e:
        make_pass(name, opts)
    assert needle in str(e.value), e.value


def test_pass_outlier_options_in_range_are_taken():
    assert make_pass("w8a8s", {"sigma": "3"}).options.sigma == 3          # an integer text is the number 3.0
    assert make_pass("w8a8s", {"sigma": "4.0", "fraction": "0"}).options.sigma == 4.0
    assert make_pass("sparse", {"fraction": "0.01"}).options.fraction == 0.01


def test_cli_passes_sigma_out_of_range_is_one_line(capsys, tiny_models, tmp_path):
    from qcompiler import cli
    rc = cli.main([str(tiny_models["llama"]), "--passes", "sparse:ratio=0,w8a8s:sigma=5", "--target", "ascend310p",
                   "--dtype", "float16", "-o", str(tmp_path / "o")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "sigma 5.0 must be in [3.0, 4.0]" in lines[0], lines
    assert not (tmp_path / "o").exists()
