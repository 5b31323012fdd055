"""OUT safety (issue 11, section 1): never destroy or overwrite what is not ours.

OUT against the inputs (model folder, --calib, --recipe, --dump; resolved, symlinks followed; with and
without --force), --force only on a previous OUT, atomic replacement, no silent replacement of an OUT that
appeared while compiling, SIGTERM like SIGINT, stale temporary folders of stopped compiles, a full disk,
file modes from the umask. Compiles use the tiny checkpoints of conftest.py with 2 x 32 calibration tokens.
Signal tests start `python3 -m qcompiler.cli` and use the QC_TEST_PAUSE hook (knobs.py) to stop at a
known point.
"""
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qcompiler import cli, outdir
from tests.helpers import SMALL, cli_env, expect_error, leftovers, make_old_out, start_cli, wait_for_pause

ROOT = Path(__file__).resolve().parents[1]


def _tree_digest(folder: Path) -> dict:
    """{relative path: sha256} of every file under `folder` (to prove an input was not touched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tiny_models, tmp_path):
    """A private copy of the tiny llama checkpoint (inputs are checked against it)."""
    return shutil.copytree(tiny_models["llama"], tmp_path / "model")


def _no_work(monkeypatch):
    import qcompiler.driver as driver

    def fail(*a, **k):
        raise AssertionError("work started before OUT was checked")
    monkeypatch.setattr(driver, "_compile_into", fail)


# ------------------------------------------------------------------------------------ OUT vs inputs

@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("where", ["is", "inside", "symlink", "contains"])
def test_out_overlapping_model_folder(capsys, tmp_path, model, monkeypatch, force, where):
    """`qcompile M -o M --force` deleted the checkpoint: OUT equal to, inside or containing the model is exit 2."""
    _no_work(monkeypatch)
    before = _tree_digest(model)
    out = {"is": model, "inside": model / "out", "symlink": tmp_path / "link", "contains": tmp_path}[where]
    if where == "symlink":
        os.symlink(model, out)
    argv = [model, "-o", out, *SMALL] + (["--force"] if force else [])
    expect_error(capsys, argv, "model folder", "choose another -o")
    assert _tree_digest(model) == before
    assert not (model / "out").exists()


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_out_containing_calib_file(capsys, tmp_path, tiny_models, calib_file, monkeypatch, force):
    _no_work(monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    calib = shutil.copy(calib_file, data / "calib.jsonl")
    argv = [tiny_models["llama"], "-o", data, "--calib", calib, *SMALL] + (["--force"] if force else [])
    expect_error(capsys, argv, "contains the --calib file", "calib.jsonl")
    assert Path(calib).read_bytes() == Path(calib_file).read_bytes()


def test_out_beside_calib_file_is_fine(tmp_path, tiny_models, calib_file):
    """The calibration FILE is the input: OUT next to it (a sibling folder) is allowed."""
    calib = shutil.copy(calib_file, tmp_path / "calib.jsonl")
    assert cli.main([str(tiny_models["llama"]), "-o", str(tmp_path / "out"), "--calib", str(calib), *SMALL]) == 0
    assert (tmp_path / "out" / "quant_model_description.json").is_file()


def test_out_containing_recipe(capsys, tmp_path, tiny_models, monkeypatch):
    _no_work(monkeypatch)
    out = make_old_out(tmp_path / "out")
    recipe = out / "r.yaml"
    recipe.write_text("passes: [w8a8]\n")
    expect_error(capsys, [tiny_models["llama"], "-o", out, "--recipe", recipe, "--force", *SMALL],
                 "contains the --recipe file", "r.yaml")
    assert recipe.read_text() == "passes: [w8a8]\n"


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_out_overlapping_dump(capsys, tmp_path, tiny_models, monkeypatch, where):
    _no_work(monkeypatch)
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "keep.txt").write_text("mine")
    out = {"is": dump, "inside": dump / "out", "contains": tmp_path}[where]
    expect_error(capsys, [tiny_models["llama"], "-o", out, "--dump", dump, "--force", *SMALL], "--dump folder")
    assert (dump / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("target", ["dangling", "empty-folder", "old-out", "under-dangling"])
def test_out_that_is_a_symlink_is_refused(capsys, tmp_path, tiny_models, monkeypatch, force, target):
    """Rule 1: an OUT given as a symbolic link was written at the link's target (a dangling link's target was
    created, a linked empty folder or previous OUT filled / replaced); a dangling link on the way had its target's
    folders created. Exit 2 naming -o; the link and its target untouched."""
    _no_work(monkeypatch)
    where = tmp_path / "elsewhere"
    link = tmp_path / "out"
    if target == "empty-folder":
        where.mkdir()
    elif target == "old-out":
        make_old_out(where)
    before = sorted(p.name for p in where.iterdir()) if where.is_dir() else None
    os.symlink(where, link)
    out = link / "sub" if target == "under-dangling" else link
    argv = [tiny_models["llama"], "-o", out, *SMALL] + (["--force"] if force else [])
    expect_error(capsys, argv, f"output folder {out}", "symbolic link", "choose another -o")
    assert (sorted(p.name for p in where.iterdir()) if where.is_dir() else None) == before
    assert os.readlink(link) == str(where) and leftovers(tmp_path) == ["out"]
    assert leftovers(tmp_path, "elsewhere") == (["elsewhere"] if before is not None else [])


@pytest.mark.parametrize("what", ["model", "calib"])
def test_out_through_a_linked_parent_is_checked_resolved(capsys, tmp_path, model, calib_file, monkeypatch, what):
    """An OUT reached through a linked parent folder is compared with the inputs as the folder it really is."""
    _no_work(monkeypatch)
    (tmp_path / "data").mkdir()
    calib = shutil.copy(calib_file, tmp_path / "data" / "calib.jsonl")
    os.symlink(tmp_path, tmp_path / "link")
    out = tmp_path / "link" / ("model" if what == "model" else "data")
    argv = [model, "-o", out, "--force", "--calib", calib, *SMALL]
    expect_error(capsys, argv, "is the model folder" if what == "model" else "contains the --calib file")
    assert Path(calib).read_bytes() == Path(calib_file).read_bytes()


def test_out_through_a_linked_parent_is_written_there(tmp_path, tiny_models, calib_file):
    """A parent folder that is a link to an existing folder is fine: OUT is the folder inside it."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    argv = [str(tiny_models["llama"]), "-o", str(tmp_path / "link" / "out"), "--calib", str(calib_file), *SMALL]
    assert cli.main(argv) == 0
    assert (tmp_path / "real" / "out" / "quant_model_description.json").is_file()


