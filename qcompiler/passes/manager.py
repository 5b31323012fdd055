"""PassManager: validates a whole pipeline before any work, then runs it on each layer graph.

- `validate()` simulates the IR properties (passes/properties.py; a name not there is an error) through the
  pipeline: a pass whose `requires` are not all
  produced by the passes before it, or whose `forbids` already hold, is an error naming the pass, what it
  needs and which user passes could supply it there (internal passes the driver appends are never named:
  `--passes smooth` says which schemes can follow smooth). Nothing runs before the pipeline is valid.
- `run(gm, ctx)` runs the passes phase by phase (`execution_order`: `Pass.phase`, the user's order kept
  inside a phase: scheme passes annotate first, float transforms then read the annotations; passes/base.py);
  instruments see every pass (timing, dumps; `index` is the position in execution order); the verifier runs
  after each pass that modified the graph (on by default); a failure is re-raised as `PassError` naming
  the pass, the layer and the passes that ran before it. `ctx.records` keeps the pipeline's order.
"""
from collections.abc import Sequence

import torch

from ..errors import PassError, QCError
from ..ir.verifier import verify
from .base import LayerContext, Pass
from .properties import CAPTURED, KNOWN
from .registry import REGISTRY

#: what a freshly captured layer graph satisfies
INITIAL_PROPERTIES = frozenset({CAPTURED})


class PassManager:
    def __init__(self, passes: Sequence[Pass], instruments: Sequence = (), verify_each: bool = True,
                 initial: frozenset[str] = INITIAL_PROPERTIES):
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.verify_each = verify_each
        self.initial = initial

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def validate(self) -> frozenset[str]:
        """Check requires/forbids along the pipeline; returns the final properties. Raises QCError."""
        have = set(self.initial)
        seen = []
        for p in self.passes:
            unknown = (p.requires | p.produces | p.forbids) - KNOWN
            if unknown:
                raise QCError(f"pass {p.name} declares unknown IR properties {sorted(unknown)}; the properties "
                              f"are {', '.join(sorted(KNOWN))} (passes/properties.py)")
            missing = p.requires - have
            if missing:
                raise QCError(_missing_message(p, missing, have, seen))
            clash = p.forbids & have
            if clash:
                culprit = next((q.name for q in self.passes if q.produces & clash), "an earlier pass")
                raise QCError(f"pass {p.name} must run before {culprit}: it needs {sorted(clash)} not yet "
                              f"to hold (order: {', '.join(seen + [p.name])})")
            if p.name in seen:
                raise QCError(f"pass {p.name} appears twice in the pipeline")
            have |= p.produces
            seen.append(p.name)
        return frozenset(have)

    def execution_order(self) -> list[Pass]:
        """The passes as `run` executes them: by phase, in pipeline order inside a phase (a stable sort)."""
        return sorted(self.passes, key=lambda p: p.phase)

    def run(self, gm: torch.fx.GraphModule, ctx: LayerContext) -> torch.fx.GraphModule:
        done = []
        for index, p in enumerate(self.execution_order()):
            for inst in self.instruments:
                inst.before_pass(index, p, gm, ctx)
            try:
                result = p.run(gm, ctx)
                if self.verify_each and result.modified:
                    verify(result.gm)
            except QCError:
                raise
            except Exception as e:
                ran = ", ".join(done) or "(none)"
                first = (str(e).strip().splitlines() or [""])[0]  # one-line error; the cause keeps the rest
                raise PassError(f"pass {p.name} failed on layer {ctx.index}: {type(e).__name__}: {first} "
                                f"(passes run before it: {ran})") from e
            gm = result.gm
            for inst in self.instruments:
                inst.after_pass(index, p, result, ctx)
            done.append(p.name)
        order = {p.name: i for i, p in enumerate(self.passes)}  # report: records in pipeline order
        records = sorted(ctx.records.items(), key=lambda kv: order.get(kv[0], len(order)))
        ctx.records.clear()
        ctx.records.update(records)
        return gm



def _missing_message(p: Pass, missing: set, have: set, seen: list[str]) -> str:
    """Why `p` cannot run after `seen`, and the user passes that could run there and produce `missing`."""
    fits = sorted(name for name, cls in REGISTRY.items()
                  if not cls.internal and name not in seen and cls.produces & missing
                  and cls.requires <= have and not cls.forbids & have)
    choice = ("one of " if len(fits) > 1 else "") + ", ".join(fits)
    example = "w8a8" if "w8a8" in fits else (fits[0] if fits else "")
    pipeline = ",".join(seen)
    if p.internal and seen:  # the compiler's own tail after the user's passes: no quantization scheme
        what = "a quantization scheme" if fits and all(REGISTRY[n].quant_type for n in fits) else "a pass"
        head = f"--passes {pipeline}: {seen[-1]} must be followed by {what}"
        if not fits:
            return f"{head} producing {sorted(missing)}; none can run after it (see `qcompile passes`)"
        return f"{head}: {choice} (e.g. --passes {pipeline},{example})"
    if seen:
        head = f"pass {p.name} requires {sorted(missing)}, which the passes before it ({', '.join(seen)}) do not produce"
    else:
        head = f"pass {p.name} requires {sorted(missing)} from a pass before it"
    if not fits:
        return f"{head}; no pass can supply it there (see `qcompile passes`)"
    return f"{head}; put {choice} before it (e.g. --passes {','.join(seen + [example, p.name])})"
