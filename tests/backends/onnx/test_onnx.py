"""ONNX backend: qc::* op lowerings vs the CPU reference kernels, and whole compiled models under
onnxruntime vs the executable graph (tiny models, `--target onnx`).

Tolerances and why:
- op level (float32 inputs, both sides float32): integer parts are exact (MatMulInteger), so
  dynamic/KV/FA quantization codes must match exactly and pertoken/static matmuls to float32 rounding
  (rtol 1e-5); static `quantize` may differ by one code where ORT's `x / (1/recip)` and the engine's
  `x * recip` straddle a .5 tie (rare: <= 1% of elements, never more than one code); weight-only
  matmuls match the kernel fed with model-dtype scales to float32 matmul rounding (rtol 1e-4); a group
  size MatMulNBits cannot take (48) goes through the primitive fallback, checked the same way.
- whole model: the executable graph rounds activations to bf16 (relative step 2^-8) and may pick the
  neighbouring int8 code near a rounding boundary, the ONNX model is float32: max |logit diff| <= 5% of
  max |logit| and perplexity within 0.5% (measured on these models: <= 2.1% and <= 0.02%).
"""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from qcompiler.backends import ascend  # noqa: E402,F401
from qcompiler.backends.ascend import kernels  # noqa: E402
from qcompiler.backends.ascend.int4 import pack_int4  # noqa: E402
from qcompiler.cli import main  # noqa: E402

Q = torch.ops.qc