@pytest.mark.parametrize("target", ["dangling", "folder"])
def test_dump_that_is_a_symlink_is_refused(capsys, tmp_path, tiny_models, calib_file, monkeypatch, target):
    """--dump given as a symbolic link wrote layerNNN/ at the link's target."""
    _no_work(monkeypatch)
    where = tmp_path / "elsewhere"
    if target == "folder":
        where.mkdir()
    os.symlink(where, tmp_path / "dump")
    expect_error(capsys, [tiny_models["llama"], "-o", tmp_path / "out", "--calib", calib_file,
                          "--dump", tmp_path / "dump", *SMALL], f"--dump {tmp_path / 'dump'}", "symbolic link")
    assert (list(where.iterdir()) if target == "folder" else where.exists()) in ([], False)


def test_force_refuses_a_folder_that_is_not_an_out(capsys, tmp_path, tiny_models, monkeypatch):
    """--force replaces a previous compile's OUT (or an empty folder), never an arbitrary folder."""
    _no_work(monkeypatch)
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    expect_error(capsys, [tiny_models["llama"], "-o", folder, "--force", *SMALL],
                 "not a qcompile output", "--force only replaces")
    assert (folder / "thesis.txt").read_text() == "years of work"


def test_force_replaces_an_empty_folder(tmp_path, tiny_models, calib_file):
    (tmp_path / "out").mkdir()
    argv = [str(tiny_models["llama"]), "-o", str(tmp_path / "out"), "--calib", str(calib_file), "--force", *SMALL]
    assert cli.main(argv) == 0
    assert (tmp_path / "out" / "quant_model_description.json").is_file()


# ------------------------------------------------------------------------------ final placement

def test_out_appearing_while_compiling_is_not_replaced(capsys, tmp_path, tiny_models, calib_file, monkeypatch):
    """Two compiles of one OUT: the one that finishes second fails without --force, the first OUT is kept."""
    import qcompiler.driver as driver
    real = driver._compile_into
    out = tmp_path / "out"

    def other_compile_finishes_first(*args, **kwargs):
        report = real(*args, **kwargs)
        make_old_out(out, "the other compile")
        return report
    monkeypatch.setattr(driver, "_compile_into", other_compile_finishes_first)
    expect_error(capsys, [tiny_models["llama"], "-o", out, "--calib", calib_file, *SMALL],
                 "appeared while compiling", "--force")
    assert (out / "old.txt").read_text() == "the other compile"
    assert leftovers(tmp_path) == ["out"]


