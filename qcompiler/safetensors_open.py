"""`safe_open` for any path the OS accepts.

safetensors' `safe_open` takes the file name as a Rust `&str` and refuses a path that is not valid UTF-8 ("Path
... is not valid UTF-8"): such a file is handed to it under the UTF-8 name utf8_path.utf8_name gives it;
safetensors opens (and maps) it itself, so that name is needed only while it opens the file.
"""
from safetensors import safe_open as _safe_open

from .utf8_path import utf8_name


def safe_open(path, framework: str = "pt"):
    """safetensors.safe_open(path, framework), for a path whose name is not valid UTF-8 too."""
    with utf8_name(path) as name:
        return _safe_open(name, framework)
