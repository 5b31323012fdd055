"""The executable graph of an OUT (executable.py): pickle-free, code-free, bit-identical to what ran before.

- A crafted OUT never runs a payload: an old-format `.pt2` program whose weight is a pickle with a
  `__reduce__` that writes a marker file, and JSON graphs with targets, names or arguments that are not
  allowed, are one exit-2 line naming the file in eval, run and inspect, and the marker is never written.
- Numbers: a layer rebuilt from JSON computes exactly (tolerance 0) what the same program loaded through
  torch.export's loader (the format before) computes, on every tiny architecture and several pipelines.
"""
import ast
import io
import json
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from qcompiler import cli
from qcompiler.executable import (EXECUTABLE_DIR, FORMAT_VERSION, ExecutableWriter, load_head, read_info,
                                  read_layer_tensors)
from qcompiler.ir.capture import export_program
from qcompiler.runtime import load_model

from tests.helpers import SMALL, expect_error


class _Payload:
    """Unpickling this writes `path` (what a crafted .pt2 would do to whoever loads it)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import pathlib
        return pathlib.Path.write_text, (pathlib.Path(self.path), "payload ran")


def crafted_pt2(dest, marker):
    """A real torch.export archive whose weight is stored as a pickle of _Payload (use_pickle=true)."""
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.w
    buf = io.BytesIO()
    torch.export.save(torch.export.export(Layer(), (torch.ones(4),)), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(dest, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true')
            elif "/data/weights/weight_" in item.filename:
                import pickle
                data = pickle.dumps(_Payload(marker))
            dst.writestr(item, data)
    return dest


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_models, calib_file):
    out = tmp_path_factory.mktemp("exe") / "out"
    assert cli.main([str(tiny_models["qwen2"]), "-o", str(out), "--passes", "smooth,w8a8d,kv8",
                     "--calib", str(calib_file), *SMALL]) == 0
    return out


def _argv(command, out, calib_file):
    return {"eval": ["eval", out, "--data", calib_file, "--seq-len", "16", "--max-windows", "1"],
            "run": ["run", out, "--prompt", "hello", "--max-new-tokens", "2"],
            "inspect": ["inspect", out, "--layer", "0"]}[command]


def _copy(compiled, tmp_path):
    return shutil.copytree(compiled, tmp_path / "crafted")



@pytest.mark.parametrize("command", ["eval", "run"])
@pytest.mark.parametrize("file,tensor", [("quant_model_weights.safetensors", "model.layers.1.mlp.down_proj.weight_scale"),
                                         ("quant_model_weights.safetensors", "model.norm.weight"),
                                         (f"{EXECUTABLE_DIR}/head.safetensors", "inv_freq")])
def test_non_finite_tensor_in_out_is_one_line(capsys, compiled, tmp_path, calib_file, command, file, tensor):
    """A NaN written into an OUT's tensor (a scale, the final norm, the rotary table) made `eval` print "perplexity
    nan" with exit 0 and `run` decode garbage; a compile never writes one, so it is a damaged OUT."""
    from safetensors.torch import save_file
    out = _copy(compiled, tmp_path)
    tensors = load_file(out / file)
    tensors[tensor] = tensors[tensor].clone()
    tensors[tensor].view(-1)[0] = float("nan")
    save_file(tensors, out / file, metadata={"format": "pt"})
    expect_error(capsys, _argv(command, out, calib_file), str(out / file), repr(tensor), "NaN or Inf")

def _program(out, k=0):
    return out / EXECUTABLE_DIR / "layers" / f"program_{k}.json"


# ------------------------------------------------------------------------------------------------ layout

def test_layout_is_json_and_safetensors_without_paths(compiled):
    files = sorted(p.relative_to(compiled / EXECUTABLE_DIR).as_posix() for p in (compiled / EXECUTABLE_DIR).rglob("*")
                   if p.is_file())
    info = read_info(compiled / EXECUTABLE_DIR)
    assert info["version"] == FORMAT_VERSION == 3
    assert info["layer_programs"] == [0, 0]  # both layers share one structure: one program
    assert files == ["head.safetensors", "layers/layer_000.safetensors", "layers/layer_001.safetensors",
                     "layers/program_0.json", "model.json"]
    text = "".join(p.read_text() for p in (compiled / EXECUTABLE_DIR).rglob("*.json"))
    for needle in ("site-packages", "/usr/", "/root/", "/tmp/", "/home/", str(compiled), "stack_trace", ".py"):
        assert needle not in text, needle