def test_force_swaps_atomically(tmp_path, tiny_models, calib_file, monkeypatch):
    """With --force the old OUT is swapped out in one rename (never half deleted) and then deleted."""
    out = make_old_out(tmp_path / "out")
    calls = []
    real = outdir._renameat2

    def spy(src, dst, flags):
        calls.append((Path(src).name, Path(dst).name, flags))
        return real(src, dst, flags)
    monkeypatch.setattr(outdir, "_renameat2", spy)
    argv = [str(tiny_models["llama"]), "-o", str(out), "--calib", str(calib_file), "--force", *SMALL]
    assert cli.main(argv) == 0
    assert calls == [(f".out.tmp-{os.getpid()}", "out", outdir._RENAME_EXCHANGE)]
    assert not (out / "old.txt").exists() and (out / "quant_model_description.json").is_file()
    assert leftovers(tmp_path) == ["out"]


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_placement_without_renameat2(tmp_path, tiny_models, calib_file, monkeypatch, force):
    """The fallback (no renameat2: other systems, some file systems) keeps the same guarantees."""
    monkeypatch.setattr(outdir, "_renameat2", lambda src, dst, flags: False)
    out = tmp_path / "out"
    if force:
        make_old_out(out)
    argv = [str(tiny_models["llama"]), "-o", str(out), "--calib", str(calib_file), *SMALL]
    assert cli.main(argv + (["--force"] if force else [])) == 0
    assert (out / "quant_model_description.json").is_file() and not (out / "old.txt").exists()
    assert leftovers(tmp_path) == ["out"]


