"""Fixtures of the pass tests: layer 0 of the tiny Qwen2 (q/k/v biases, so the bias paths run) and of the tiny
Llama (no Linear bias), captured once per module as capture_layer_and_output() tuples (tests/helpers.py)."""
import pytest

from tests.helpers import capture_layer_and_output


@pytest.fixture(scope="module")
def qwen2_layer(tiny_models):
    return capture_layer_and_output(tiny_models["qwen2"])


@pytest.fixture(scope="module")
def llama_layer(tiny_models):
    return capture_layer_and_output(tiny_models["llama"])
