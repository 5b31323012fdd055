"""Several processes, one compile (qcompiler/distributed.py): gloo over loopback, tiny models, 4 x 32 tokens.

A compile on 2 (or 4) ranks must write the artifact a single-process compile writes: byte for byte where every
reduction is exact (min/max observers, absmax, sampled rows gathered in global order), else with the difference
measured and bounded (GPTQ's Hessian is a float sum: per-rank partial sums round differently).
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qcompiler import cli, distributed
from tests.byte_identity import digest_out
from tests.helpers import expect_error, leftovers

ROOT = Path(__file__).resolve().parents[1]
CALIB = ["--calib-samples", "4", "--seq-len", "32"]


def _env(**extra):
    env = dict(os.environ, QC_NO_PROGRESS="1", PYTHONPATH=str(ROOT), **extra)
    for k in ("QC_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _compile(model, calib, out, passes, workers=1, extra=(), torchrun=False):
    argv = [model, "--passes", passes, "--calib", calib, *CALIB, "-o", out, *extra]
    if workers == 1:  # in-process: the single-process reference
        assert cli.main([str(a) for a in argv]) == 0
        return None
    if torchrun:  # torchrun's own entry point, as a user types it: torchrun --standalone --nproc_per_node N -m ...
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(workers),
               "-m", "qcompiler.cli", *map(str, argv)]
    else:
        cmd = [sys.executable, "-m", "qcompiler.cli", *map(str, argv), "--workers", str(workers)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def _differences(a: Path, b: Path) -> list[str]:
    da, db = digest_out(a), digest_out(b)
    return sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))


@pytest.mark.parametrize("passes, torchrun", [("w8a8", False), ("w8a8d", True), ("smooth,w8a8", False)],
                         ids=["w8a8-workers", "w8a8d-torchrun", "smooth,w8a8-workers"])
def test_two_ranks_write_the_single_process_artifact(tmp_path, tiny_models, calib_file, passes, torchrun):
    """min/max observers and smooth's absmax + sampled rows are reduced exactly: every file and tensor equal."""
    _compile(tiny_models["llama"], calib_file, tmp_path / "one", passes)
    proc = _compile(tiny_models["llama"], calib_file, tmp_path / "two", passes, workers=2, torchrun=torchrun)
    assert "calibrating on 2 processes (gloo)" in proc.stderr
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone reports (and writes)
    assert _differences(tmp_path / "one", tmp_path / "two") == []
    assert leftovers(tmp_path, "two") == ["two"]


def test_four_ranks_one_window_each(tmp_path, tiny_models, calib_file):
    """4 ranks x 1 calibration sequence (kv8's absmax too): the single-process artifact."""
    _compile(tiny_models["qwen2"], calib_file, tmp_path / "one", "w8a8,kv8")
    _compile(tiny_models["qwen2"], calib_file, tmp_path / "four", "w8a8,kv8", workers=4)
    assert _differences(tmp_path / "one", tmp_path / "four") == []


@pytest.mark.parametrize("passes", ["gptq,w4a16", "sparse:ratio=0.5,w8a8d"])
def test_hessian_passes_two_ranks_equal_one_process_batched_at_the_rank_split(tmp_path, tiny_models, calib_file,
                                                                                passes):
    """GPTQ's and SparseGPT's Hessian X^T X is a float sum: each rank sums its share, all_reduce adds the two
    partial sums. That is exactly what one process computes when its batches end where the ranks split
    (--batch-size 2 of 4 sequences): byte-identical, so the reduction loses nothing. Against one process in one
    batch of 4 the codes differ (rounding order; measured in BENCHMARKS.md, 'Several processes'), as much as
    one process's own codes differ between --batch-size 2 and 4: GPTQ's sequential rounding amplifies ulps."""
    _compile(tiny_models["llama"], calib_file, tmp_path / "one", passes, extra=["--batch-size", "2"])
    _compile(tiny_models["llama"], calib_file, tmp_path / "two", passes, workers=2)
    assert _differences(tmp_path / "one", tmp_path / "two") == []


