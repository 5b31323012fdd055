"""End to end on the real SmolLM2-135M (Llama and Qwen2 architecture), built by ../shared/models/get_models.py.

Small calibration (8 x 256 tokens of wiki_calib) keeps each compile around a minute on 2 cores; the full
64 x 512 figures are in BENCHMARKS.md (bench/run_core.py). Skipped when ../shared is absent.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qcompiler.cli import main
from tests.helpers import SHARED

pytestmark = pytest.mark.skipif(not (SHARED / "models" / "get_models.py").is_file(), reason="needs ../shared")

CALIB = SHARED / "data" / "calib" / "wiki_calib.jsonl"
EVAL = SHARED / "data" / "calib" / "wiki_eval.jsonl"
CHECKER = SHARED / "tools" / "check_ascend_artifact.py"


@pytest.fixture(scope="session")
def smollm2():
    dest = os.environ.get("QC_MODELS", str(Path.home() / ".cache" / "qc-models"))
    out = subprocess.run([sys.executable, str(SHARED / "models" / "get_models.py"), "--dest", dest],
                         check=True, capture_output=True, text=True).stdout.split()
    return {"llama": Path(out[0]), "qwen2": Path(out[1])}


@pytest.fixture(scope="session")
def compiled(smollm2, tmp_path_factory):
    """Compile lazily and once per (arch, dtype, extra args)."""
    cache = {}
    root = tmp_path_factory.mktemp("e2e")

    def get(arch, dtype="bfloat16", *extra):
        key = (arch, dtype, extra)
        if key not in cache:
            out = root / f"{arch}-{dtype}-{len(cache)}"
            args = [str(smollm2[arch]), "--passes", "w8a8", "--target", "ascend910b", "--calib", str(CALIB),
                    "--calib-samples", "8", "--seq-len", "256", "--dtype", dtype, "-o", str(out), *extra]
            assert main(args) == 0
            cache[key] = out
        return cache[key]
    return get


def _check(out):
    r = subprocess.run([sys.executable, str(CHECKER), str(out)], capture_output=True, text=True)
    return r.returncode, r.stdout


@pytest.mark.parametrize("arch,dtype", [("llama", "bfloat16"), ("qwen2", "bfloat16"),
                                        ("llama", "float16"), ("qwen2", "float16")])
def test_artifact_passes_checker(compiled, arch, dtype):
    out = compiled(arch, dtype)
    rc, text = _check(out)
    assert rc == 0 and text.splitlines()[-1].startswith("0 errors"), text[-2000:]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["quant_model_weights.safetensors"]


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
    out = compiled("llama", "bfloat16", "--exclude", r"mlp\.down_proj")
    capsys.readouterr()
    assert main(["run", str(out), "--prompt", "What is the capital of France?", "--max-new-tokens", "24"]) == 0
    text = capsys.readouterr().out.lower()
    assert "paris" in text, text
