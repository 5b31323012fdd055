"""Several processes (and machines), one compile: torch.distributed ranks share the calibration windows.

Contract:
- A compile runs on W processes ("ranks") when started by `torchrun --nproc_per_node N [--nnodes M ...] -m
  qcompiler.cli MODEL ...` (torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or by
  `qcompile MODEL ... --workers N` (`launch_workers`: N local processes started by torch.distributed's elastic
  launcher, the code torchrun itself runs). `init_from_env()` joins the process group: backend gloo on CPU,
  hccl when torch_npu is importable (that code path is chosen by `backend()`, not tested here: no NPU).
- `shard(n)`: this rank's contiguous slice of the n calibration windows (rank r takes [r*n//W, (r+1)*n//W)),
  deterministic; more ranks than windows is an error before any work (`check_shares`).
- Collectives (`all_sum`, `all_min`, `all_max`, `all_gather_counts`, `gather_rows`, `broadcast_windows`) are
  identities with one process. Every statistic a pass reads is reduced with them inside the code that collects
  it, before the pass uses it: `calibration.linear_inputs.LayerRunner.collect` (Gram matrices, |x| sums, row counts,
  per-channel min/max, sampled rows: smooth, awq, gptq, sparse), the observers' `reduce_across_ranks` (static
  activation ranges: `calibration.observers.MinMaxObserver`, `calibration.histogram.HistogramObserver` / `L2HistogramObserver`;
  the `calibrate` pass calls it), `passes.attention_quant.absmax_of` (kv8,
  fa3) and `passes.fallback._relative_error` (sensitivities). Exact: min, max, integer counts, rows and per-token
  errors gathered in global order. Float sums (Gram matrices X^T X, |x| sums: gptq, sparse, awq) add the per-rank
  partial sums once: exactly what one process adds when its batches end where the ranks split (`--batch-size
  n/W`, tests/test_distributed.py); with other batch sizes they round differently (BENCHMARKS.md). Histograms
  (act_observer=percentile|entropy|histogram) are moved onto the widest rank's grid and their counts summed
  (exact); they differ from one process's only by where rebinning put the counts (at most two bin widths per
  quantile, calibration/histogram.py).
- --resume is refused before any work under W > 1 (`check_supported`): resume.py's state is one process's;
  several processes save none, so nothing resumable is left.
- Only rank 0 writes (`is_writer()`): OUT's temporary folder, the report, --dump. The others compute, log
  nothing and write nothing.
- A collective that fails because another rank is gone raises `RankLostError` (one line, exit 1); the
  launcher (torchrun or --workers) stops the other ranks (SIGTERM: rank 0 removes its temporary folder).
- Errors of a rank started by a launcher go to the launcher's error file (TORCHELASTIC_ERROR_FILE, elastic's
  `{"message", "timestamp"}` layout read by torch.distributed.elastic.multiprocessing.errors.ProcessFailure):
  under --workers the launcher prints the first failure as one line; under torchrun rank 0 also prints it.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import QCError

#: set in the environment of the ranks `launch_workers` starts (they leave printing errors to it)
LAUNCHED_ENV = "QC_WORKERS_LAUNCHED"
#: how long a rank waits for the others in one collective (the writer may write a layer meanwhile)
TIMEOUT = datetime.timedelta(minutes=60)


#: what RankLostError says (the launcher reports the rank that caused it instead)
LOST_MARK = "another rank of this compile stopped"


class RankLostError(QCError):
    """Another rank of this compile stopped (died, or failed on its share): this one stops too."""
    exit_code = 1


# ---- who am I --------------------------------------------------------------------------------------------
def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_writer() -> bool:
    """Only rank 0 writes OUT, the report and --dump."""
    return rank() == 0


def env_world() -> int:
    """WORLD_SIZE from a launcher's environment (1 when not launched by one)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise QCError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} in the environment: expected a number") from None


def backend() -> str:
    """hccl when torch_npu is importable (Ascend devices), else gloo (CPU)."""
    try:
        import torch_npu  # noqa: F401
        return "hccl"
    except ImportError:
        return "gloo"


