"""User-facing errors.

`QCError` is bad input or an unsupported request: the CLI prints its message on one line and exits with
its `exit_code` (2; `DiskFullError`: 1, the input was fine but the output could not be written).
Anything else escaping the driver is a bug in qcompiler and keeps its traceback.
"""


def one_line(e: BaseException, limit: int = 400) -> str:
    """`TYPE: message` of a library's exception on one line: its lines joined (transformers puts the reason after
    the first line: "Class validation error for validator 'validate_architecture':" / "ValueError: The hidden size
    (64) is not a multiple of the number of attention heads (3)."), cut at `limit` characters."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


class QCError(Exception):
    """Bad input or unsupported request; the message names what was wrong and what was expected."""
    exit_code = 2


class DiskFullError(QCError):
    """OUT could not be written: no space left on its device (or quota exceeded). Nothing was left behind."""
    exit_code = 1


class PassError(QCError):
    """A pass failed; the message names the pass and the passes that ran before it."""


def require_file(label: str, path) -> None:
    """QCError unless `path` is an existing file: "LABEL PATH does not exist" or, for a folder (or another
    non-file), "LABEL PATH is a folder; expected a file" (it used to say "does not exist" there too)."""
    import os
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        raise QCError(f"{label} {path} is a folder; expected a file")
    if os.path.lexists(path):
        raise QCError(f"{label} {path} is not a regular file; expected a file")
    raise QCError(f"{label} {path} does not exist")
