"""GPTQ statistics on MoE experts (issue 17 part 3): routed-token Hessian vs every-token Hessian vs RTN.

    python3 bench/run_moe_gptq_stats.py [--out DIR]

Tiny random Qwen3-MoE (w4a16 group 32 on the experts) and Qwen2-MoE (w8a8d on the experts: W4A16 and, since stop 31,
W4A8_DYNAMIC experts load in no engine for qwen2_moe, so qcompile refuses them; engines.py), 4 experts top-2, hidden 64
(tests/helpers.make_tiny_model); attention float. Calibrated on ../shared/data/calib/wiki_calib.jsonl with 1 x 32 tokens
(few tokens per expert) and 32 x 32 tokens; measured on held-out text (the first 8 x 64 tokens of wiki_eval.jsonl): per
decoder layer, the relative L2 error of the layer's own contribution (output - input) of the executable graph vs the
float layer, both fed the float model's hidden states (the routing weights zero what unchosen experts add, so this is
the error of the tokens the router sends). Treatments: `gptq:min_expert_tokens=0` (routed),
`gptq:min_expert_tokens=100000:few_tokens=all` (every token's Hessian for every expert), no gptq (RTN). Writes the "MoE
experts: GPTQ statistics" block of BENCHMARKS.md. Holds the heavy-job lock (bench/common.py) for its compiles.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import HeavyLock, replace_block  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "calib"
TREATMENTS = (("routed", "gptq:min_expert_tokens=0,"), ("all tokens", "gptq:min_expert_tokens=100000:few_tokens=all,"),
              ("RTN", ""))
SCHEMES = {"qwen3_moe": r"w4a16:match=mlp\.experts:group=32", "qwen2_moe": r"w8a8d:match=mlp\.experts"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from qcompiler import cli
    from tests.helpers import layer_output_errors, make_tiny_model
    work = Path(args.out or tempfile.mkdtemp(prefix="moe-gptq-"))
    rows = []
    with HeavyLock("moe gptq statistics"):
        for arch, scheme in SCHEMES.items():
            model = work / arch
            if not model.exists():
                make_tiny_model(model, arch)
            tok = AutoTokenizer.from_pretrained(str(model))
            text = " ".join(json.loads(line).get("text") or json.loads(line).get("inputs_pretokenized")
                            for line in open(DATA / "wiki_eval.jsonl"))
            ids = torch.tensor(tok(text[:200000])["input_ids"][:8 * 64]).reshape(8, 64)
            for samples in (1, 32):
                for name, prefix in TREATMENTS:
                    out = work / f"{arch}-{samples}-{name.replace(' ', '')}"
                    if not (out / "qcompile_report.json").exists():  # a finished compile of an earlier run is kept
                        assert cli.main([str(model), "--passes", prefix + scheme, "--calib",
                                         str(DATA / "wiki_calib.jsonl"), "--calib-samples", str(samples),
                                         "--seq-len", "32", "-o", str(out)]) == 0
                    tokens = json.loads((out / "qcompile_report.json").read_text())["layers"][0]["expert_tokens"]
                    errs = layer_output_errors(model, out, ids)
                    rows.append(f"| {arch} | {scheme} | {samples} x 32 | {', '.join(map(str, tokens))} | {name} | "
                                + " | ".join(f"{e:.4f}" for e in errs) + " |")
                    print(rows[-1], flush=True)
    body = ("| model | expert scheme | calibration | layer-0 tokens per expert | statistics | layer 0 error | "
            "layer 1 error |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    replace_block("<!-- moe-gptq:begin -->", "<!-- moe-gptq:end -->", body,
                  heading="## MoE experts: GPTQ statistics (issue 17) — `python3 bench/run_moe_gptq_stats.py`")


if __name__ == "__main__":
    main()
