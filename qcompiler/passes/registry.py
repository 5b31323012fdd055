"""The explicit pass registry: name -> Pass class.

`register` is a class decorator; a duplicate name is an error at import time. `qcompiler.passes`
imports every pass module explicitly (no discovery, no swallowed ImportError), so a broken pass fails
loudly when the package is imported.
"""
import dataclasses
import typing

from ..errors import QCError
from .base import Pass

REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"pass name {cls.name!r} registered twice ({REGISTRY[cls.name].__name__}, {cls.__name__})")
    REGISTRY[cls.name] = cls
    return cls


def user_pass_names() -> list[str]:
    return sorted(n for n, c in REGISTRY.items() if not c.internal)


def _convert(pass_name: str, f: dataclasses.Field, raw: str, hints: dict):
    kind = hints.get(f.name, str)
    try:
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if kind in (int, float, str):
            return kind(raw)
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0](raw) if args else raw
    except ValueError:
        raise QCError(f"pass {pass_name}: option {f.name}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from None


def make_pass(name: str, options: dict[str, object] | None = None) -> Pass:
    """Instantiate a registered pass from option values (strings from --passes or typed from YAML)."""
    if name not in REGISTRY:
        raise QCError(f"unknown pass {name!r}; available: {', '.join(user_pass_names())}")
    cls = REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    values = {}
    for key, raw in (options or {}).items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise QCError(f"pass {name}: unknown option {key!r}; valid options: {valid}")
        values[key] = _convert(name, fields[key], raw, hints) if isinstance(raw, str) else raw
    try:
        return cls(cls.Options(**values))
    except (TypeError, ValueError) as e:
        raise QCError(f"pass {name}: {e}") from None