class AllOps(torch.nn.Module):
    """Every qc op the ONNX backend lowers, on float32 activations."""

    def __init__(self, k=64, n=48, g=32):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        w8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        w4 = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
        self.register_buffer("w8", w8)
        self.register_buffer("w4k", pack_int4(w4, dim=1))        # W4A16 per-channel: packed along k
        self.register_buffer("w4n", pack_int4(w4, dim=0))        # W4A16 per-group / W4A8: packed along n
        self.register_buffer("ws", torch.rand(n, 1, generator=gen) / 100 + 1e-3)
        self.register_buffer("wg", torch.rand(n, k // g, generator=gen) / 100 + 1e-3)
        self.register_buffer("zc", torch.zeros(n, 1))
        self.register_buffer("zg", torch.zeros(n, k // g))
        self.register_buffer("bias", torch.randn(n, generator=gen))
        self.register_buffer("s_x", torch.tensor([0.0123]))
        self.register_buffer("o_x", torch.tensor([3.0]))
        self.register_buffer("deq", torch.rand(n, generator=gen) / 1000)
        self.register_buffer("qb", torch.randint(-500, 500, (n,), generator=gen, dtype=torch.int32))
        self.register_buffer("kv_s", torch.rand(2 * 16, generator=gen) / 50 + 1e-3)
        self.register_buffer("fa_s", torch.rand(2, 1, generator=gen) / 50 + 1e-3)
        self.g = g

    def forward(self, x, h):
        f32 = torch.float32
        xq, ts = Q.dynamic_quant(x)
        xs = Q.quantize(x, self.s_x, self.o_x)
        return (xq, ts, xs,
                Q.quant_matmul_pertoken(xq, self.w8, self.ws, ts, self.bias, 0, f32),
                Q.quant_matmul_pertoken(xq, self.w4n, self.ws, ts, None, 2, f32),
                Q.quant_matmul(xs, self.w8, self.deq, self.qb, f32),
                Q.weight_quant_matmul(x, self.w8, self.ws, self.zc, self.bias, 0, 0),
                Q.weight_quant_matmul(x, self.w8, self.wg, self.zg, None, self.g, 0),
                Q.weight_quant_matmul(x, self.w4k, self.ws, self.zc, None, 0, 1),
                Q.weight_quant_matmul(x, self.w4n, self.wg, self.zg, None, self.g, 2),
                Q.kv_dequant(Q.kv_quant(h, self.kv_s), self.kv_s, f32),
                Q.fa_dequant(Q.fa_quant(h, self.fa_s), self.fa_s, f32),
                Q.quant_matmul_pergroup(xq, self.w4n, self.ws, self.wg * 100, ts, self.g, f32))


@pytest.fixture(scope="module")
def ops_session(tmp_path_factory):
    import onnxruntime as ort

    from qcompiler.backends.onnx.lower import lower_qc_nodes
    from qcompiler.backends.onnx.translate import translation_table
    m = AllOps().eval()
    x, h = torch.randn(2, 5, 64) * 3, torch.randn(1, 2, 5, 16)
    dims = ({0: torch.export.Dim("b"), 1: torch.export.Dim("s")}, {2: torch.export.Dim("l")})
    prog = torch.onnx.export(m, (x, h), dynamo=True, custom_translation_table=translation_table(),
                             dynamic_shapes=dims, opset_version=20, optimize=True, verbose=False)
    proto = prog.model_proto
    stats = lower_qc_nodes(proto, "bfloat16")
    proto.ir_version = min(proto.ir_version, 10)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return m, sess, stats


def test_every_op_is_lowered_to_standard_ops(ops_session):
    _, sess, stats = ops_session
    assert stats["MatMulNBits4"] == 2 and stats["MatMulNBits8"] == 2
    assert stats["MatMulInteger"] == 3 and stats["QuantizeLinear"] == 1
    assert stats["MatMulInteger(per-group)"] == 1


def test_op_lowerings_match_the_reference_kernels(ops_session):
    m, sess, _ = ops_session
    torch.manual_seed(1)
    x, h = torch.randn(3, 7, 64) * 3, torch.randn(1, 2, 9, 16)
    x[0, 0] = 0  # an all-zero row: dynamic scale 1
    got = [torch.from_numpy(a) for a in sess.run(None, {"x": x.numpy(), "h": h.numpy()})]
    with torch.inference_mode():
        ref = m(x, h)
    xq, ts, xs = got[:3]
    assert torch.equal(xq, ref[0]) and torch.equal(ts, ref[1])            # dynamic per-token int8: exact
    # static: the Ascend math with the bf16-rounded reciprocal (engines: recip = dtype(1/dtype(s)))
    recip = (1 / m.s_x.bfloat16()).bfloat16().float()
    want = torch.clamp(torch.round(x * recip + m.o_x), -128, 127).to(torch.int8)
    d = (xs.int() - want.int()).abs()
    assert d.max() <= 1 and (d > 0).float().mean() <= 0.01
    for i in (3, 4):
        torch.testing.assert_close(got[i], ref[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[5], kernels.quant_matmul(xs, m.w8, m.deq, m.qb, torch.float32), rtol=1e-5, atol=1e-5)
    # weight-only: the NPU takes the scales in the model dtype (bf16)
    bf = lambda t: t.bfloat16().float()  # noqa: E731
    wo = [kernels.weight_quant_matmul(x, m.w8, bf(m.ws), m.zc, m.bias, 0, 0),
          kernels.weight_quant_matmul(x, m.w8, bf(m.wg), m.zg, None, m.g, 0),
          kernels.weight_quant_matmul(x, m.w4k, bf(m.ws), m.zc, None, 0, 1),
          kernels.weight_quant_matmul(x, m.w4n, bf(m.wg), m.zg, None, m.g, 2)]
    for i, w in zip(range(6, 10), wo):
        torch.testing.assert_close(got[i], w, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[10], ref[10]) and torch.equal(got[11], ref[11])  # KV / FA int8 round trip: exact
    # W4A8_DYNAMIC per-group: exact integer group sums, the engines' two-stage scale product in the model dtype
    # (bf16); ORT's ReduceSum adds the groups in its own order
    s = kernels.two_stage_scale(m.ws, m.wg * 100, torch.bfloat16)
    w4a8 = kernels.quant_matmul_pergroup(ref[0], m.w4n, s, torch.ones_like(s), ref[1], m.g, torch.float32)
    torch.testing.assert_close(got[12], w4a8, rtol=1e-5, atol=1e-5)


# (tiny arch, passes): every scheme the issue names, mixed per Linear group so two compiles cover them;
# qwen2 has q/k/v biases (the pertoken bias path).
CASES = [("qwen2", "w8a8d:match=q_proj|k_proj|v_proj,w4a16:match=o_proj|gate_proj|up_proj,w8a16:group=32",
          {"MatMulInteger", "MatMulNBits4", "MatMulNBits8", "dynamic_quant"}),
         ("llama", "w8a16:match=down_proj,w8a8:match=self_attn,w4a8d,kv8",
          {"QuantizeLinear", "MatMulInteger", "MatMulNBits8", "qc.kv_quant", "qc.kv_dequant"})]


@pytest.mark.parametrize("arch,passes,ops", CASES, ids=["qwen2-w8a8d-w4a16-w8a16g", "llama-w8a16-w8a8-w4a8d-kv8"])
def test_target_onnx_runs_close_to_the_executable_graph(tiny_models, calib_file, tmp_path, arch, passes, ops, capsys):
    from qcompiler.backends.onnx.crosscheck import crosscheck
    out = tmp_path / "out"
    assert main([str(tiny_models[arch]), "--passes", passes, "--target", "onnx", "-o", str(out), "--calib",
                 str(calib_file), "--calib-samples", "4", "--seq-len", "32"]) == 0
    meta = json.loads((out / "onnx" / "onnx_model.json").read_text())
    assert ops <= set(meta["lowered_ops"]) and (out / "onnx" / "tokenizer.json").is_file()
    r = crosscheck(out, calib_file, seq_len=32, log=lambda m: None)
    assert r["max_abs_logit_diff"] <= 0.05 * r["max_abs_logit"], r
    assert r["ppl_rel_diff"] <= 0.005, r
    # `qcompile eval` picks onnxruntime for an OUT compiled with --target onnx, and reports the same ppl
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(calib_file), "--seq-len", "32", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["model_kind"] == "onnx" and ev["ppl"] == pytest.approx(r["ppl_onnx"], rel=1e-6)
    assert main(["run", str(out), "--prompt", "Quantization", "--max-new-tokens", "3", "--raw"]) == 0


def test_runtime_onnx_without_an_onnx_model_is_a_clear_error(tiny_models, calib_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(tiny_models["llama"]), "--passes", "w8a8d", "-o", str(out), "--calib", str(calib_file),
                 "--calib-samples", "2", "--seq-len", "16"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(calib_file), "--runtime", "onnx"]) == 2
    assert "no ONNX model" in capsys.readouterr().err


def test_target_onnx_under_a_path_that_is_not_utf8(tiny_models, calib_file, tmp_path, capsys):
    """Linux names are bytes: a model folder and OUT under a name that is not valid UTF-8. onnx's external-data
    writer raised a TypeError traceback after all the work (its C++ side takes UTF-8 strings), and onnxruntime
    cannot open such a model path either (utf8_path.py)."""
    import os
    import shutil
    from pathlib import Path
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/n\xff\xfe"))
    folder.mkdir()
    model = shutil.copytree(tiny_models["llama"], folder / "model")
    out = folder / "out"
    assert main([str(model), "--passes", "w8a8d", "--target", "onnx", "-o", str(out), "--calib", str(calib_file),
                 "--calib-samples", "2", "--seq-len", "16"]) == 0, capsys.readouterr().err
    assert (out / "onnx" / "model.onnx").is_file()
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(calib_file), "--seq-len", "16", "--max-windows", "1",
                 "--runtime", "onnx", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_kind"] == "onnx"


@pytest.fixture(scope="module")
def w8a8d_out(tiny_models, calib_file, tmp_path_factory):
    """A tiny compiled OUT (executable graph only, no onnx/)."""
    out = tmp_path_factory.mktemp("cc") / "out"
    assert main([str(tiny_models["llama"]), "--passes", "w8a8d", "-o", str(out), "--calib", str(calib_file),
                 "--calib-samples", "2", "--seq-len", "16"]) == 0
    return out


@pytest.mark.parametrize("where", ["documents", "dangling-link", "folder-link", "the-out", "contains-out",
                                   "out-executable", "contains-data"])
def test_crosscheck_onnx_dir_never_replaces_what_is_not_its_export(w8a8d_out, calib_file, tmp_path, capsys, where):
    """Rule 1: `crosscheck OUT --onnx-dir DIR` deleted DIR whatever it held (a folder of documents, the OUT it
    reads, OUT/executable, the folder of --data) and wrote at a link's target. Exit 2 naming --onnx-dir, before
    any export; nothing touched."""
    import os
    import shutil
    from qcompiler.backends.onnx.crosscheck import main as crosscheck_main
    out = shutil.copytree(w8a8d_out, tmp_path / "work" / "out")
    (tmp_path / "d").mkdir()
    data = shutil.copy(calib_file, tmp_path / "d" / "data.jsonl")
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "thesis.txt").write_text("years of work")
    dest = {"documents": tmp_path / "documents", "dangling-link": tmp_path / "link",
            "folder-link": tmp_path / "link", "the-out": out, "contains-out": tmp_path / "work",
            "out-executable": out / "executable", "contains-data": tmp_path / "d"}[where]
    if where.endswith("link"):
        os.symlink(tmp_path / ("documents" if where == "folder-link" else "nowhere"), dest)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert crosscheck_main([str(out), "--data", str(data), "--seq-len", "16", "--onnx-dir", str(dest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"crosscheck: error: --onnx-dir {dest}"), err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "documents" / "thesis.txt").read_text() == "years of work"


def test_crosscheck_exports_aside_then_in_place(w8a8d_out, calib_file, tmp_path, capsys):
    """An export into an empty --onnx-dir (and over an earlier export) leaves only the finished folder."""
    import shutil
    from qcompiler.backends.onnx.crosscheck import main as crosscheck_main
    out = shutil.copytree(w8a8d_out, tmp_path / "out")
    (tmp_path / "onnx").mkdir()
    for _ in range(2):
        assert crosscheck_main([str(out), "--data", str(calib_file), "--seq-len", "16", "--max-windows", "1",
                                "--onnx-dir", str(tmp_path / "onnx")]) == 0
        (tmp_path / "onnx" / "model.onnx").unlink()  # not a complete model: the next run exports again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "out"]
