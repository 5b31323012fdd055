"""Sampling calibration text needs the whole float model in memory: estimated and refused before any work."""
import sys

import pytest

from qcompiler import memory
from qcompiler.config import CompileOptions
from qcompiler.driver import compile_model
from qcompiler.errors import QCError
from qcompiler.loading import open_checkpoint


def test_estimate_counts_every_weight_at_the_compile_dtype(tiny_models):
    ckpt = open_checkpoint(tiny_models["llama"])
    floats, other = memory.weight_numel(ckpt)
    from safetensors.torch import load_file
    state = {}
    for f in set(ckpt.weight_map.values()):
        state.update(load_file(str(ckpt.path / f)))
    assert floats == sum(t.numel() for t in state.values()) and other == 0
    need = memory.sampling_bytes(ckpt, 16, 256)
    assert need >= floats * 2 * memory.LOADER_FACTOR + memory.FIXED_OVERHEAD   # bf16: 2 bytes each
    assert memory.sampling_bytes(ckpt, 32, 256) > need                          # the KV cache grows with it
    ckpt32 = open_checkpoint(tiny_models["llama"], "float16")
    assert memory.sampling_bytes(ckpt32, 16, 256) == need                       # same itemsize


def test_decision_with_mocked_available_memory(tiny_models):
    ckpt = open_checkpoint(tiny_models["llama"])
    need = memory.sampling_bytes(ckpt, 16, 256)
    memory.check_sampling_memory(ckpt, 16, 256, available=need)           # fits exactly: fine
    with pytest.raises(QCError, match=r"needs about .* GiB .* --calib FILE \(qcompile quant: --calib_file FILE\)"):
        memory.check_sampling_memory(ckpt, 16, 256, available=need - 1)


def test_compile_without_calib_refuses_before_any_work(monkeypatch, tiny_models, tmp_path):
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)      # 1 MiB free
    with pytest.raises(QCError, match="no calibration text was given"):
        compile_model(CompileOptions(model=str(tiny_models["llama"]), out=tmp_path / "o"), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []                                # nothing written


def test_with_calibration_text_no_check(monkeypatch, tiny_models, calib_file, tmp_path):
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    rep = compile_model(CompileOptions(model=str(tiny_models["llama"]), out=tmp_path / "o", calib=calib_file,
                                       calib_samples=2, seq_len=32), log=lambda m: None)
    assert rep["model_quant_type"] == "W8A8"


def test_compile_holds_no_tensor_of_the_previous_layer(tiny_models, calib_file, tmp_path, monkeypatch):
    """While layer i compiles, nothing of layer i-1's artifact tensors is alive (they are on disk): the driver once
    kept the previous layer's `written` dict (its int8 weights) through the next layer, one layer of memory more
    (0.6 GiB at Qwen3-30B-A3B's layer shape)."""
    import gc
    import weakref
    from qcompiler import driver
    refs, alive_at = [], []
    add_tensors, forward = driver._add_layer_tensors, driver.run_layer_batched

    def recording_add(writer, ctx, gm, ckpt):
        types, written = add_tensors(writer, ctx, gm, ckpt)
        if ctx.index == 0:
            refs.extend(weakref.ref(t) for t in written.values())
        return types, written

    def checking_forward(*args, **kwargs):
        if refs:  # layer 1's forward: layer 0 is done
            gc.collect()
            alive_at.append(sum(r() is not None for r in refs))
        return forward(*args, **kwargs)
    monkeypatch.setattr(driver, "_add_layer_tensors", recording_add)
    monkeypatch.setattr(driver, "run_layer_batched", checking_forward)
    compile_model(CompileOptions(model=str(tiny_models["llama"]), out=tmp_path / "out", passes=(("w8a8d", {}),),
                                 calib=calib_file, calib_samples=2, seq_len=16))
    assert refs and alive_at == [0]


def test_release_freed_memory_frees_a_finished_layers_cycles():
    """A finished layer's GraphModule sits in reference cycles: reference counting alone keeps its tensors; the
    driver's call between layers frees them (qcompiler/memory.py)."""
    import gc
    import weakref
    import torch
    from qcompiler.memory import _malloc_trim, release_freed_memory

    class Holder:
        pass
    gc.disable()  # no automatic collection may free the cycle before the call under test
    try:
        a, b = Holder(), Holder()
        a.other, b.other = b, a
        a.weights = torch.ones(1024)
        alive = weakref.ref(a)
        del a, b
        assert alive() is not None  # the cycle survives reference counting
        release_freed_memory()
        assert alive() is None
    finally:
        gc.enable()
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert _malloc_trim() is not None  # glibc: the heap is trimmed too


def test_long_lived_frozen_leaves_the_layer_garbage_collectable_and_unfreezes():
    """Inside the layer loop's freeze a finished layer's cycles are still collected, objects alive before it are
    frozen (not scanned), and everything is handed back on exit, on an error too (in-process compiles follow each other)."""
    import gc
    import weakref

    from qcompiler.memory import long_lived_frozen, release_freed_memory

    class Node:
        pass

    with pytest.raises(ValueError):
        with long_lived_frozen():
            assert gc.get_freeze_count() > 0
            a, b = Node(), Node()
            a.other, b.other = b, a  # a cycle made inside, like a finished layer's GraphModule
            dead = weakref.ref(a)
            del a, b
            release_freed_memory()
            assert dead() is None
            raise ValueError("a compile error")
    assert gc.get_freeze_count() == 0
