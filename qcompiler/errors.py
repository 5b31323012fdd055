"""User-facing errors.

`QCError` is bad input or an unsupported request: the CLI prints its message on one line and exits 2.
Anything else escaping the driver is a bug in qcompiler and keeps its traceback.
"""


class QCError(Exception):
    """Bad input or unsupported request; the message names what was wrong and what was expected."""


class PassError(QCError):
    """A pass failed; the message names the pass and the passes that ran before it."""
