"""User-facing errors.

`QCError` is bad input or an unsupported request: the CLI prints its message on one line and exits with
its `exit_code` (2; `DiskFullError`: 1, the input was fine but the output could not be written).
Anything else escaping the driver is a bug in qcompiler and keeps its traceback.
"""


class QCError(Exception):
    """Bad input or unsupported request; the message names what was wrong and what was expected."""
    exit_code = 2


class DiskFullError(QCError):
    """OUT could not be written: no space left on its device (or quota exceeded). Nothing was left behind."""
    exit_code = 1


class PassError(QCError):
    """A pass failed; the message names the pass and the passes that ran before it."""