# ---------------------------------------------------------------------------------------- crafted OUT folders

@pytest.mark.parametrize("command", ["eval", "run", "inspect"])
def test_old_format_pt2_payload_never_runs(capsys, compiled, tmp_path, calib_file, command):
    """An OUT of format v1 whose program_0.pt2 would run a payload when unpickled: refused unread."""
    out = _copy(compiled, tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    _program(out).unlink()
    crafted_pt2(out / EXECUTABLE_DIR / "layers" / "program_0.pt2", marker)
    info = json.loads((out / EXECUTABLE_DIR / "model.json").read_text())
    (out / EXECUTABLE_DIR / "model.json").write_text(json.dumps({**info, "version": 1}))
    expect_error(capsys, _argv(command, out, calib_file), "model.json", "compiled by an older qcompiler", "recompile")
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "run", "inspect"])
def test_pt2_in_a_current_out_is_never_loaded(capsys, compiled, tmp_path, calib_file, command):
    out = _copy(compiled, tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    _program(out).unlink()
    crafted_pt2(out / EXECUTABLE_DIR / "layers" / "program_0.pt2", marker)
    expect_error(capsys, _argv(command, out, calib_file), "layers", "compiled by an older qcompiler", "recompile")
    assert not marker.exists()


def _mutate(doc, how, marker):
    nodes = doc["nodes"]
    call = next(n for n in nodes if n["op"] == "call_function" and n["target"].startswith("aten.mul"))
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    if how == "target-builtins-eval":
        call["target"] = "builtins.eval"
        call["args"] = [code]
    elif how == "target-os-system":
        call["target"] = "os.system"
    elif how == "target-not-allow-listed-aten":
        call["target"] = "aten.from_file.default"
    elif how == "target-mutating-overload":
        call["target"] = "aten.mul_.Tensor"
    elif how == "target-dunder":
        call["target"] = "aten.__class__.default"
    elif how == "name-with-code":
        call["name"] = f"x = {code}; y"
    elif how == "name-shadowing-torch":
        call["name"] = "torch"
    elif how == "attr-with-code":
        attr = next(n for n in nodes if n["op"] == "get_attr")
        attr["target"] = f"self_attn.__class__.__init__.__globals__"
    elif how == "kwarg-with-code":
        call["kwargs"] = {f"alpha=1); {code}; (": 1}
    elif how == "arg-object":
        call["args"] = [{"callable": "os.system"}]
    elif how == "arg-undefined-node":
        call["args"] = [{"node": "defined_nowhere"}, 2]
    elif how == "call-module":
        call["op"] = "call_module"
    elif how == "extra-input":
        nodes.insert(0, {"name": "extra", "op": "placeholder", "target": "extra"})
    elif how == "not-json":
        return "{not json"
    return json.dumps(doc)


MUTATIONS = ("target-builtins-eval", "target-os-system", "target-not-allow-listed-aten", "target-mutating-overload",
             "target-dunder", "name-with-code", "name-shadowing-torch", "attr-with-code", "kwarg-with-code",
             "arg-object", "arg-undefined-node", "call-module", "extra-input", "not-json")


@pytest.mark.parametrize("how", MUTATIONS)
def test_crafted_graph_file_is_one_line_naming_it(capsys, compiled, tmp_path, calib_file, how):
    out = _copy(compiled, tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    path = _program(out)
    path.write_text(_mutate(json.loads(path.read_text()), how, marker))
    expect_error(capsys, _argv("inspect", out, calib_file), str(path))
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "run"])
def test_crafted_graph_refused_by_eval_and_run(capsys, compiled, tmp_path, calib_file, command):
    out = _copy(compiled, tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    path = _program(out)
    path.write_text(_mutate(json.loads(path.read_text()), "target-builtins-eval", marker))
    expect_error(capsys, _argv(command, out, calib_file), str(path), "not on the allow-list")
    assert not marker.exists()


def test_string_constants_stay_data(compiled):
    """A string argument reaches the generated code only as a Python literal (repr), whatever it holds."""
    from qcompiler.ir import graph_json
    path = _program(compiled)
    doc = json.loads(path.read_text())
    call = next(n for n in doc["nodes"] if n["op"] == "call_function" and n["target"].startswith("aten.mul"))
    evil = "'); __import__('os').system('false'); ('"
    call["target"], call["args"], call["kwargs"] = "aten.gelu.default", [call["args"][0]], {"approximate": evil}
    tensors = read_layer_tensors(compiled / EXECUTABLE_DIR, read_info(compiled / EXECUTABLE_DIR), 0)
    gm = graph_json.module_from_json(doc, tensors, path)
    tree = ast.parse(gm.code)
    assert any(isinstance(n, ast.Constant) and n.value == evil for n in ast.walk(tree))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"__import__", "system", "os"}, names


