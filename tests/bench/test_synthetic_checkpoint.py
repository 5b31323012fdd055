"""bench/synthetic_checkpoint.py: random-weight checkpoints of real shapes, built tensor by tensor.

Tiny shapes (the presets' layouts with small widths) keep these fast; the real widths are exercised by
bench/run_memory.py."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qcompiler.errors import QCError
from qcompiler.loading import open_checkpoint
from tests.helpers import bench_module

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "synthetic_checkpoint.py"
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=1100)

sc = bench_module("synthetic_checkpoint")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_presets_have_the_published_shapes():
    q7, q72, smol = sc.resolve("qwen2.5-7b-layers2"), sc.resolve("qwen2.5-72b-layers4"), sc.resolve("smollm2-135m-depth120")
    assert (q7.num_layers, q7.full_layers, q72.num_layers, q72.full_layers) == (2, 28, 4, 80)
    assert (q7.config["hidden_size"], q7.config["intermediate_size"]) == (3584, 18944)
    assert (q72.config["hidden_size"], q72.config["intermediate_size"]) == (8192, 29568)
    for s in (q7, q72):
        assert s.config["vocab_size"] == 152064 and not s.config["tie_word_embeddings"]
    shapes = dict(sc.tensor_shapes(q72))
    assert shapes["model.layers.3.self_attn.k_proj.bias"] == (1024,)        # q/k/v bias, 8 kv heads x 128
    assert shapes["lm_head.weight"] == (152064, 8192)                         # untied
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (8192, 29568)
    assert smol.num_layers == 120 and "lm_head.weight" not in dict(sc.tensor_shapes(smol))  # tied: stored once
    with pytest.raises(sc.BuildError, match="unknown preset"):
        sc.resolve("qwen9-layers2")


@pytest.mark.parametrize("preset", ["qwen2.5-7b-layers2", "smollm2-135m-depth3"])
def test_build_passes_checkpoint_checks_and_matches_transformers(tmp_path, preset):
    spec = sc.resolve(preset, **TINY)
    folder = sc.build_checkpoint(tmp_path / "ckpt", spec, seed=1)
    ckpt = open_checkpoint(folder)  # qcompiler's checks: names, shapes, dtypes vs config.json, tokenizer
    assert ckpt.num_layers == spec.num_layers and ckpt.dtype == torch.bfloat16
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False)  # no missing/unexpected keys
    assert set(ckpt.weight_map) >= {n for n, _ in model.named_parameters()}
    w = ckpt.tensor("model.layers.1.mlp.down_proj.weight").float()
    std = 1 / (128 ** 0.5) / (2 * spec.num_layers) ** 0.5
    assert abs(float(w.std()) / std - 1) < 0.1  # scaled normal, as documented
    assert abs(float(ckpt.tensor("model.norm.weight").float().mean()) - 1) < 0.02
    ids = torch.tensor([[0, 5, 17, 300, 1000]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and 0.1 < float(logits.float().std()) < 10  # activations in range


def test_moe_preset_stores_per_expert_tensors_transformers_loads(tmp_path):
    """qwen3-30b-a3b (issue 17): the checkpoint holds per-expert tensors, as real Qwen3-MoE checkpoints do; qcompiler's
    checks accept it and transformers loads it with no missing or unexpected key (it fuses the experts itself)."""
    spec = sc.resolve("qwen3-30b-a3b-layers2", **TINY, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                      head_dim=16)
    folder = sc.build_checkpoint(tmp_path / "ckpt", spec, seed=1)
    ckpt = open_checkpoint(folder)
    assert ckpt.model_type == "qwen3_moe" and ckpt.has("model.layers.1.mlp.experts.3.down_proj.weight")
    assert ckpt.tensor("model.layers.0.mlp.gate.weight").shape == (4, 64)
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        logits = model(torch.tensor([[0, 5, 17, 300, 1000]])).logits
    assert torch.isfinite(logits).all()


def test_deterministic_by_seed_and_sharded_like_unsharded(tmp_path):
    spec = sc.resolve("qwen2.5-7b-layers2", **TINY)
    a = _digests(sc.build_checkpoint(tmp_path / "a", spec, seed=0))
    b = _digests(sc.build_checkpoint(tmp_path / "b", spec, seed=0))
    c = _digests(sc.build_checkpoint(tmp_path / "c", spec, seed=1))
    assert a == b and a["model.safetensors"] != c["model.safetensors"]
    sharded = sc.build_checkpoint(tmp_path / "s", spec, seed=0, max_shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    one, many = open_checkpoint(tmp_path / "a"), open_checkpoint(sharded)
    assert set(one.weight_map) == set(many.weight_map)
    for name in one.weight_map:
        assert torch.equal(one.tensor(name), many.tensor(name)), name


def test_refuses_existing_folder_and_missing_disk(tmp_path, monkeypatch):
    spec = sc.resolve("smollm2-135m-depth1", **TINY)
    (tmp_path / "x").mkdir()
    with pytest.raises(sc.BuildError, match="exists"):
        sc.build_checkpoint(tmp_path / "x", spec)
    monkeypatch.setattr(sc.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(sc.BuildError, match="GiB free"):
        sc.build_checkpoint(tmp_path / "y", spec)
    assert not (tmp_path / "y").exists() and [p.name for p in tmp_path.iterdir()] == ["x"]


def test_cli_errors_are_one_line(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "nope-depth3", "-o", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "unknown preset" in res.stderr


_MEMORY_PROBE = r"""
import importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location("sc", sys.argv[1]); sc = importlib.util.module_from_spec(spec)
sys.modules["sc"] = sc; spec.loader.exec_module(sc)
from qcompiler import safetensors_stream
safetensors_stream.CHUNK_BYTES = 4 * 2**20
small = sc.resolve("smollm2-135m-depth1", vocab_size=1100)
sc.build_checkpoint(sys.argv[2] + "/warm", small)              # every import and code path warmed up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
big = sc.resolve("smollm2-135m-depth24")                      # ~190 MB of bf16 tensors (a 56 MB embedding)
sc.build_checkpoint(sys.argv[2] + "/big", big)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"grew": after - before, "bytes": sc.checkpoint_bytes(big)}))
"""


def test_memory_stays_bounded_by_one_draw_block(tmp_path):
    """Peak RSS grows by about one draw block (4 MiB of float32 here), not by the checkpoint (~190 MB) nor
    by its largest tensor (the 56 MB embedding): the builder never holds a whole tensor."""
    res = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(SCRIPT), str(tmp_path)], capture_output=True,
                         text=True, cwd=SCRIPT.parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["bytes"] > 150 * 2**20
    assert got["grew"] < 40 * 2**20, got  # tolerance: allocator slack and the meta model of 24 layers