def init_from_env(log=None) -> int:
    """Join the process group a launcher described in the environment (no-op without one); returns W."""
    if env_world() <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise QCError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise QCError(f"WORLD_SIZE={env_world()} but {', '.join(missing)} not set: start several processes with "
                      "torchrun or --workers N")
    name = backend()
    if name == "hccl":  # one NPU per local rank (torch_npu's device API)
        torch.npu.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend=name, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as e:
        raise RankLostError(f"could not join the other ranks at {os.environ['MASTER_ADDR']}:"
                            f"{os.environ['MASTER_PORT']} ({_first_line(e)})") from None
    if log is not None and rank() == 0:
        log(f"calibrating on {world()} processes ({name})")
    return world()


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- the calibration split -------------------------------------------------------------------------------
def shard(n: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n calibration windows."""
    w, r = world(), rank()
    return r * n // w, (r + 1) * n // w


def check_shares(n: int) -> None:
    """Every rank needs at least one calibration window."""
    if world() > n:
        raise QCError(f"{world()} processes but only {n} calibration sequences: use at most {n} processes "
                      "(--workers / torchrun --nproc_per_node x --nnodes) or more --calib-samples")


def check_supported(passes, resume: bool = False) -> None:
    """Before any work, under W > 1: refuse --resume (its per-layer state holds one process's layer outputs on
    the whole calibration set; a rank holds only its share) (exit 2). `passes`: every pass's statistics are
    reduced (an observer without `reduce_across_ranks` is refused by the calibrate pass, passes/calibrate.py)."""
    if world() <= 1:
        return
    if resume:
        raise QCError("--resume runs as one process: the resume state holds the layer outputs on the whole "
                      "calibration set, a rank of several holds only its share (compile with one process to resume)")


# ---- collectives (identities with one process) -----------------------------------------------------------
def _first_line(e: BaseException) -> str:
    """The gist of a backend error: its first sentence without gloo's "[source/file.cc:N] " prefix."""
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0])
    return line.split(". ")[0][:160]


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError) as e:  # gloo: "Connection closed by peer", timeouts, ...
        raise RankLostError(f"rank {rank()}: {LOST_MARK} ({_first_line(e)}); nothing was written") from None


def _on_backend(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy where the backend reduces: the CPU for gloo, this rank's NPU for hccl (which takes
    device tensors only; not tested here)."""
    if dist.get_backend() == "hccl":
        return t.detach().to(f"npu:{int(os.environ.get('LOCAL_RANK', '0'))}").contiguous()
    return t.detach().clone().contiguous()


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    if world() <= 1:
        return t
    out = _on_backend(t)
    _collective(dist.all_reduce, out, op=op)
    return out.to(t.device)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a new tensor; `t` itself with one process)."""
    return _reduce(t, dist.ReduceOp.SUM)


def all_min(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.MIN)


def all_max(t: torch.Tensor) -> torch.Tensor:
    return _reduce(t, dist.ReduceOp.MAX)


def all_gather_counts(n: int) -> list[int]:
    """[n of rank 0, n of rank 1, ...]."""
    if world() <= 1:
        return [int(n)]
    mine = _on_backend(torch.tensor([int(n)], dtype=torch.int64))
    out = [torch.zeros_like(mine) for _ in range(world())]
    _collective(dist.all_gather, out, mine)
    return [int(t.item()) for t in out]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows [m_r, k] of every rank concatenated in rank order (every rank gets the result)."""
    if world() <= 1:
        return x
    counts = all_gather_counts(x.shape[0])
    width = max(counts)
    padded = torch.zeros((width,) + tuple(x.shape[1:]), dtype=x.dtype)
    padded[:x.shape[0]] = x
    padded = _on_backend(padded)
    out = [torch.empty_like(padded) for _ in counts]
    _collective(dist.all_gather, out, padded)
    return torch.cat([t[:c] for t, c in zip(out, counts)]).to(x.device)


def split_map(fn, items: list) -> list[float]:
    """[float(fn(item)) for item in items] with the work split over the ranks: rank r computes items r, r + W,
    ...; every rank gets the whole list in item order (moved as float64: exact for float32 / float64 values).
    A search over a grid (smooth's alphas, awq's scale exponents) on data every rank holds alike (gathered
    sample rows, reduced Hessians) so gives each rank the losses one process computes at 1/W of the work,
    instead of every rank repeating the whole search. One process: a plain loop."""
    if world() <= 1:
        return [float(fn(x)) for x in items]
    w, r = world(), rank()
    mine = torch.tensor([float(fn(x)) for x in items[r::w]], dtype=torch.float64)
    gathered = gather_rows(mine)  # rank 0's items, then rank 1's, ...
    counts = [len(items[q::w]) for q in range(w)]
    offsets = [sum(counts[:q]) for q in range(w)]
    return [float(gathered[offsets[i % w] + i // w]) for i in range(len(items))]


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    out = _on_backend(t)
    _collective(dist.broadcast, out, src=0)
    return out.cpu()


def broadcast_windows(windows: torch.Tensor | None, source: str | None) -> tuple[torch.Tensor, str]:
    """Rank 0's calibration windows (int64 [n, seq_len]) and its description string on every rank (plain
    tensors: nothing is pickled)."""
    if world() <= 1:
        return windows, source
    first = rank() == 0
    shape = _broadcast(torch.tensor(list(windows.shape) if first else [0, 0], dtype=torch.int64))
    ids = _broadcast(windows.to(torch.int64) if first else torch.zeros(tuple(shape.tolist()), dtype=torch.int64))
    text = torch.tensor(list(source.encode()) if first else [], dtype=torch.uint8)
    size = _broadcast(torch.tensor([text.numel()], dtype=torch.int64))
    text = _broadcast(text if first else torch.zeros(int(size.item()), dtype=torch.uint8))
    return ids, bytes(text.tolist()).decode()


# ---- errors and the --workers launcher ---------------------------------------------------------------------
def report_error(message: str) -> bool:
    """Record a rank's one-line error for its launcher; True when the caller should not print it itself
    (a rank started by --workers: the launcher prints the first failure; under torchrun only rank 0 prints)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": message, "timestamp": int(time.time())}, f)
        except OSError:
            return False
    if os.environ.get(LAUNCHED_ENV) == "1":
        return bool(path)
    return bool(path) and os.environ.get("RANK", "0") not in ("", "0")


