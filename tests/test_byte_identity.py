"""The byte-identity harness (tests/byte_identity.py) that a refactoring runs before and after each step.

Why no digests are committed here: they are not stable across machines. On this project's 2-core AMD EPYC
(AVX512), recording 5 tiny cases with ATEN_CPU_CAPABILITY=avx2, or with 1 thread instead of 2, gave the
same digests; with the BLAS / oneDNN kernels held to AVX2 as well (ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2) 4 of the 5 changed (layer 1's scales and codes: layer 0's float output moved by
an ulp). So the before/after comparison is the script's, on one machine; these tests keep what it relies on:
- the fixed list covers every pass, architecture and target (a new pass without a case fails here);
- a compile is deterministic: the same case compiled twice gives the same digests, file by file and tensor
  by tensor (artifact, executable files, executable tensors as loaded, report facts);
- a difference is reported by name (the tensor, not only the file).
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcompiler.passes import REGISTRY, user_pass_names
from qcompiler.passes.properties import ANNOTATED, WEIGHTS_PRUNED
from qcompiler.targets import TARGETS
from tests import byte_identity

#: compiled twice each: the float transforms, kv8 and the 4-bit packed path on two architectures
TWICE = ("qwen2/smooth-w8a8d-kv8", "llama/awq-gptq-w4a16")


def _passes_of(pipeline: str) -> set[str]:
    return {chunk.split(":")[0] for chunk in pipeline.split(",")}


def test_tiny_list_covers_every_pass_architecture_and_target():
    cases = byte_identity.TINY_CASES
    used = set().union(*(_passes_of(passes) for _, _, passes, _ in cases))
    assert set(user_pass_names()) <= used, f"passes without a byte-identity case: {set(user_pass_names()) - used}"
    schemes = {n for n, cls in REGISTRY.items() if cls.quant_type and ANNOTATED in cls.produces}
    for arch in byte_identity.ARCHS:
        # every scheme alone on every architecture (w8a8s / w16a16s only after sparse: they require it)
        alone = {passes for name, a, passes, _ in cases if a == arch}
        # a case an architecture runs with other passes (ARCH_PIPELINES: qwen2's biased q/k/v take w8a8d next to
        # w4a8d) still covers its scheme there: that scheme must be in the replacement
        for (a, name), passes in byte_identity.ARCH_PIPELINES.items():
            if a == arch and name in _passes_of(passes):
                alone.add(name)
        after_sparse = {n for n in schemes if WEIGHTS_PRUNED in REGISTRY[n].requires}
        assert after_sparse == {"w8a8s", "w16a16s"}
        assert schemes - after_sparse <= alone, (arch, schemes - alone)
        assert {f"sparse:ratio=0.5,{n}" for n in after_sparse} <= alone, arch
    targets = {flags[flags.index("--target") + 1] for *_, flags in cases if "--target" in flags} | {"ascend910b"}
    assert targets == set(TARGETS)
    assert {a for _, a, _, _ in cases} == {"llama", "qwen2", "qwen3"}
    assert len({name for name, *_ in cases}) == len(cases)


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    work = tmp_path_factory.mktemp("identity")
    cases = [c for c in byte_identity.TINY_CASES if c[0] in TWICE]
    first = byte_identity.record_tiny(work / "a", cases)
    second = byte_identity.record_tiny(work / "b", cases)
    return work, first, second


def test_compiles_are_deterministic(twice):
    _, first, second = twice
    assert set(first) == set(TWICE)
    assert byte_identity.compare(first, second) == []
    for case, digests in first.items():
        kinds = {key.split(":")[0] for key in digests}
        assert kinds == {"file", "tensor", "loaded", "report"}, (case, kinds)
        assert any(key.startswith("loaded:layer1/") for key in digests)
        assert "file:quant_model_description.json" in digests


def test_a_changed_tensor_is_named(twice, tmp_path):
    work, first, _ = twice
    out = work / "a" / "out" / "qwen2__smooth-w8a8d-kv8"
    weights = out / "quant_model_weights.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.1.self_attn.k_proj.kv_cache_scale"
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(weights), metadata={"format": "pt"})
    changed = {"qwen2/smooth-w8a8d-kv8": byte_identity.digest_out(out)}
    lines = byte_identity.compare({"qwen2/smooth-w8a8d-kv8": first["qwen2/smooth-w8a8d-kv8"]}, changed)
    assert len(lines) == 1 and lines[0].startswith("qwen2/smooth-w8a8d-kv8: changed ")
    assert f"tensor:quant_model_weights.safetensors:{name}" in lines[0]
    assert "file:quant_model_weights.safetensors" in lines[0]


def test_compare_cli_exit_status(twice, tmp_path, capsys):
    _, first, second = twice
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"torch": torch.__version__, "cases": first}))
    b.write_text(json.dumps({"torch": torch.__version__, "cases": {**second, "extra/case": {}}}))
    assert byte_identity.main(["compare", str(a), str(a)]) == 0
    assert byte_identity.main(["compare", str(a), str(b)]) == 1
    assert "extra/case: only in after" in capsys.readouterr().out