@pytest.mark.parametrize("damage", ["model-json-dtype", "layer-programs", "tensor-shape", "missing-layer",
                                    "model-json-not-json", "artifact-names", "artifact-tensor-missing",
                                    "index-outside-out", "stored-twice"])
def test_damaged_executable_is_one_line(capsys, compiled, tmp_path, calib_file, damage):
    out = _copy(compiled, tmp_path)
    exe = out / EXECUTABLE_DIR
    info = json.loads((exe / "model.json").read_text())
    if damage == "model-json-dtype":
        (exe / "model.json").write_text(json.dumps({**info, "dtype": "load"}))
        needle = "model.json"
    elif damage == "layer-programs":
        (exe / "model.json").write_text(json.dumps({**info, "layer_programs": ["../../etc/passwd", 0]}))
        needle = "layer_programs"
    elif damage == "tensor-shape":
        doc = json.loads(_program(out).read_text())
        doc["tensors"]["mlp.down_proj.weight"]["shape"] = [1, 1]
        _program(out).write_text(json.dumps(doc))
        needle = "layer_000.safetensors"
    elif damage == "model-json-not-json":
        (exe / "model.json").write_text("[1, 2")
        needle = "model.json"
    elif damage == "artifact-names":
        (exe / "model.json").write_text(json.dumps({**info, "artifact_tensors": [[1], []]}))
        needle = "artifact_tensors"
    elif damage == "artifact-tensor-missing":
        info["artifact_tensors"][1] = info["artifact_tensors"][1] + ["mlp.nothing.weight"]
        (exe / "model.json").write_text(json.dumps(info))
        needle = "layer_001.safetensors"
    elif damage == "index-outside-out":  # a weight index naming a file elsewhere is refused, not followed
        weights = out / "quant_model_weights.safetensors"
        names = list(json.loads(weights.read_bytes()[8:8 + int.from_bytes(weights.read_bytes()[:8], "little")]))
        (out / "quant_model_weights.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {n: "../quant_model_weights.safetensors" for n in names if n != "__metadata__"}}))
        needle = "quant_model_weights.safetensors.index.json"
    elif damage == "stored-twice":
        from safetensors.torch import save_file
        path = exe / "layers" / "layer_000.safetensors"
        save_file({**load_file(path), info["artifact_tensors"][0][0]: torch.zeros(1)}, str(path))
        needle = "layer_000.safetensors"
    else:
        (exe / "layers" / "layer_001.safetensors").unlink()
        needle = "layer_001.safetensors"
    expect_error(capsys, _argv("run", out, calib_file), needle)


# ------------------------------------------------------------------------------------------- stored once

def test_tensors_are_stored_once_and_read_back_exactly(compiled):
    """Every tensor of the lowered layers and the head is the artifact's (byte for byte), read from there:
    the executable's own files hold only what the artifact does not (inv_freq)."""
    exe = compiled / EXECUTABLE_DIR
    info = read_info(exe)
    artifact = load_file(compiled / "quant_model_weights.safetensors")
    for i in range(info["num_layers"]):
        assert load_file(exe / "layers" / f"layer_{i:03d}.safetensors") == {}
        layer = read_layer_tensors(exe, info, i)
        assert layer and set(layer) == set(info["artifact_tensors"][i])
        for name, t in layer.items():
            a = artifact[f"model.layers.{i}.{name}"]
            assert t.dtype == a.dtype and torch.equal(t, a), name
    assert set(load_file(exe / "head.safetensors")) == {"inv_freq"}
    head = load_head(exe, info)
    assert torch.equal(head.embed_weight, artifact["model.embed_tokens.weight"])
    assert torch.equal(head.lm_head_weight, artifact["lm_head.weight"])
    exe_bytes = sum(p.stat().st_size for p in exe.rglob("*.safetensors"))
    assert exe_bytes < 4096 < (compiled / "quant_model_weights.safetensors").stat().st_size


def test_a_tensor_is_read_from_the_artifact_only_when_its_bytes_are_the_same():
    """Equal values are not enough: -0.0 == 0.0 (the graph would read the artifact's +0.0), NaN != NaN."""
    from qcompiler.executable import _same
    zero = torch.zeros(3)
    assert _same(zero, zero.clone()) and _same(zero, zero)
    assert not _same(zero, -zero)
    assert not _same(zero, zero.to(torch.bfloat16)) and not _same(zero, zero.reshape(1, 3))
    nan = torch.tensor([float("nan"), 1.0])
    assert _same(nan, nan.clone())
    assert _same(torch.tensor(2.0), torch.tensor(2.0))  # 0-d scales


def test_format_v2_out_still_reads(compiled, tmp_path, calib_file):
    """An OUT of format v2 (every tensor in the executable's own files) loads and computes the same."""
    from safetensors.torch import save_file

    from qcompiler.evaluate import evaluate_file
    out = _copy(compiled, tmp_path)
    exe = out / EXECUTABLE_DIR
    info = read_info(exe)
    for i in range(info["num_layers"]):
        save_file(read_layer_tensors(exe, info, i), str(exe / "layers" / f"layer_{i:03d}.safetensors"))
    head = load_head(exe, info)
    save_file({"embed_tokens.weight": head.embed_weight, "norm.weight": head.norm_weight,
               "inv_freq": head.inv_freq, "lm_head.weight": head.lm_head_weight}, str(exe / "head.safetensors"))
    v2 = {k: v for k, v in info.items() if k not in ("artifact_tensors", "head_artifact_tensors")}
    (exe / "model.json").write_text(json.dumps({**v2, "version": 2}))
    (out / "quant_model_weights.safetensors").unlink()  # v2 never reads the artifact
    ours = evaluate_file(load_model(compiled), calib_file, 16, 2)
    theirs = evaluate_file(load_model(out), calib_file, 16, 2)
    assert ours["ppl"] == theirs["ppl"]


# ------------------------------------------------------------------------------------------- bit-identical

def _torch_export_layers(tmp_path, monkeypatch):
    """Record every layer as the previous format stored it (torch.export.save of the re-exported program,
    layer tensors loaded into it), to compare with what the JSON graph computes."""
    saved = []
    original = ExecutableWriter.add

    def add(self, gm, sample, **kwargs):
        buf = io.BytesIO()
        torch.export.save(export_program(gm, sample), buf)
        saved.append(buf.getvalue())
        return original(self, gm, sample, **kwargs)
    monkeypatch.setattr(ExecutableWriter, "add", add)
    return saved


def _old_layer(blob, state):
    module = torch.export.load(io.BytesIO(blob)).module()
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    assert not missing and not unexpected
    return module


@pytest.mark.parametrize("arch,passes", [("llama", "w8a8"), ("qwen2", "smooth,w8a8d,kv8"),
                                         ("qwen3", "w4a16:group=32,fa3"), ("llama", "w8a16,fallback:level=2")])
def test_json_graph_computes_exactly_what_the_pt2_program_did(tiny_models, calib_file, tmp_path, monkeypatch,
                                                               arch, passes):
    saved = _torch_export_layers(tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert cli.main([str(tiny_models[arch]), "-o", str(out), "--passes", passes, "--calib", str(calib_file),
                     *SMALL]) == 0
    model = load_model(out)
    ids = torch.randint(0, 250, (3, 21), generator=torch.Generator().manual_seed(1))
    h_new = h_old = model.head.embed(ids)
    pe = model.head.rope(21)
    with torch.no_grad():
        for i in range(model.layers.num_layers):
            state = read_layer_tensors(out / EXECUTABLE_DIR, model.info, i)
            h_old = _old_layer(saved[i], state)(h_old, position_embeddings=pe)
            h_new = model.layers.get(i)(h_new, position_embeddings=pe)
            assert torch.equal(h_new, h_old), (arch, passes, i)
        assert torch.equal(model.head.logits(h_new), model.head.logits(h_old))


def test_decode_step_and_inspect_work_from_the_loaded_graph(compiled):
    """ir/decode.py rewrites the loaded graph (kv8: int8 cache read from the graph's types); a cached
    generation equals the recomputing one."""
    from qcompiler.generate import generate
    model = load_model(compiled)
    step, spec = model.layers.decode(0)
    assert spec.k_dtype == "int8" and spec.kv_heads == 2 and spec.head_dim == 16
    assert generate(model, "quantization", 6, raw=True) == generate(model, "quantization", 6, raw=True,
                                                                     use_cache=False)
    from qcompiler.tools.inspect import inspect_layer
    text = inspect_layer(str(compiled), 1)
    assert "qc.quant_matmul_pertoken" in text and "int8[64, 64]" in text
