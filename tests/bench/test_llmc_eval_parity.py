"""bench/llmcompressor_side_by_side.py evaluates llm-compressor's model with its own copy of qcompiler's
windowing and perplexity (it runs in a venv without qcompiler). These tests pin that copy to the real
thing on a tiny model, so the side-by-side perplexities are comparable."""
from pathlib import Path

import torch

from qcompiler.calib_data import make_windows, read_texts
from qcompiler.evaluate import evaluate_file
from qcompiler.loading import load_tokenizer
from qcompiler.runtime import load_model
from tests.helpers import bench_module

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "llmcompressor_side_by_side.py"


def test_windows_identical(tiny_models, calib_file):
    mod = bench_module("llmcompressor_side_by_side")
    tok = load_tokenizer(tiny_models["llama"])
    assert mod.read_texts(calib_file) == read_texts(calib_file)
    for seq_len, max_windows in [(16, 5), (32, 1000)]:
        ours = make_windows(tok, read_texts(calib_file), seq_len, max_windows)
        theirs = mod.make_windows(tok, mod.read_texts(calib_file), seq_len, max_windows)
        assert torch.equal(ours, theirs)


def test_perplexity_matches_qcompile_eval(tiny_models, calib_file):
    """Same windows, HF forward vs qcompiler's float path. Tolerance 2% relative: both run the bf16
    model but not the same kernels (HF attention vs the captured graph), so logits differ by bf16
    rounding; a windowing or scoring difference (e.g. scoring token 1, or overlapping windows) moves a
    random tiny model's perplexity by far more than that."""
    from transformers import AutoModelForCausalLM
    mod = bench_module("llmcompressor_side_by_side")
    path = tiny_models["llama"]
    ours = evaluate_file(load_model(path), calib_file, seq_len=32, max_windows=6)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, trust_remote_code=False).eval()
    tok = load_tokenizer(path)
    theirs = mod.perplexity(model, mod.make_windows(tok, mod.read_texts(calib_file), 32, 6), batch=4)
    assert theirs["tokens"] == ours["tokens"]
    assert abs(theirs["ppl"] / ours["ppl"] - 1) < 0.02, (theirs, ours)
