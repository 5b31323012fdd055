"""Shared fixtures: tiny random HF checkpoints (Llama / Qwen2 / Qwen3; Qwen3-MoE / Qwen2-MoE) and a calibration file.

The builders live in tests/helpers.py (import helpers from there, never from test modules).
"""
import os

import pytest

import qcompiler.backends.ascend  # noqa: F401  the target the tests run: the qc ops' kernels, the "lower" pass
from tests.helpers import make_tiny_model, write_calib_file

os.environ.setdefault("QC_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'llama': dir, 'qwen2': dir, 'qwen3': dir} of tiny bf16 checkpoints (built once per session)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("llama", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory):
    """{'qwen3_moe': dir, 'qwen2_moe': dir} of tiny bf16 mixture-of-experts checkpoints (4 experts, top-2)."""
    root = tmp_path_factory.mktemp("tiny-moe")
    return {arch: make_tiny_model(root / arch, arch) for arch in ("qwen3_moe", "qwen2_moe")}


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    return write_calib_file(tmp_path_factory.mktemp("calib") / "calib.jsonl")


@pytest.fixture
def model_copy(tiny_models, tmp_path):
    """A private copy of the tiny llama checkpoint that a test may corrupt."""
    import shutil
    return shutil.copytree(tiny_models["llama"], tmp_path / "model")
