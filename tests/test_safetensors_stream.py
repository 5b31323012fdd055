"""safetensors_stream writes exactly the bytes of safetensors' save_file, holding no tensor data."""
import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcompiler import safetensors_stream as ss
from qcompiler.safetensors_stream import Entry, SpilledFile, StreamingFile

#: every dtype the compiler writes (artifact, executable graph, synthetic checkpoints) and a few more
DTYPES = [torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
          torch.float64, torch.bool, torch.int16]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    names = ["model.layers.10.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight", "lm_head.weight",
             "a", "b.deq_scale", "z.weight_offset", "model.norm.weight", "x.quant_bias", "e", "scalar"]
    for i, name in enumerate(names):
        dtype = DTYPES[(i * 7 + seed) % len(DTYPES)]
        shape = [(3, 5), (0,), (7,), (2, 3, 4), (), (1,)][(i + seed) % 6]
        t = torch.randn(shape, generator=g) * 50
        out[name] = t > 0 if dtype == torch.bool else t.to(dtype)
    return out


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_spilled_file_is_save_file(tmp_path, seed, metadata):
    tensors = _tensors(seed)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    spill = SpilledFile(tmp_path / "spill")
    for name in reversed(list(tensors)):  # arrival order does not matter
        spill.add(name, tensors[name])
    spill.finish(tmp_path / "ours.safetensors", metadata)
    assert _sha(tmp_path / "ours.safetensors") == _sha(tmp_path / "ref.safetensors")
    assert not (tmp_path / "spill").exists()


def test_streaming_file_is_save_file_in_chunks(tmp_path):
    tensors = _tensors(3)
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    entries = [Entry(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with StreamingFile(tmp_path / "ours.safetensors", entries, {"format": "pt"}) as f:
        for e in f.order:
            flat = tensors[e.name].reshape(-1)
            for start in range(0, flat.numel(), 2):  # two elements at a time
                f.write(flat[start:start + 2])
    assert _sha(tmp_path / "ours.safetensors") == _sha(tmp_path / "ref.safetensors")


def test_streaming_file_refuses_short_or_wrong_data(tmp_path):
    entries = [Entry("a", torch.float32, (4,)), Entry("b", torch.int8, (2,))]
    f = StreamingFile(tmp_path / "x.safetensors", entries)
    assert [e.name for e in f.order] == ["a", "b"]  # float32 (larger alignment) first
    with pytest.raises(ValueError, match="is torch.float32"):
        f.write(torch.zeros(4, dtype=torch.int8))
    f.write(torch.zeros(4))
    with pytest.raises(ValueError, match="never written"):
        f.close()
    assert not (tmp_path / "x.safetensors").exists()


def test_spilled_file_copies_in_chunks(tmp_path, monkeypatch):
    """Data bigger than the copy step is copied piece by piece (never whole in memory) and stays exact."""
    monkeypatch.setattr(ss, "CHUNK_BYTES", 1000)
    tensors = {"big": torch.arange(10_000, dtype=torch.float32), "small": torch.ones(3, dtype=torch.int8)}
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    spill = SpilledFile(tmp_path / "spill")
    for n, t in tensors.items():
        spill.add(n, t)
    spill.finish(tmp_path / "ours.safetensors")
    assert _sha(tmp_path / "ours.safetensors") == _sha(tmp_path / "ref.safetensors")
    assert torch.equal(load_file(str(tmp_path / "ours.safetensors"))["big"], tensors["big"])


def test_spilled_file_takes_views_and_refuses_duplicates(tmp_path):
    base = torch.arange(12, dtype=torch.int32).view(3, 4)
    spill = SpilledFile(tmp_path / "spill")
    spill.add("t", base.T)  # non-contiguous: stored as its contiguous copy, like .contiguous() + save_file
    spill.add("row", base[1])  # a view sharing storage with the first
    with pytest.raises(ValueError, match="added twice"):
        spill.add("t", base)
    spill.finish(tmp_path / "ours.safetensors")
    got = load_file(str(tmp_path / "ours.safetensors"))
    assert torch.equal(got["t"], base.T.contiguous()) and torch.equal(got["row"], base[1])
