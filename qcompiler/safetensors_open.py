"""`safe_open` for any path the OS accepts.

safetensors' `safe_open` takes the file name as a Rust `&str` and refuses a path that is not valid UTF-8 ("Path
... is not valid UTF-8"): a model folder, an OUT or a temporary folder under such a name (Linux names are bytes;
Python hands them over with surrogate escapes) could not be read, and the loaders reported the file as corrupt.
Here such a path is opened by the OS and handed to safetensors as `/proc/self/fd/N`, a UTF-8 name of the same open
file; safetensors opens (and maps) it itself, so the descriptor is closed at once. Where /proc is missing, the
OSError names the path and says why.
"""
import os

from safetensors import safe_open as _safe_open


def safe_open(path, framework: str = "pt"):
    """safetensors.safe_open(path, framework), for a path whose name is not valid UTF-8 too."""
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        if not os.path.isdir("/proc/self/fd"):
            raise OSError(f"the path is not valid UTF-8, which the safetensors library cannot open here "
                          f"({os.fsencode(name)!r}); rename it") from None
        fd = os.open(name, os.O_RDONLY)
        try:
            return _safe_open(f"/proc/self/fd/{fd}", framework)
        finally:
            os.close(fd)
    return _safe_open(name, framework)
