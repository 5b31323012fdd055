"""SIGINT and SIGTERM: both end a command the same way, and critical sections can postpone them.

Contract:
- `handle_signals()` (the CLI wraps every command in it): SIGINT and SIGTERM raise `Interrupted` (a
  KeyboardInterrupt carrying the signal number) in the main thread, so `finally` blocks clean up (a
  compile removes its temporary folder) and the CLI prints one line and exits 128 + signal number
  (SIGINT 130, SIGTERM 143, the shell's convention). The previous handlers come back on exit.
- `deferred()`: inside the block SIGINT/SIGTERM are only recorded; on leaving it they are delivered again
  (`signal.raise_signal`) to whatever handler is installed then. Used where being stopped half-way would
  leave the user's files inconsistent (putting OUT in place, removing a folder whose owner marker must go
  last). Python runs signal handlers only in the main thread; elsewhere both context managers do nothing.
- A signal that arrives while Python runs a finalizer (a weakref callback, `__del__`, e.g. during garbage
  collection) would have its `Interrupted` swallowed there ("Exception ignored in ...", and the command goes on):
  inside `handle_signals()` such an `Interrupted` is caught by `sys.unraisablehook` and the signal is sent again
  from a helper thread, so the main thread gets it as soon as it is back in ordinary code.
Limits: SIGKILL cannot be caught; stale temporary folders it leaves are found by outdir.py on the next run.
Python runs the handler between bytecodes, so a signal waits for the running torch operation to return: at
7B widths one bf16 matmul over a calibration batch took over a minute on an AVX2-only CPU (no native bf16).
"""
import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


#: signals that arrived while the unraisable hook was re-sending one (handled by it, not raised inside it)
_in_hook: list[int] = []
_HOOK_BUSY = -1


def _raise(signum, _frame):
    if _in_hook and _in_hook[0] == _HOOK_BUSY:
        _in_hook.append(signum)
        return
    raise Interrupted(signum)


def _send_later(signum: int) -> None:
    """`signum` to this process from a helper thread, a moment later (the main thread's handler runs then)."""
    timer = threading.Timer(0.01, os.kill, args=(os.getpid(), signum))
    timer.daemon = True
    timer.start()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handle_signals():
    """SIGINT/SIGTERM raise `Interrupted` while the block runs (main thread only)."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    previous_hook = sys.unraisablehook

    def redeliver(unraisable):
        if not isinstance(unraisable.exc_value, Interrupted):
            previous_hook(unraisable)
            return
        _in_hook[:] = [_HOOK_BUSY]  # a signal arriving meanwhile is recorded, not raised inside this hook
        try:
            _send_later(unraisable.exc_value.signum)  # swallowed by a finalizer: send it again
        finally:
            arrived, _in_hook[:] = _in_hook[1:], []
        for signum in dict.fromkeys(arrived):
            if signum != unraisable.exc_value.signum:
                _send_later(signum)

    sys.unraisablehook = redeliver
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred():
    """Record SIGINT/SIGTERM while the block runs; deliver them (once each, in arrival order) after it."""
    if not _main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum, _frame):
        if signum not in pending:
            pending.append(signum)

    previous = {s: signal.signal(s, record) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)  # handled by the restored handler (e.g. raises Interrupted)
