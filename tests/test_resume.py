"""Resumable compiles (issue 15 part 2, resume.py): a compile killed after layer k continues with --resume
and writes the same bytes as a compile that was never stopped.

The kill is real: `python3 -m qcompiler.cli` with QC_TEST_KILL_AFTER_LAYER=K SIGKILLs itself right after
layer K's state is committed (knobs.py; nothing runs after it, as on a power loss). Models: a 4-layer
tiny Qwen2 (q/k/v biases), 4 x 32 calibration tokens. "Same bytes": every file of OUT except the report,
and the report's JSON apart from timings (seconds, wall time, peak RSS) and `resumed_at_layer`
(tests/byte_identity.py `compile_differences`).
"""
import hashlib
import json
import os
import random
import shutil
import signal
import socket

import pytest
import torch

from qcompiler import cli
from qcompiler.backends.ascend.artifact import ArtifactWriter
from qcompiler.resume import MANIFEST, STATE_DIR, _checksum
from tests.byte_identity import compile_differences
from tests.helpers import leftovers, make_tiny_model, run_cli, start_cli, wait_for_pause

LAYERS = 4
CALIB = ["--calib-samples", "4", "--seq-len", "32"]
SCHEMES = ["w8a8", "smooth,w8a8,kv8", "gptq,w4a16", "w8a8,fallback:level=2"]


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("resume") / "qwen2x4", "qwen2", layers=LAYERS)


def _argv(model, out, calib, passes, *extra):
    return [str(model), "-o", str(out), "--calib", str(calib), *CALIB, "--passes", passes, *map(str, extra)]


def _files(folder) -> dict:
    """{relative path: sha256} of every file (and symlink) under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "link"
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def assert_same_compile(ref, out):
    assert compile_differences(ref, out) == []


def _kill_after(argv, layer):
    """Run the compile until layer `layer`'s state is committed, then SIGKILL it; returns its staging folder."""
    p = run_cli(argv, QC_TEST_KILL_AFTER_LAYER=str(layer))
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert f"test kill after layer {layer}" in p.stderr
    out = next(iter(argv[i + 1] for i, a in enumerate(argv) if a == "-o"))
    parent = __import__("pathlib").Path(out).parent
    stale = [p for p in parent.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and (stale[0] / STATE_DIR / MANIFEST).is_file(), sorted(parent.iterdir())
    return stale[0]


@pytest.fixture(scope="module")
def reference(model4, tmp_path_factory, calib_file):
    """{passes: OUT of an uninterrupted compile} (made when first asked)."""
    root = tmp_path_factory.mktemp("ref")
    cache = {}

    def get(passes):
        if passes not in cache:
            out = root / passes.replace(",", "_")
            assert cli.main(_argv(model4, out, calib_file, passes)) == 0
            cache[passes] = out
        return cache[passes]
    return get


@pytest.mark.parametrize("passes", SCHEMES)
def test_resume_after_kill_equals_uninterrupted(passes, model4, calib_file, reference, tmp_path, capsys):
    """Killed after a random layer, --resume writes the artifact, executable graph and report of a run that
    was never stopped, byte for byte (timings apart); nothing else is left beside OUT."""
    k = random.randrange(LAYERS)
    argv = _argv(model4, tmp_path / "out", calib_file, passes)
    folder = _kill_after(argv, k)
    assert cli.main(argv + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert f"--resume: continuing {folder} at layer {k + 1} of {LAYERS}" in err, (k, err)
    assert "fallback" not in err, err  # the fallback decision is restored, not measured again
    assert_same_compile(reference(passes), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "qcompile_report.json").read_text())["resumed_at_layer"] == k + 1
    assert leftovers(tmp_path) == ["out"], k


def test_resume_with_calibration_sampled_from_the_model(model4, tmp_path, capsys):
    """No --calib: the windows are sampled from the model (seed 0); a resume does not sample again (it
    needs only the committed layer inputs) and writes the uninterrupted result."""
    def argv(out):
        return [str(model4), "-o", str(out), "--calib-samples", "2", "--seq-len", "16", "--passes", "w8a8"]
    assert cli.main(argv(tmp_path / "ref")) == 0
    _kill_after(argv(tmp_path / "out"), 2)
    capsys.readouterr()
    assert cli.main(argv(tmp_path / "out") + ["--resume"]) == 0
    assert "sampling" not in capsys.readouterr().err
    assert_same_compile(tmp_path / "ref", tmp_path / "out")


@pytest.fixture(scope="module")
def killed(model4, calib_file, tmp_path_factory):
    """A w8a8 compile killed after layer 1: (folder holding its staging folder + lock file, staging folder)."""
    root = tmp_path_factory.mktemp("killed")
    folder = _kill_after(_argv(model4, root / "out", calib_file, "w8a8"), 1)
    return root, folder


def _copy_killed(killed, tmp_path):
    """A private copy of the killed compile's leftovers beside tmp_path/out; returns the staging folder."""
    root, folder = killed
    for p in root.iterdir():
        if p.name.startswith(".out."):
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp_path / p.name)
    return tmp_path / folder.name


