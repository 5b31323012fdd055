"""C8 (`kv8`) on a tiny Qwen3 checkpoint as vLLM-Ascend 0.23.0 loads it (../shared/tools/loader_check).

vLLM-Ascend 0.23.0 loads the C8 scales of qwen3 only through its worker patch
vllm_ascend/patch/worker/patch_gqa_c8.py (it re-binds Qwen3ForCausalLM.load_weights and routes
`{k,v}_proj.kv_cache_{scale,offset}` through quantization/modelslim_config.py AscendModelSlimConfig.get_cache_scale
to `attn.{k,v}_cache_{scale,offset}`, created by methods/kv_c8.py AscendC8KVCacheAttentionMethod.create_weights).
loader_check applies no worker patch, so it reports exactly those tensors UNSUPPORTED BY ENGINE (exit 3), which
the engine matrix expects (`expected_loader_exit`); with that one patch applied, as the engine's worker does, the
same artifact loads cleanly (exit 0, every tensor). Skipped only when the tool cannot set itself up (exit 2).
"""
import pytest

from qcompiler.backends.ascend.engines import VLLM_ASCEND, expected_loader_exit, features_of_artifact, refusals
from tests.e2e.helpers import NEEDS_SHARED, compile_tiny_cases, loader_with_worker_patch

pytestmark = NEEDS_SHARED


@pytest.fixture(scope="module")
def qwen3_kv8(tmp_path_factory):
    return compile_tiny_cases(tmp_path_factory.mktemp("c8-qwen3"), "qwen3", {"w8a8-kv8": "w8a8,kv8"})["w8a8-kv8"]


def test_loader_check_reports_only_the_c8_scales_it_cannot_route(qwen3_kv8, loader_check):
    features = features_of_artifact(qwen3_kv8)
    assert features.model_type == "qwen3" and features.kv_cache
    assert refusals(VLLM_ASCEND, features, "0.23.0") == []  # the engine loads it...
    assert expected_loader_exit(features, "0.23.0") == 3     # ...the tool, without the worker patch, does not
    rc, text = loader_check(qwen3_kv8, "0.23.0")
    assert rc == 3, text[-3000:]
    limits = [line for line in text.splitlines() if line.startswith("UNSUPPORTED BY ENGINE:")]
    assert len(limits) == 4 and all(".kv_cache_" in line for line in limits), text[-3000:]
    assert "FAIL" not in text


def test_with_vllm_ascends_patch_gqa_c8_the_qwen3_c8_artifact_loads(qwen3_kv8, loader_check):
    loader_check(qwen3_kv8, "0.23.0")  # sets the tool up, or skips
    rc, text = loader_with_worker_patch(qwen3_kv8, "patch_gqa_c8", "0.23.0")
    assert rc == 0, text[-3000:]
    assert "vllm-ascend load: OK" in text and "UNSUPPORTED" not in text, text[-3000:]