def check_workers(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise QCError(f"--workers must be a whole number >= 1, got {n!r}")
    if n > 1 and env_world() > 1:
        raise QCError("--workers N starts its own processes: do not combine it with torchrun")
    return n


def launch_workers(n: int, argv: list[str], log=None) -> int:
    """Run `python -m qcompiler.cli ARGV` on n local processes (torch.distributed.launcher's elastic_launch,
    torchrun's own code: rendezvous on a free local port, no restarts); returns the exit code. A failed rank
    stops the others; the first failure is printed as one line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"qcompile-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    threads = os.environ.get("QC_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    # the ranks import this very qcompiler, whatever folder the command was started in
    package_root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    saved = {k: os.environ.get(k) for k in (LAUNCHED_ENV, "QC_THREADS", "PYTHONPATH")}
    os.environ.update({LAUNCHED_ENV: "1", "QC_THREADS": threads, "PYTHONPATH": path})
    _quiet_elastic_logs()
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "qcompiler.cli", *argv)
    except SignalException as e:  # Ctrl-C / SIGTERM to the launcher: elastic stopped the ranks (they cleaned up)
        from .interrupts import Interrupted
        raise Interrupted(int(e.sigval)) from None
    except ChildFailedError as e:
        local, failure = _root_failure(e.failures)
        message = failure.message if isinstance(failure.message, str) else str(failure.message)
        if failure.exitcode < 0 or not failure.error_file_data.get("message"):
            why = (f"died ({failure.signal_name()})" if failure.exitcode < 0 else f"exited with code {failure.exitcode}")
            message = f"process {local} of {n} (pid {failure.pid}) {why}; the compile was stopped, nothing was written"
        print(f"qcompile: error: {message}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return 0


def _root_failure(failures: dict) -> tuple[int, object]:
    """The failure that stopped the compile: a rank killed by a signal, else one that failed on its own, else the
    first; never a rank that only saw another one go (RankLostError) or that the launcher stopped (SIGTERM),
    whatever the timestamps say (elastic keeps
    them in whole seconds, and a rank without an error file gets the time the launcher noticed it)."""
    stopped = {-signal.SIGTERM, 128 + signal.SIGTERM}  # how the launcher stops the other ranks

    def cause(item):
        local, f = item
        lost = f.exitcode in stopped or (isinstance(f.message, str) and LOST_MARK in f.message)
        return (2 if lost else 0 if f.exitcode < 0 else 1, f.timestamp, local)
    return min(failures.items(), key=cause)


def _quiet_elastic_logs() -> None:
    """The elastic agent logs every start/stop at INFO/WARNING; the one line above says what failed."""
    import logging
    for name in list(logging.Logger.manager.loggerDict):  # elastic sets a level on each of its module loggers
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
