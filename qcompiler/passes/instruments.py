"""Instruments: cross-cutting work around every pass (timing, graph dumps), never inside passes.

An instrument has `before_pass(index, pass, gm, ctx)` and `after_pass(index, pass, result, ctx)`.
"""
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..errors import QCError
from ..tools.graph_text import graph_text


class Instrument:
    def before_pass(self, index, p, gm, ctx):
        pass

    def after_pass(self, index, p, result, ctx):
        pass


class TimingInstrument(Instrument):
    """Accumulates wall seconds per pass over all layers (`seconds[name]`)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._start = 0.0

    def before_pass(self, index, p, gm, ctx):
        self._start = time.perf_counter()

    def after_pass(self, index, p, result, ctx):
        self.seconds[p.name] += time.perf_counter() - self._start


class StatsInstrument(Instrument):
    """Keeps each pass's `PassResult.stats` per layer in `ctx.records[pass name]`."""

    def after_pass(self, index, p, result, ctx):
        if result.stats:
            ctx.records.setdefault(p.name, {}).update(result.stats)


class DumpInstrument(Instrument):
    """Writes `DIR/layerLLL/NNN_<pass>.txt` (readable graph, tools/graph_text.py) for each pass that changed
    a layer's graph or any of its tensors; `000_capture.txt` holds the graph as captured, before any pass.

    Each file's header says what the pass did: its `PassResult.stats`, and one line per tensor of the
    layer module: `~` changed (absmax before -> after, largest absolute change), `+` added, `-` removed,
    `=` unchanged (absmax), so a value-only pass (smooth, awq, gptq, calibrate) shows its effect. Every
    node has its dtype and shape. `layers` / `passes` (None: all) restrict what is written; the name
    `capture` selects the captured graph.
    """

    def __init__(self, root: Path, layers=None, passes=None):
        self.root = Path(root)
        self.layers = None if layers is None else frozenset(layers)
        self.passes = None if passes is None else frozenset(passes)
        self._before: dict[str, torch.Tensor] = {}

    def _wanted(self, ctx, name: str) -> bool:
        return ((self.layers is None or ctx.index in self.layers)
                and (self.passes is None or name in self.passes))

    def _write(self, ctx, stem, gm, header=()):
        folder = self.root / f"layer{ctx.index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.txt").write_text(graph_text(gm, title=f"layer {ctx.index} after {stem}", header=header))

    def before_pass(self, index, p, gm, ctx):
        if index == 0 and self._wanted(ctx, "capture"):
            self._write(ctx, "000_capture", gm, tensor_summary({}, _tensors(gm), first=True))
        self._before = ({k: v.detach().clone() for k, v in _tensors(gm).items()}
                        if self._wanted(ctx, p.name) else {})

    def after_pass(self, index, p, result, ctx):
        if not self._wanted(ctx, p.name):
            return
        after = _tensors(result.gm)
        summary = tensor_summary(self._before, after)
        self._before = {}
        changed = any(line.startswith(("~", "+", "-")) for line in summary)
        if result.modified or changed:
            header = [f"pass {p.name} on layer {ctx.index}: {'graph modified' if result.modified else 'tensors only'}"]
            header += [f"stats.{k}: {_brief(v)}" for k, v in result.stats.items()]
            self._write(ctx, f"{index + 1:03d}_{p.name}", result.gm, header + summary)


def check_dump_filter(layers, passes, num_layers: int, pass_names) -> None:
    """--dump-layers / --dump-passes name layers the model has and passes the pipeline runs (or `capture`);
    QCError (exit 2) otherwise, before any work."""
    for i in layers or ():
        if not 0 <= i < num_layers:
            raise QCError(f"--dump-layers {i}: the model has layers 0..{num_layers - 1}")
    known = ["capture", *pass_names]
    for name in passes or ():
        if name not in known:
            raise QCError(f"--dump-passes {name!r}: not a pass of this compile (one of {', '.join(known)})")


def _tensors(gm) -> dict[str, torch.Tensor]:
    return dict(gm.state_dict())


def _fmt_tensor(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def _absmax(t: torch.Tensor) -> str:
    """`values [..]` for a tensor of at most 4 elements (scales, offsets), else `absmax X`."""
    if t.numel() == 0 or t.dtype == torch.bool:
        return "empty" if t.numel() == 0 else "bool"
    if t.numel() <= 4:
        return "values [" + ", ".join(f"{v:.6g}" for v in t.detach().double().flatten().tolist()) + "]"
    return f"absmax {t.detach().abs().max().double().item():.6g}"


def tensor_summary(before: dict, after: dict, first: bool = False) -> list[str]:
    """One line per tensor: `~` changed / `+` added / `-` removed / `=` unchanged, with absmax (values when
    it has at most 4 elements; for a changed tensor of the same dtype and shape also the largest absolute
    change); a count line first. `first`: the captured graph (every tensor listed with `=`)."""
    if first:
        return [f"tensors: {len(after)} (as captured)"] + [f"= {n}: {_fmt_tensor(t)} {_absmax(t)}"
                                                          for n, t in sorted(after.items())]
    lines, counts = [], {"changed": 0, "added": 0, "removed": 0, "unchanged": 0}
    for name, t in sorted(after.items()):
        old = before.get(name)
        if (old is not None and old.dtype == t.dtype and old.shape == t.shape and torch.equal(old, t)):
            counts["unchanged"] += 1
            lines.append(f"= {name}: {_fmt_tensor(t)} {_absmax(t)}")
        elif old is None:
            counts["added"] += 1
            lines.append(f"+ {name}: {_fmt_tensor(t)} {_absmax(t)}")
        else:
            counts["changed"] += 1
            delta = (f", max |change| {(t.double() - old.double()).abs().max().item():.6g}"
                     if old.shape == t.shape and old.dtype == t.dtype and t.numel() else "")
            kind = _fmt_tensor(t) if _fmt_tensor(old) == _fmt_tensor(t) else f"{_fmt_tensor(old)} -> {_fmt_tensor(t)}"
            lines.append(f"~ {name}: {kind} {_absmax(old)} -> {_absmax(t)}{delta}")
    for name, t in sorted(before.items()):
        if name not in after:
            counts["removed"] += 1
            lines.append(f"- {name}: {_fmt_tensor(t)} {_absmax(t)}")
    order = sorted(lines, key=lambda line: "~+-".find(line[0]) if line[0] in "~+-" else 3)
    return ["tensors: " + ", ".join(f"{v} {k}" for k, v in counts.items())] + order


def _brief(value, limit: int = 2000) -> str:
    """A stats value as one line of JSON (tensors as lists when small, else dtype[shape])."""
    def plain(v):
        if isinstance(v, torch.Tensor):
            return v.tolist() if v.numel() <= 8 else _fmt_tensor(v)
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, float):
            return float(f"{v:.6g}")
        return v if isinstance(v, (int, str, bool)) or v is None else str(v)
    text = json.dumps(plain(value))
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
