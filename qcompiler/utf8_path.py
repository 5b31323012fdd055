"""A valid UTF-8 name for any existing file or folder, for libraries that take paths as UTF-8 strings.

safetensors (a Rust `&str`), onnx's C++ external-data writer and onnxruntime's session loader refuse a path
that is not valid UTF-8 (Linux names are bytes; Python hands them over with surrogate escapes): a model folder,
an OUT or a temporary folder under such a name could not be read or written. `utf8_name(path)` opens the file or
folder by the OS and yields `/proc/self/fd/N`, a UTF-8 name of the same open file (and, for a folder, a prefix
for the names inside it); the descriptor is closed when the block ends, so a library must open what it needs
inside the block (it may keep what it opened or mapped). A path that is valid UTF-8 is yielded unchanged.
Where /proc is missing, the OSError names the path and says why.
"""
import contextlib
import os


@contextlib.contextmanager
def utf8_name(path):
    """Yield a str naming the existing file or folder `path` that is valid UTF-8 (see the module docstring)."""
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        if not os.path.isdir("/proc/self/fd"):
            raise OSError(f"the path is not valid UTF-8, which the library reading it cannot open here "
                          f"({os.fsencode(name)!r}); rename it") from None
        fd = os.open(name, os.O_RDONLY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    yield name
