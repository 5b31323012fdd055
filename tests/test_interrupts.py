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