def test_garbage_after_the_last_commit_is_discarded(killed, tmp_path, model4, calib_file, reference):
    """What a kill leaves after the last commit (bytes of the next layer in the open shard, files of a layer
    or of the finish) is deleted on resume; the result is still the uninterrupted one."""
    folder = _copy_killed(killed, tmp_path)
    spill = next(folder.glob(".quant_model_weights-part*.spill"))
    with open(spill, "ab") as f:
        f.write(b"\x07" * 999)
    (folder / "quant_model_weights.safetensors").write_bytes(b"half a finish")
    (folder / "executable" / "layers" / "layer_002.safetensors").write_bytes(b"uncommitted")
    (folder / STATE_DIR / "inputs-00003.safetensors.tmp").write_bytes(b"torn")
    assert cli.main(_argv(model4, tmp_path / "out", calib_file, "w8a8", "--resume")) == 0
    assert_same_compile(reference("w8a8"), tmp_path / "out")
    assert leftovers(tmp_path) == ["out"]


@pytest.mark.parametrize("change, named", [
    (["--passes", "w8a16"], "--passes"),
    (["--calib-samples", "3"], "--calib-samples / --seq-len"),
    (["--exclude", r"mlp\.down_proj"], "--exclude"),
    (["--calib", "OTHER"], "the calibration windows"),
    (["--model", "OTHER"], "the model checkpoint"),
], ids=["passes", "calib-samples", "exclude", "calib-text", "model"])
def test_resume_with_changed_inputs_is_refused(change, named, killed, tmp_path, model4, calib_file, capsys):
    """--resume with other options, calibration or model: exit 2, one line naming what changed; the
    stopped compile's folder is left exactly as it was."""
    folder = _copy_killed(killed, tmp_path)
    before = _files(folder)
    argv = _argv(model4, tmp_path / "out", calib_file, "w8a8", "--resume")
    if change[0] == "--calib":
        other = tmp_path / "other.jsonl"
        other.write_text("\n".join(reversed(calib_file.read_text().splitlines())) + "\n")
        argv[argv.index("--calib") + 1] = str(other)
    elif change[0] == "--model":
        argv[0] = str(make_tiny_model(tmp_path / "other_model", "qwen2", layers=LAYERS, seed=5))
    elif change[0] == "--calib-samples":
        argv[argv.index("--calib-samples") + 1] = change[1]
    elif change[0] == "--passes":
        argv[argv.index("--passes") + 1] = change[1]
    else:
        argv += change
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("qcompile: error: --resume:") and named in lines[-1], lines
    assert "differs from this one in " in lines[-1] and "Traceback" not in "".join(lines)
    assert _files(folder) == before
    assert not (tmp_path / "out").exists()


def _flip_byte(path, at=-1):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["shard-spill", "executable-layer", "program", "inputs", "truncated-spill",
                                    "manifest", "manifest-value", "missing-file", "symlink"])