def test_fallback_two_ranks_same_choice_and_sensitivities(tmp_path, tiny_models, calib_file):
    """Sensitivities are means over tokens: per-token errors are gathered in global order, so the report's
    numbers (and the choice) equal one process's."""
    _compile(tiny_models["llama"], calib_file, tmp_path / "one", "w8a8,fallback:level=1")
    _compile(tiny_models["llama"], calib_file, tmp_path / "two", "w8a8,fallback:level=1", workers=2)
    assert _differences(tmp_path / "one", tmp_path / "two") == []


@pytest.mark.parametrize("pause", ["layer0", "layer0@1"], ids=["both-paused", "rank0-in-a-collective"])
def test_a_killed_rank_stops_the_compile_and_leaves_nothing(tmp_path, tiny_models, calib_file, pause):
    """SIGKILL of rank 1 after layer 0, while rank 0 sleeps there too (the launcher stops it: SIGTERM) or while
    rank 0 waits for rank 1 in a collective (gloo: connection closed -> RankLostError): one error line naming
    the dead process, non-zero exit, no OUT and no temporary folder or lock left."""
    argv = [tiny_models["llama"], "--passes", "w8a8", "--calib", calib_file, *CALIB, "-o", tmp_path / "out",
            "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "qcompiler.cli", *map(str, argv)], cwd=ROOT,
                            env=_env(QC_TEST_PAUSE=f"{pause}:120"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    pids, seen = {}, []
    want = 1 if "@" in pause else 2
    deadline = time.monotonic() + 300
    while len(pids) < want and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if "test pause at layer0" in line:  # "... (pid P, rank R)"
            pid, rank = line.rsplit("(pid ", 1)[1].rstrip(")\n").split(", rank ")
            pids[int(rank)] = int(pid)
    if 1 not in pids or len(pids) < want:
        proc.kill()
        raise AssertionError("".join(seen))
    time.sleep(1)  # rank 0 reaches layer 1's first collective (or sleeps after layer 0)
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())  # rank 0 was writing
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines[-1].startswith("qcompile: error: process 1 of 2") and "SIGKILL" in lines[-1], err
    assert sum(line.startswith("qcompile:") for line in lines if "test pause" not in line) == 1, err
    assert leftovers(tmp_path) == []


def test_ctrl_c_to_the_launcher_stops_every_rank(tmp_path, tiny_models, calib_file):
    """SIGINT to `qcompile --workers 2`: elastic stops the ranks (rank 0 removes its temporary folder), one line,
    exit 130, nothing left."""
    argv = [tiny_models["llama"], "--calib", calib_file, *CALIB, "-o", tmp_path / "out", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "qcompiler.cli", *map(str, argv)], cwd=ROOT,
                            env=_env(QC_TEST_PAUSE="layer0@0:120"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if not line or "test pause at layer0" in line:
            break
    assert "test pause at layer0" in seen[-1], "".join(seen)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "qcompile: interrupted (SIGINT)" and "Traceback" not in err, err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_workers_value_exits_2(capsys, tmp_path, tiny_models, value):
    from qcompiler import cli as cli_module
    with pytest.raises(SystemExit) as e:  # argparse: usage + one error line naming the option
        cli_module.main([str(tiny_models["llama"]), "-o", str(tmp_path / "out"), "--workers", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--workers" in err and "expected a whole number >= 1" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_resume_on_several_processes_is_refused(capsys, tmp_path, tiny_models, monkeypatch):
    """A rank holds only its share of the layer outputs: several processes save no resume state, and --resume is
    refused before any work (checked with the rank count faked: the check runs before any collective)."""
    monkeypatch.setattr(distributed, "world", lambda: 2)
    expect_error(capsys, [tiny_models["llama"], "-o", tmp_path / "out", "--resume"], "--resume runs as one process")
    assert leftovers(tmp_path) == []


def test_workers_with_torchrun_environment_is_refused(capsys, tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    expect_error(capsys, ["compile", tiny_models["llama"], "-o", tmp_path / "out", "--workers", "2"],
                 "do not combine it with torchrun")


def test_more_ranks_than_windows_is_one_line(tmp_path, tiny_models, calib_file):
    """Every rank finds the error; the launcher prints the first one, once (exit 2, nothing written)."""
    argv = [tiny_models["llama"], "--calib", calib_file, "--calib-samples", "2", "--seq-len", "32",
            "-o", tmp_path / "out", "--workers", "3"]
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", *map(str, argv)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qcompile: error:")]
    assert errors == ["qcompile: error: 3 processes but only 2 calibration sequences: use at most 2 processes "
                      "(--workers / torchrun --nproc_per_node x --nnodes) or more --calib-samples"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert leftovers(tmp_path) == []


def test_shares_are_contiguous_and_cover_every_window(monkeypatch):
    for w in (1, 2, 3, 4):
        monkeypatch.setattr(distributed, "world", lambda w=w: w)
        got = []
        for r in range(w):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            got.append(distributed.shard(10))
        assert got[0][0] == 0 and got[-1][1] == 10
        assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
        assert max(b - a for a, b in got) - min(b - a for a, b in got) <= 1


def test_histogram_observer_on_two_ranks_is_one_process_within_rebinning(tmp_path, tiny_models, calib_file):
    """act_observer=percentile on 2 ranks: the histograms are reduced (calibration/histogram.py), so the compile runs and
    every static activation scale is within 1% of one process's (a range end moves by at most two of 2048 bins
    of the absmax, tests/ir/test_observers_calib.py; 1% leaves room for ranges much narrower than the absmax);
    everything but the activation scales and offsets is identical."""
    from safetensors.torch import load_file
    passes = "w8a8:act_observer=percentile"
    _compile(tiny_models["llama"], calib_file, tmp_path / "one", passes)
    _compile(tiny_models["llama"], calib_file, tmp_path / "two", passes, workers=2)
    one, two = (load_file(tmp_path / d / "quant_model_weights.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys()
    activation = [k for k in one if k.endswith((".input_scale", ".input_offset"))]
    assert activation
    for k in one:
        if k.endswith(".input_scale"):
            torch.testing.assert_close(two[k], one[k], rtol=0.01, atol=0)
        elif k.endswith(".input_offset"):  # an offset moves by at most one code when the range ends move
            assert (two[k].float() - one[k].float()).abs().max() <= 1, k
        elif not k.endswith((".deq_scale", ".quant_bias")):  # these fold the input scale in
            assert torch.equal(one[k], two[k]), k


def test_the_launcher_reports_the_rank_that_caused_the_stop():
    """A rank that only lost its peer (RankLostError) may carry an earlier timestamp than the killed rank (elastic
    rounds to seconds; a rank without error file gets the time it was noticed): the killed rank is reported."""
    from types import SimpleNamespace as F
    lost = F(exitcode=1, message=f"rank 0: {distributed.LOST_MARK} (connection closed)", timestamp=5)
    assert distributed._root_failure({0: lost, 1: F(exitcode=-9, message="", timestamp=9)})[0] == 1
    assert distributed._root_failure({0: lost, 1: F(exitcode=2, message="bad input", timestamp=9)})[0] == 1
    stopped = F(exitcode=-15, message="", timestamp=4)  # SIGTERM: the launcher stopping rank 0
    assert distributed._root_failure({0: stopped, 1: F(exitcode=-9, message="", timestamp=9)})[0] == 1
    same = F(exitcode=2, message="bad input", timestamp=5)
    assert distributed._root_failure({1: same, 0: same})[0] == 0


def test_other_commands_refuse_several_processes(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    expect_error(capsys, ["passes"], "only compile runs on several processes")