def test_rename_noreplace_fallback_refuses_existing(tmp_path, monkeypatch):
    monkeypatch.setattr(outdir, "_renameat2", lambda src, dst, flags: False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("keep")
    with pytest.raises(FileExistsError):
        outdir.rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").is_dir() and (tmp_path / "b" / "x").read_text() == "keep"


# ------------------------------------------------------------------------------------ file modes

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_out_modes_follow_umask(tmp_path, tiny_models, calib_file, umask):
    """safetensors files came out 0600: an engine running as another user could not read them."""
    old = os.umask(umask)
    try:
        argv = [str(tiny_models["llama"]), "-o", str(tmp_path / "out"), "--calib", str(calib_file), *SMALL]
        assert cli.main(argv) == 0
    finally:
        os.umask(old)
    paths = [tmp_path / "out", *(tmp_path / "out").rglob("*")]
    assert any(p.suffix == ".safetensors" for p in paths)
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


# ------------------------------------------------------------------------------------- full disk

def _disk_full_on_first_safetensors(monkeypatch, exc):
    """Make the first safetensors write fail with `exc` after writing part of a file: the artifact writer's
    (it streams each tensor to disk as it is added, safetensors_stream) for an OSError, the executable
    graph's (safetensors' own save_file, which raises SafetensorError) otherwise."""
    from safetensors import SafetensorError

    from qcompiler import executable, safetensors_stream

    if isinstance(exc, SafetensorError):
        def save_file(tensors, path, metadata=None):
            Path(path).write_bytes(b"partial")
            raise exc
        monkeypatch.setattr(executable, "save_file", save_file)
        return

    def write_all(f, data):
        f.write(b"partial")
        raise exc
    monkeypatch.setattr(safetensors_stream, "_write_all", write_all)


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_disk_full_one_line_exit_1(capsys, tmp_path, tiny_models, calib_file, monkeypatch, kind):
    from safetensors import SafetensorError
    exc = (OSError(errno.ENOSPC, "No space left on device", "x.safetensors") if kind == "oserror" else
           SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    _disk_full_on_first_safetensors(monkeypatch, exc)
    out = tmp_path / "out"
    rc = cli.main([str(tiny_models["llama"]), "-o", str(out), "--calib", str(calib_file), *SMALL])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("qcompile:")]
    assert rc == 1, err
    assert "Traceback" not in err
    assert len(lines) == 1 and str(out) in lines[0] and "no space left on device" in lines[0], err
    assert leftovers(tmp_path) == []


def test_disk_full_with_force_keeps_old_out(capsys, tmp_path, tiny_models, calib_file, monkeypatch):
    _disk_full_on_first_safetensors(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    out = make_old_out(tmp_path / "out")
    rc = cli.main([str(tiny_models["llama"]), "-o", str(out), "--calib", str(calib_file), "--force", *SMALL])
    assert rc == 1 and "no space left on device" in capsys.readouterr().err
    assert (out / "old.txt").read_text() == "old" and leftovers(tmp_path) == ["out"]


def test_not_enough_free_space_before_work(capsys, tmp_path, tiny_models, monkeypatch):
    _no_work(monkeypatch)
    monkeypatch.setattr(outdir, "free_bytes", lambda path: 1000)
    rc = cli.main([str(tiny_models["llama"]), "-o", str(tmp_path / "out"), *SMALL])
    err = capsys.readouterr().err
    assert rc == 1 and "not enough free space" in err and str(tmp_path / "out") in err, err
    assert leftovers(tmp_path) == []


def test_output_estimate_is_a_lower_bound(tmp_path, tiny_models, calib_file):
    """estimate_output_bytes never exceeds what a compile really writes (else it would refuse good runs)."""
    from qcompiler.driver import build_pipeline
    from qcompiler.config import CompileOptions
    from qcompiler.loading import open_checkpoint
    for passes in ([("w8a8", {})], [("w4a16", {"group": "32"})]):
        out = tmp_path / passes[0][0]
        opts = CompileOptions(model=str(tiny_models["llama"]), out=out, passes=tuple(passes), calib=calib_file,
                              calib_samples=2, seq_len=32)
        pm = build_pipeline(opts)
        estimate = outdir.estimate_output_bytes(open_checkpoint(tiny_models["llama"]), pm.passes)
        from qcompiler.driver import compile_model
        compile_model(opts, log=lambda m: None)
        written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        assert 0.3 * written < estimate <= written, (passes, estimate, written)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and unshare to mount a small tmpfs")
def test_disk_full_for_real(tmp_path, tiny_models):
    """A real 200 KiB file system (private mount namespace): passes the free-space estimate (~150 KB since the
    executable graph stores no tensor twice), then fills up."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=200k tmpfs {mnt} && {sys.executable} -m qcompiler.cli "
              f"{tiny_models['llama']} -o {mnt}/out --calib-samples 2 --seq-len 32; rc=$?; ls -A {mnt}; exit $rc")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env=cli_env(), timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qcompile:")]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(errors) == 1 and "no space left on device" in errors[0] and f"{mnt}/out" in errors[0], proc.stderr
    assert proc.stdout.strip() == ""  # nothing left on the full file system


# -------------------------------------------------------------------------------- signals, stale folders

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_work_cleans_up(tmp_path, tiny_models, calib_file, sig, code):
    """SIGTERM killed the compile with no message and left the temporary folder: now like SIGINT."""
    proc = start_cli([tiny_models["llama"], "-o", tmp_path / "out", "--calib", calib_file, *SMALL],
                  QC_TEST_PAUSE="work:120")
    wait_for_pause(proc, "work")
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"qcompile: interrupted ({sig.name})"
    assert "Traceback" not in err
    assert leftovers(tmp_path) == []


def test_signal_while_replacing_keeps_the_new_out(tmp_path, tiny_models, calib_file, sig=signal.SIGINT):
    """A signal after the new OUT is in place, while the old one is deleted: the new OUT stays complete,
    the old one is deleted completely, then the signal ends the command."""
    out = make_old_out(tmp_path / "out")
    proc = start_cli([tiny_models["llama"], "-o", out, "--calib", calib_file, "--force", *SMALL],
                  QC_TEST_PAUSE="replace:2")
    wait_for_pause(proc, "replace")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert not (out / "old.txt").exists()
    assert (out / "quant_model_description.json").is_file() and (out / "qcompile_report.json").read_text() != "{}"
    assert leftovers(tmp_path) == ["out"]


def test_kill_while_replacing_then_next_run_cleans_up(tmp_path, tiny_models, calib_file):
    """SIGKILL (uncatchable) right after the swap: OUT is the complete new tree; the old tree left under the
    temporary name is removed by the next compile of that OUT, which says so."""
    out = make_old_out(tmp_path / "out")
    argv = [tiny_models["llama"], "-o", out, "--calib", calib_file, "--force", *SMALL]
    proc = start_cli(argv, QC_TEST_PAUSE="replace:120")
    wait_for_pause(proc, "replace")
    proc.kill()
    proc.communicate(timeout=60)
    assert (out / "quant_model_description.json").is_file() and not (out / "old.txt").exists()
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert sorted(n.split("-")[0] for n in stale) == [".out.lock", ".out.tmp"], stale
    rerun = subprocess.run([sys.executable, "-m", "qcompiler.cli", *map(str, argv)], cwd=ROOT, capture_output=True,
                           text=True, env=cli_env(), timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    old_tree = tmp_path / next(n for n in stale if n.startswith(".out.tmp-"))
    assert f"removed {old_tree}" in rerun.stderr
    assert leftovers(tmp_path) == ["out"]


def test_two_concurrent_compiles_one_fails(tmp_path, tiny_models, calib_file):
    """Two processes compile the same OUT at once: exactly one writes it, the other fails (exit 2) and
    leaves it alone; neither says 'wrote' falsely."""
    argv = [tiny_models["llama"], "-o", tmp_path / "out", "--calib", calib_file, *SMALL]
    procs = [start_cli(argv, QC_TEST_PAUSE="work:3") for _ in range(2)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "appeared while compiling" in loser[2] and "wrote" not in loser[1]
    assert leftovers(tmp_path) == ["out"]


def _fake_stale(tmp_path, pid, with_lock=True, host=None, kind="tmp"):
    folder = tmp_path / f".out.{kind}-{pid}"
    folder.mkdir()
    (folder / "quant_model_weights.safetensors").write_bytes(b"partial")
    if with_lock:
        (tmp_path / f".out.lock-{pid}").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    return folder


def test_stale_temporary_folders_removed_or_reported(capsys, tmp_path, tiny_models, calib_file):
    """On start, what stopped compiles left is removed when provably stale (lock free, this host), else reported."""
    dead = _fake_stale(tmp_path, 4000001)
    unknown = _fake_stale(tmp_path, 4000002, with_lock=False)
    remote = _fake_stale(tmp_path, 4000003, host="another-host")
    aside = _fake_stale(tmp_path, 4000004, kind="old")  # a previous OUT moved aside, OUT missing: keep it
    rc = cli.main([str(tiny_models["llama"]), "-o", str(tmp_path / "out"), "--calib", str(calib_file), *SMALL])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert not dead.exists() and not (tmp_path / ".out.lock-4000001").exists()
    assert f"removed {dead}" in err
    for kept in (unknown, remote, aside):
        assert kept.exists() and f"warning: {kept}" in err
    assert "rename it back" in err


def test_stale_aside_removed_when_out_exists(capsys, tmp_path, tiny_models, calib_file):
    make_old_out(tmp_path / "out")
    aside = _fake_stale(tmp_path, 4000005, kind="old")
    rc = cli.main([str(tiny_models["llama"]), "-o", str(tmp_path / "out"), "--calib", str(calib_file), "--force",
                   *SMALL])
    assert rc == 0
    assert not aside.exists() and f"removed {aside}" in capsys.readouterr().err
    assert leftovers(tmp_path) == ["out"]


def test_running_compile_is_not_touched(capsys, tmp_path, tiny_models, calib_file):
    """A temporary folder whose compile still runs (its lock is held) is neither removed nor waited for."""
    busy = _fake_stale(tmp_path, 4000006, with_lock=False)
    lock = outdir._OwnerLock(tmp_path / ".out.lock-4000006")  # held, as by a live compile
    try:
        rc = cli.main([str(tiny_models["llama"]), "-o", str(tmp_path / "out"), "--calib", str(calib_file), *SMALL])
        assert rc == 0
        assert busy.is_dir() and "still running" in capsys.readouterr().err
    finally:
        lock.release()


# ------------------------------------------------------------- messages name the option the user gave

@pytest.mark.parametrize("option", ["--save_path", "--save_directory"])
@pytest.mark.parametrize("case", ["inside-model", "is-model", "not-an-out", "contains-calib"])
def test_quant_outdir_messages_name_its_option(capsys, tmp_path, model, calib_file, monkeypatch, option, case):
    """`qcompile quant ... --save_path M/out` was told "choose another -o", an option it does not have: every
    OutputFolder message names the option that gave OUT (and the calibration file as --calib_file)."""
    _no_work(monkeypatch)
    argv = ["quant", "--model_path", model, "--calib_samples", "2", "--seq_len", "16"]
    argv += ["--quant_type", "w8a8"] if option == "--save_path" else ["--w_bit", "8", "--a_bit", "8"]
    if case == "inside-model":
        argv += [option, model / "out"]
        needles = ["model folder", f"choose another {option}"]
    elif case == "is-model":
        argv += [option, model, "--force"]
        needles = ["is the model folder", f"choose another {option}"]
    elif case == "not-an-out":
        folder = tmp_path / "documents"
        folder.mkdir()
        (folder / "thesis.txt").write_text("years of work")
        argv += [option, folder, "--force"]
        needles = ["not a qcompile output", f"choose another {option} or remove it yourself"]
    else:
        data = tmp_path / "data"
        data.mkdir()
        calib = shutil.copy(calib_file, data / "calib.jsonl")
        argv += [option, data, "--force", "--calib_file", calib]
        needles = ["contains the --calib_file file", f"choose another {option}"]
    line = expect_error(capsys, argv, *needles)
    assert " -o" not in line and "--calib file" not in line, line
    assert not (model / "out").exists()
