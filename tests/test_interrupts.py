"""SIGINT/SIGTERM handling (interrupts.py): both raise Interrupted under handle_signals; deferred() postpones
them to the end of a critical section; previous handlers come back."""
import os
import signal

import pytest

from qcompiler.interrupts import Interrupted, deferred, handle_signals


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_raises_interrupted(sig, code):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as exc, handle_signals():
        os.kill(os.getpid(), sig)
    assert exc.value.signum == sig and exc.value.exit_code == code
    assert isinstance(exc.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before


def test_deferred_delivers_after_the_block():
    done = []
    with pytest.raises(Interrupted) as exc, handle_signals():
        with deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            for i in range(1000):  # plenty of bytecodes: the signal must not interrupt them
                done.append(i)
    assert len(done) == 1000 and exc.value.signum == signal.SIGTERM


def test_signal_swallowed_by_a_finalizer_is_delivered_again(capsys):
    """SIGTERM handled while a weakref callback runs (as during garbage collection): the Interrupted raised there
    would be printed as "Exception ignored" and lost; it reaches the main code instead, nothing printed."""
    import sys
    import time
    import weakref

    class Layer:
        pass
    hook_before = sys.unraisablehook
    reached = []
    with pytest.raises(Interrupted) as exc, handle_signals():
        obj = Layer()
        ref = weakref.ref(obj, lambda _: signal.raise_signal(signal.SIGTERM))  # handler runs inside the callback
        del obj
        reached.append("after the finalizer")  # the callback swallowed it: the command went on
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # ordinary code: the re-sent signal arrives here
            time.sleep(0.01)
    assert ref() is None and reached == ["after the finalizer"]
    assert exc.value.signum == signal.SIGTERM
    assert "Exception ignored" not in capsys.readouterr().err
    assert sys.unraisablehook is hook_before
