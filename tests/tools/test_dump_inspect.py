"""--dump (graph per pass: shapes of every node, the pass's stats and what it did to each tensor, no export
noise, layer/pass filter) and `qcompile inspect OUT` (per-Linear spec and scale values from the saved
executable graph, on every target). Tiny checkpoints, 4 x 32 calibration tokens."""
import re

import pytest
import torch
from safetensors.torch import load_file

from qcompiler import cli
from qcompiler.passes.instruments import tensor_summary
from qcompiler.tools.inspect import linear_spec
from tests import byte_identity
from tests.helpers import expect_error

CALIB = ["--calib-samples", "4", "--seq-len", "32"]
NOISE = ("_assert_tensor_metadata", "sym_size", "_guards_fn")


def _compile(model, out, calib, passes, *extra):
    argv = [str(model), "--passes", passes, "--calib", str(calib), *CALIB, "-o", str(out), *map(str, extra)]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def dumped(tiny_models, calib_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("dump")
    out = _compile(tiny_models["llama"], root / "out", calib_file, "smooth,w8a8,kv8", "--dump", root / "dump",
                   "--dump-layers", "1", "--dump-passes", "capture,smooth,kv8,calibrate,lower")
    return root, out


def test_filter_writes_only_the_chosen_layers_and_passes(dumped):
    root, _ = dumped
    files = sorted(p.relative_to(root / "dump").as_posix() for p in (root / "dump").rglob("*.txt"))
    assert files == ["layer001/000_capture.txt", "layer001/002_smooth.txt", "layer001/003_kv8.txt",
                     "layer001/005_calibrate.txt", "layer001/006_lower.txt"]


def test_every_node_has_a_shape_and_no_export_noise(dumped):
    root, _ = dumped
    for path in (root / "dump").rglob("*.txt"):
        text = path.read_text()
        for noise in NOISE:
            assert noise not in text, (path.name, noise)
        nodes = [line for line in text.splitlines() if line.startswith("%")]
        assert nodes and all(re.search(r"   : \w+\[[^\]]*\]", line) for line in nodes), \
            (path.name, [line for line in nodes if "   : " not in line][:3])
    lower = (root / "dump" / "layer001" / "006_lower.txt").read_text()
    # lowering inserted these nodes: their shapes come from the ops' fake kernels
    assert re.search(r"= qc\.quantize\(.*   : int8\[s\d+, s\d+, 64\]", lower)
    assert re.search(r"= qc\.quant_matmul\(.*   : bfloat16\[s\d+, s\d+, 32\]", lower)  # k_proj: 2 heads x 16
    assert re.search(r"= aten\.view\(%\w+, \[s\d+, s\d+, -1, 16\]\)", lower)  # sym_size uses print as symbols


def test_value_only_pass_shows_stats_and_tensor_changes(dumped):
    """smooth changes no node: its dump says which alphas it chose and how each tensor changed, and the
    absmax it reports for the folded norm is the one the artifact holds."""
    root, out = dumped
    text = (root / "dump" / "layer001" / "002_smooth.txt").read_text()
    header = [line[2:] for line in text.splitlines() if line.startswith("# ")]
    assert any(line.startswith("stats.alphas: {") for line in header)
    assert "tensors: 9 changed, 0 added, 0 removed, 0 unchanged" in header
    norm = next(line for line in header if line.startswith("~ input_layernorm.weight: bfloat16[64] "))
    absmax_after = float(re.search(r"-> absmax ([0-9.e+-]+)", norm).group(1))
    artifact = load_file(str(out / "quant_model_weights.safetensors"))
    assert absmax_after == pytest.approx(artifact["model.layers.1.input_layernorm.weight"].float().abs().max().item(),
                                         rel=1e-5)
    # kv8 places absmax observers; the calibration forward (calibrate's dump) applies its scales
    kv8 = (root / "dump" / "layer001" / "003_kv8.txt").read_text()
    assert "observer qc_kv8_absmax_1" in kv8 and "kv_quant" not in kv8
    calibrate = (root / "dump" / "layer001" / "005_calibrate.txt").read_text()
    assert 'stats.applied: ["kv8"]' in calibrate and "qc_kv8_absmax" not in calibrate
    scale = artifact["model.layers.1.self_attn.k_proj.kv_cache_scale"]
    assert (f"+ self_attn.k_proj.kv_cache_scale: float32[{scale.numel()}] absmax {scale.abs().max().item():.6g}"
            in calibrate)


def test_dumping_changes_nothing_in_out(dumped, tiny_models, calib_file, tmp_path):
    _, out = dumped
    plain = _compile(tiny_models["llama"], tmp_path / "plain", calib_file, "smooth,w8a8,kv8")
    assert byte_identity.compare({"c": byte_identity.digest_out(out)}, {"c": byte_identity.digest_out(plain)}) == []


def test_tensor_summary_marks():
    before = {"a": torch.tensor([1.0, -3.0]), "b": torch.ones(8), "gone": torch.zeros(2, dtype=torch.int8)}
    after = {"a": torch.tensor([1.0, -2.0]), "b": torch.ones(8), "new": torch.full((5,), -7.0)}
    lines = tensor_summary(before, after)
    assert lines == ["tensors: 1 changed, 1 added, 1 removed, 1 unchanged",
                     "~ a: float32[2] values [1, -3] -> values [1, -2], max |change| 1",
                     "+ new: float32[5] absmax 7",
                     "- gone: int8[2] values [0, 0]",
                     "= b: float32[8] absmax 1"]


@pytest.mark.parametrize("argv, needle", [
    (["--dump-layers", "2"], "--dump-layers 2"),
    (["--dump-layers", "a"], "--dump-layers 'a'"),
    (["--dump-passes", "w8a8,nosuch"], "--dump-passes 'nosuch'"),
])
def test_dump_filter_errors(capsys, tmp_path, tiny_models, argv, needle):
    expect_error(capsys, [tiny_models["llama"], "-o", tmp_path / "out", "--dump", tmp_path / "d", *argv], needle)
    assert not (tmp_path / "out").exists()


def test_dump_filter_needs_dump(capsys, tmp_path, tiny_models, monkeypatch):
    monkeypatch.delenv("QC_DUMP_DIR", raising=False)
    expect_error(capsys, [tiny_models["llama"], "-o", tmp_path / "out", "--dump-layers", "0"], "--dump DIR")


# ---- inspect ----------------------------------------------------------------------------------------------

def _inspect(capsys, out, layer=1):
    assert cli.main(["inspect", str(out), "--layer", str(layer)]) == 0
    return capsys.readouterr().out


def test_inspect_shows_each_linear_spec_and_values(dumped, capsys):
    _, out = dumped
    text = _inspect(capsys, out)
    artifact = load_file(str(out / "quant_model_weights.safetensors"))
    lines = text.splitlines()
    spec = {m.group(1): m.group(2) for line in lines if (m := re.match(r"#   ([a-z_.]+_proj): (.*)$", line))}
    assert len(spec) == 7
    assert spec["self_attn.k_proj"] == ("W8A8 | weight int8 per-channel (in deq_scale) | activation int8 per-tensor "
                                        "static (input_scale of self_attn.q_proj) | kernel qc.quant_matmul")
    assert spec["mlp.down_proj"].endswith("(input_scale of mlp.down_proj) | kernel qc.quant_matmul")
    scale = artifact["model.layers.1.self_attn.o_proj.input_scale"].item()
    assert f"#       input_scale float32[1] = {scale:.6g}" in lines
    deq = artifact["model.layers.1.self_attn.o_proj.deq_scale"]
    assert f"#       deq_scale float32[64] {deq.min().item():.6g}..{deq.max().item():.6g}" in lines
    kv = artifact["model.layers.1.self_attn.v_proj.kv_cache_scale"]
    assert f"#       kv_cache_scale float32[32] {kv.min().item():.6g}..{kv.max().item():.6g}" in lines
    for noise in NOISE:
        assert noise not in text


def test_inspect_onnx_target_and_float16_deq_scale(tiny_models, calib_file, tmp_path, capsys):
    """An OUT built with --target onnx (it used to crash with a traceback) and a 310P float16 one, whose
    int64 deq_scale is shown as the float32 values it holds."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = _compile(tiny_models["qwen2"], tmp_path / "onnx", calib_file, "w8a8d", "--target", "onnx")
    text = _inspect(capsys, out, layer=0)
    assert "OUT/onnx/model.onnx beside it" in text
    assert "#   self_attn.q_proj: W8A8_DYNAMIC | weight int8 per-channel | activation int8 per-token dynamic" in text
    fp16 = _compile(tiny_models["llama"], tmp_path / "fp16", calib_file, "w8a8", "--target", "ascend310p",
                    "--dtype", "float16")
    lines = _inspect(capsys, fp16, layer=0).splitlines()
    from qcompiler.backends.ascend.encode import decode_deq_scale
    deq = decode_deq_scale(load_file(str(fp16 / "quant_model_weights.safetensors"))["model.layers.0.mlp.up_proj.deq_scale"])
    assert f"#       deq_scale int64[128] (float32 bits) {deq.min().item():.6g}..{deq.max().item():.6g}" in lines


def test_linear_spec_reads_group_and_code_range():
    w4 = {"weight": torch.zeros(32, 64, dtype=torch.int8), "weight_scale": torch.ones(64, 2)}
    assert linear_spec("W4A16", w4, 32) == ("W4A16 | weight int4 packed in int8 per-group (group_size 32, 2 groups) "
                                            "| activation float")
    sparse = {"weight": torch.tensor([[-7, 7], [3, 0]], dtype=torch.int8), "input_scale": torch.ones(1)}
    assert linear_spec("W8A8S", sparse, 0).startswith("W8A8S | weight int8 storage, codes -7..7 per-channel")
    assert linear_spec("FLOAT", {}, 0) == "FLOAT | weight float | activation float"
