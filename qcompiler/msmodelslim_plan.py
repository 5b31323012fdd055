"""What the msModelSlim fronts produce: a `FrontPlan` (passes + options of one ordinary compile), and the helpers
the YAML reader (msmodelslim_yaml.py) and the traditional-flag mapper (msmodelslim_flags.py) share.

A FrontPlan becomes exactly the `CompileOptions` that `qcompile MODEL --passes ...` builds (quant_front.py
`compile_options`), so every front runs the same validation, compile, artifact and report as the main command.

Names: msModelSlim selects modules by exact name (traditional `disable_names`, QuantConfig) or by glob
(v1 `include` / `exclude`, msmodelslim/utils/config_map.py `ConfigSet.__contains__` / `_brace_fnmatch`: the
standard library's fnmatch after `{a,b}` brace expansion, so `model.layers.{1,2}.mlp.up_proj` expands). Globs
are resolved against this model's module names (`glob_select`, the same test ConfigSet applies), and the
selected names become the regexes our passes take (`match=`, `--exclude`) through `names_regex`.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import PassSpec
from .errors import QCError


@dataclass
class FrontPlan:
    """One compile, as a front decided it. `source` says where it came from (printed and reported)."""
    source: str
    passes: list[PassSpec] = field(default_factory=list)
    target: str = "ascend910b"
    dtype: str | None = None
    exclude: list[str] = field(default_factory=list)
    policy: str = "none"                  # explicit configs decide every float Linear themselves
    part_file_size: int | None = None     # GiB per weight shard, 0 = one file (msModelSlim part_file_size)
    calib: Path | None = None
    calib_texts: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def passes_text(self) -> str:
        """The --passes string of this plan (`name:key=value,...`)."""
        return ",".join(name + "".join(f":{k}={v}" for k, v in opts.items()) for name, opts in self.passes)

    def describe(self) -> str:
        parts = [f"--passes {self.passes_text()}"]
        if self.target != "ascend910b":
            parts.append(f"--target {self.target}")
        if self.dtype:
            parts.append(f"--dtype {self.dtype}")
        parts += [f"--exclude '{e}'" for e in self.exclude]
        if self.policy != "auto":
            parts.append(f"--policy {self.policy}")
        return " ".join(parts)


class Unsupported:
    """Collects every field / flag a front cannot honour, so the error names all of them in one line."""

    def __init__(self, where: str):
        self.where = where
        self.items: list[str] = []

    def add(self, name: str, why: str) -> None:
        self.items.append(f"{name} ({why})")

    def raise_if_any(self) -> None:
        if self.items:
            raise QCError(f"{self.where}: not supported by qcompile: " + "; ".join(self.items))


def names_regex(names, num_layers: int) -> str:
    """Regex matching exactly these full module names, shortened: a module listed for every decoder layer
    becomes one `\\d+` alternative (msModelSlim's lists name every layer's down_proj). Plain groups only, no
    `:` or `,`, so the regex survives the `--passes name:key=value,...` syntax it is printed in."""
    by_suffix: dict[str, set[int]] = {}
    other = []
    for name in names:
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m:
            by_suffix.setdefault(m.group(2), set()).add(int(m.group(1)))
        else:
            other.append(name)
    every = [re.escape(sfx) for sfx, layers in by_suffix.items() if layers == set(range(num_layers))]
    parts = []
    if every:
        parts.append(r"model\.layers\.\d+\." + (every[0] if len(every) == 1 else "(" + "|".join(every) + ")"))
    for suffix, layers in by_suffix.items():
        if layers != set(range(num_layers)):
            parts += [re.escape(f"model.layers.{i}.{suffix}") for i in sorted(layers)]
    parts += [re.escape(n) for n in other]
    return "^(" + "|".join(parts) + ")$"


def expand_braces(pattern: str) -> list[str]:
    """The plain globs a pattern with `{a,b,...}` alternatives stands for, in order, duplicates removed
    (msmodelslim/utils/config_map.py `_expand_braces`: the first unescaped brace group is cut at its top-level
    commas and every alternative expanded again, so nested groups expand; a backslash escapes the next
    character; when that first group has no top-level comma or no closing brace the whole pattern is literal)."""
    open_at = _unescaped_index(pattern, "{")
    if open_at < 0:
        return [pattern]
    depth, i = 0, open_at
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            alternatives = _top_level_split(pattern[open_at + 1:i])
            if len(alternatives) < 2:
                return [pattern]
            head, tail = pattern[:open_at], pattern[i + 1:]
            return list(dict.fromkeys(g for alt in alternatives for g in expand_braces(head + alt + tail)))
        i += 1
    return [pattern]


def _unescaped_index(text: str, char: str) -> int:
    """Index of the first `char` in `text` not escaped by a backslash, -1 when there is none."""
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == char:
            return i
        i += 1
    return -1


def _top_level_split(inner: str) -> list[str]:
    """`inner` cut at the commas outside nested braces and not escaped by a backslash."""
    parts, current, depth, i = [], "", 0, 0
    while i < len(inner):
        ch = inner[i]
        if ch == "\\":
            current += inner[i:i + 2]
            i += 2
            continue
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            depth += (ch == "{") - (ch == "}")
            current += ch
        i += 1
    return parts + [current]


def glob_select(names, include, exclude=()) -> list[str]:
    """The names msModelSlim's include/exclude select: in some include and in no exclude, where a pattern
    holds a name when it equals it or matches one of its brace expansions as an fnmatch glob
    (utils/config_map.py `ConfigSet.__contains__` / `_brace_fnmatch`; `*` crosses dots, matching is
    case-sensitive as on the Linux hosts msModelSlim runs on)."""
    def holds(patterns, name):
        return any(name == p or any(fnmatch.fnmatchcase(name, g) for g in expand_braces(p)) for p in patterns)
    return [n for n in names if holds(include, n) and not holds(exclude, n)]


def decoder_linear_names(config: dict) -> list[str]:
    """Every decoder Linear's full name (the names msModelSlim's patterns and disable_names refer to)."""
    from .passes.group_size import model_linear_shapes
    return list(model_linear_shapes(config))


def check_names(names, config: dict, what: str) -> list[str]:
    """The given names minus `lm_head` (always float here); QCError naming the first that is no decoder Linear."""
    known = set(decoder_linear_names(config))
    out = []
    for name in names:
        if name == "lm_head":
            continue
        if name not in known:
            raise QCError(f"{what} names {name!r}, which is not a decoder Linear of this model (expected e.g. "
                          f"model.layers.0.mlp.down_proj)")
        out.append(name)
    return out


def pass_options(**kw) -> dict:
    """Option dict of a PassSpec with None values left out and values as the --passes syntax prints them."""
    return {k: ("true" if v is True else "false" if v is False else str(v)) for k, v in kw.items() if v is not None}
