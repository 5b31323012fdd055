"""Shared fixtures: tiny random HF checkpoints (Llama / Qwen2 / Qwen3) with a real tokenizer, built here.

The tokenizer is a small byte-level BPE trained in the fixture on a fixed text (tokenizers library), so
fast tests need neither the network nor ../shared. Real-model fixtures (SmolLM2 via
../shared/models/get_models.py) live in tests/e2e and skip when ../shared is absent.
"""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("QC_NO_PROGRESS", "1")

TEXT = ("Quantization maps floating point weights and activations to small integers. "
        "The Ascend NPU runs int8 matrix multiplications with int32 accumulation. "
        "A calibration set gives the ranges of the activations of every layer. ") * 20

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _config(arch: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        return LlamaConfig(**common), LlamaForCausalLM
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM
        return Qwen2Config(**common, use_sliding_window=False), Qwen2ForCausalLM
    if arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM
        return Qwen3Config(**common, head_dim=16), Qwen3ForCausalLM
    raise ValueError(arch)


def make_tiny_model(folder: Path, arch: str = "llama", dtype=torch.bfloat16, seed: int = 0) -> Path:
    """Save a tiny random `arch` checkpoint with a trained tokenizer into `folder`; returns it."""
    tok = _tokenizer()
    cfg, cls = _config(arch, len(tok))
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype).eval()
    if arch == "qwen2":  # random (non-zero) q/k/v biases, so the bias path is exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.02)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'llama': dir, 'qwen2': dir, 'qwen3': dir} of tiny bf16 checkpoints (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    import json
    rows = [{"inputs_pretokenized": TEXT[i * 200:(i + 1) * 200]} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
