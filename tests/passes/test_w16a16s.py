"""w16a16s: float sparse Linears typed W16A16S (msModelSlim's --quant_type w16a16s / float_sparse)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from qcompiler.config import CompileOptions
from qcompiler.driver import compile_model
from qcompiler.errors import QCError


def _compile(model, out, calib, passes, **kw):
    return compile_model(CompileOptions(model=str(model), out=out, calib=calib, calib_samples=2, seq_len=32,
                                        passes=tuple(passes), **kw), log=lambda m: None)


def test_pruned_float_weights_typed_w16a16s(tiny_models, calib_file, tmp_path):
    out = tmp_path / "o"
    rep = _compile(tiny_models["qwen2"], out, calib_file, [("sparse", {"ratio": "0.5", "method": "magnitude"}),
                                                          ("w16a16s", {})])
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["model_quant_type"] == "W16A16S" and rep["model_quant_type"] == "W16A16S"
    assert desc["model.layers.0.self_attn.q_proj.weight"] == "W16A16S"
    assert desc["model.layers.0.self_attn.q_proj.bias"] == "FLOAT"      # biases stay FLOAT (spec section 2)
    assert desc["model.layers.0.input_layernorm.weight"] == "FLOAT"
    t = load_file(str(out / "quant_model_weights.safetensors"))
    w = t["model.layers.1.mlp.down_proj.weight"]
    assert w.dtype == torch.bfloat16 and (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert any("W16A16S" in warning for warning in rep["warnings"])       # vLLM-Ascend has no W16A16S scheme


def test_needs_sparse_and_whole_fused_groups(tiny_models, calib_file, tmp_path):
    with pytest.raises(QCError, match="requires|sparse"):
        _compile(tiny_models["llama"], tmp_path / "a", calib_file, [("w16a16s", {})])
    with pytest.raises(QCError, match="the sparse pass did not prune it"):
        _compile(tiny_models["llama"], tmp_path / "b", calib_file,
                 [("sparse", {"ratio": "0.5", "match": "mlp"}), ("w16a16s", {})])
    with pytest.raises(QCError, match="would split"):
        _compile(tiny_models["llama"], tmp_path / "c", calib_file,
                 [("sparse", {"ratio": "0.5"}), ("w16a16s", {"match": "q_proj|o_proj"})])
