"""Instruments: cross-cutting work around every pass (timing, graph dumps), never inside passes.

An instrument has `before_pass(index, pass, gm, ctx)` and `after_pass(index, pass, result, ctx)`.
"""
import time
from collections import defaultdict
from pathlib import Path

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
    """Writes `DIR/layerLLL/NNN_<pass>.txt` (readable graph) for each pass that modified a layer.

    `000_capture.txt` holds the graph as captured, before any pass.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def _write(self, ctx, stem, gm):
        folder = self.root / f"layer{ctx.index:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.txt").write_text(graph_text(gm, title=f"layer {ctx.index} after {stem}"))

    def before_pass(self, index, p, gm, ctx):
        if index == 0:
            self._write(ctx, "000_capture", gm)

    def after_pass(self, index, p, result, ctx):
        if result.modified:
            self._write(ctx, f"{index + 1:03d}_{p.name}", result.gm)