def test_damaged_state_is_refused(damage, killed, tmp_path, model4, calib_file, capsys):
    """Any reused file that is not what was committed (a bit flipped, cut short, missing, replaced by a
    symlink, a torn manifest): exit 2 naming the file, nothing written, the folder left as it is."""
    folder = _copy_killed(killed, tmp_path)
    spill = next(folder.glob(".quant_model_weights-part*.spill"))
    layer0 = folder / "executable" / "layers" / "layer_000.safetensors"
    if damage == "shard-spill":
        _flip_byte(spill, 100)
    elif damage == "executable-layer":
        _flip_byte(layer0)
    elif damage == "program":
        _flip_byte(folder / "executable" / "layers" / "program_0.json", 10)
    elif damage == "inputs":
        _flip_byte(next((folder / STATE_DIR).glob("inputs-*.safetensors")))
    elif damage == "truncated-spill":
        with open(spill, "r+b") as f:
            f.truncate(spill.stat().st_size - 8)
    elif damage == "manifest":
        m = folder / STATE_DIR / MANIFEST
        m.write_bytes(m.read_bytes()[:100])
    elif damage == "manifest-value":  # still valid JSON: found by the manifest's checksum
        m = folder / STATE_DIR / MANIFEST
        m.write_text(m.read_text().replace('"W8A8"', '"W8A16"', 1))
    elif damage == "missing-file":
        layer0.unlink()
    elif damage == "symlink":
        target = tmp_path / "elsewhere.safetensors"
        shutil.copy(layer0, target)
        layer0.unlink()
        layer0.symlink_to(target)
    before = _files(folder)
    assert cli.main(_argv(model4, tmp_path / "out", calib_file, "w8a8", "--resume")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is damaged" in line and str(folder) in line and "remove that folder" in line, line
    assert _files(folder) == before
    assert not (tmp_path / "out").exists()


def test_without_resume_the_state_is_reported_not_reused(killed, tmp_path, model4, calib_file, capsys, reference):
    """A compile without --resume says the stopped one can be resumed, compiles from layer 0 (its result
    the uninterrupted one), and leaves the stopped one's folder alone."""
    folder = _copy_killed(killed, tmp_path)
    before = _files(folder)
    assert cli.main(_argv(model4, tmp_path / "out", calib_file, "w8a8")) == 0
    err = capsys.readouterr().err
    assert (f"{tmp_path / 'out'}: an interrupted compile at layer 2 of {LAYERS} can be resumed with --resume "
            f"(or remove {folder})") in err
    assert "continuing" not in err
    assert _files(folder) == before
    assert_same_compile(reference("w8a8"), tmp_path / "out")
    assert leftovers(tmp_path) == sorted(["out", folder.name, folder.name.replace("tmp", "lock")])


def test_a_linked_staging_folder_is_never_resumed(killed, tmp_path, model4, calib_file, capsys, reference):
    """Rule 1: a stopped compile's `.out.tmp-PID` replaced by a symbolic link to its folder was resumed: the link
    was renamed to OUT (OUT a link, the compile written at its target). It is reported and left alone."""
    folder = _copy_killed(killed, tmp_path)
    elsewhere = shutil.move(folder, tmp_path / "elsewhere")
    os.symlink(elsewhere, folder)
    before = _files(tmp_path / "elsewhere")
    assert cli.main(_argv(model4, tmp_path / "out", calib_file, "w8a8", "--resume")) == 0
    err = capsys.readouterr().err
    assert f"{folder} is a symbolic link, not a qcompile temporary folder" in err and "continuing" not in err
    assert not (tmp_path / "out").is_symlink() and _files(tmp_path / "elsewhere") == before
    assert_same_compile(reference("w8a8"), tmp_path / "out")


def test_resume_with_nothing_to_resume_compiles_from_the_start(tmp_path, model4, calib_file, capsys, reference):
    assert cli.main(_argv(model4, tmp_path / "out", calib_file, "w8a8", "--resume")) == 0
    assert "no interrupted compile" in capsys.readouterr().err
    assert_same_compile(reference("w8a8"), tmp_path / "out")
    assert leftovers(tmp_path) == ["out"]


def test_a_live_compile_is_never_resumed(killed, tmp_path, model4, calib_file, capsys):
    """A staging folder whose owner still holds its lock is not a candidate: --resume starts from layer 0."""
    from qcompiler import outdir
    folder = _copy_killed(killed, tmp_path)
    lock_path = tmp_path / folder.name.replace("tmp", "lock")
    lock = outdir._OwnerLock(lock_path)  # held, as by the live compile
    try:
        assert cli.main(_argv(model4, tmp_path / "out", calib_file, "w8a8", "--resume")) == 0
        err = capsys.readouterr().err
        assert "no interrupted compile" in err and "still running" in err
        assert folder.is_dir()
    finally:
        lock.release()


def test_sigint_of_a_resume_run_keeps_its_state(tmp_path, model4, calib_file, reference):
    """With --resume, SIGINT after a committed layer keeps the staging folder (exit 130, says how to
    continue); the next --resume finishes it with the uninterrupted result. (Without --resume SIGINT
    removes it: tests/test_outdir.py::test_signal_mid_work_cleans_up.)"""
    argv = _argv(model4, tmp_path / "out", calib_file, "smooth,w8a8,kv8", "--resume")
    proc = start_cli(argv, QC_TEST_PAUSE="layer1:120")
    wait_for_pause(proc, "layer1")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "qcompile: interrupted (SIGINT)"
    assert "an interrupted compile at layer 2 of 4 can be resumed with --resume" in err
    assert not (tmp_path / "out").exists()
    assert cli.main(argv) == 0
    assert_same_compile(reference("smooth,w8a8,kv8"), tmp_path / "out")
    assert leftovers(tmp_path) == ["out"]


def test_most_advanced_of_two_stopped_compiles_is_resumed(killed, tmp_path, model4, calib_file, capsys):
    """Two stopped compiles of one OUT: --resume takes the one with more layers done and reports the other."""
    folder = _copy_killed(killed, tmp_path)
    other = tmp_path / ".out.tmp-4000010"
    shutil.copytree(folder, other)
    manifest = json.loads((other / STATE_DIR / MANIFEST).read_text())
    manifest["layers_done"] = 1  # only read by the choice (never resumed here)
    manifest["checksum"] = _checksum(manifest)
    (other / STATE_DIR / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / ".out.lock-4000010").write_text(json.dumps({"pid": 4000010, "host": socket.gethostname()}))
    assert cli.main(_argv(model4, tmp_path / "out", calib_file, "w8a8", "--resume")) == 0
    err = capsys.readouterr().err
    assert f"continuing {folder} at layer 2" in err
    assert f"an interrupted compile at layer 1 of {LAYERS} can be resumed with --resume (or remove {other})" in err
    assert other.is_dir()


# ---------------------------------------------------------------------------------------------- writer

def test_artifact_writer_restored_after_a_kill_writes_the_same_shards(tmp_path):
    """ArtifactWriter.state/restore across shard boundaries (a flush in the layer after the state, bytes of
    it in the spill): the finished folder equals an uninterrupted writer's, byte for byte."""
    tensors = [(f"t{i}", torch.arange(i * 10, i * 10 + 40 + i, dtype=torch.int32)) for i in range(9)]

    def write(folder, stop=None):
        w = ArtifactWriter(folder, torch.bfloat16, max_shard_bytes=400, resumable=True)
        for i, (name, t) in enumerate(tensors):
            w.add(name, t, "W8A8")
            if i == stop:
                state = json.loads(json.dumps(w.state()))
                w.release_retired()
                for name2, t2 in tensors[i + 1:i + 4]:  # work after the state, then the "kill"
                    w.add(name2, t2, "W8A8")
                w = ArtifactWriter.restore(folder, torch.bfloat16, state)
                for f in folder.iterdir():  # the resume sweep: files the state does not name
                    if f.name not in set(state["open"]["spill"] if state["open"] else []) | set(w.part_files()) \
                            and f.name != (state["open"] or {}).get("spill"):
                        f.unlink()
        w.finish(None, {"model_type": "llama"})
        w.drop_resume_files()
        return folder

    ref = write(tmp_path / "ref")
    for stop in (0, 3, 5):
        got = write(tmp_path / f"stop{stop}", stop)
        assert _files(ref) == _files(got), stop
