"""Probe: peak memory of smooth's alpha search for ONE gate/up group at Qwen2.5-7B's widths (issue 15, part 1).

Not a compile: synthetic random tensors in a fresh process per configuration, so the figure is the search's own
working set above what the caller already holds (the samples and the two bf16 weights, [18944, 3584] each):

    samples  [tokens, hidden] float32 (1024 rows, hidden 3584; a few outlier channels), static W8A8 specs
             (int8 per-channel symmetric weights, per-tensor asymmetric activations: what `smooth,w8a8` searches)
    weights  gate_proj, up_proj [intermediate, hidden] bf16 (18944 x 3584), random
    phases   search: column absmax + float outputs + MSE without smoothing + one MSE per alpha (the code of
             `Smooth.run`), then fold: the chosen scales folded into the two weights (`ir/folding.fold`)
    peak     VmHWM - VmRSS after resetting the high-water mark (/proc/self/clear_refs 5) before each phase;
             a small search first loads the libraries and kernels

Configurations, each a child process run with its checkout's `qcompiler` first on sys.path (cwd + PYTHONPATH):
    before     --before DIR (a checkout of the older code, e.g. `git archive main | tar -x -C DIR`): the search as
               it was written there (float32 copies of both weights, whole-matrix temporaries); only if given
    after      this checkout at the default ROW_CHUNK_ELEMENTS (gate/up: 5 chunks of 4680 rows)
    one-chunk  this checkout with ROW_CHUNK_ELEMENTS raised so every Linear is one chunk: the MSEs the chunked
               search would give with the old summation order (relative difference of the MSE, alpha choice)

    python3 bench/probe_smooth_memory.py --before /tmp/qc-base           # takes /tmp/qc-heavy.lock itself
    python3 bench/probe_smooth_memory.py --before /tmp/qc-base --write   # and rewrites its BENCHMARKS.md block

--grid (default 4: alphas 0, 0.25, ..., 1) only sets the work: the peak does not depend on the number of alphas.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
BEGIN, END = "<!-- smooth-memory-probe:begin -->", "<!-- smooth-memory-probe:end -->"


# ---- child: one configuration in a fresh process -------------------------------------------------------------
def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak() -> int:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status("VmRSS")


def child(a) -> dict:
    import torch
    from qcompiler.calibration.linear_inputs import InputStats
    from qcompiler.ir import qnumerics as qn
    from qcompiler.ir.qspec import LinearQuantSpec, PerChannel, PerTensor, TensorQuant
    from qcompiler.passes import smooth as sm

    torch.set_num_threads(a.threads)
    if a.elements:
        qn.ROW_CHUNK_ELEMENTS = a.elements
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.tokens, a.hidden, generator=g)
    x[:, :8] *= 20  # outlier channels, as real residual streams have
    st = InputStats(xtx=None, abs_sum=torch.zeros(a.hidden, dtype=torch.float64), rows=16 * 512,
                    min=x.amin(0), max=x.amax(0), samples=x)
    weights = []
    for _ in range(2):  # built 1024 rows at a time: no whole float32 matrix before the baseline
        w = torch.empty(a.inter, a.hidden, dtype=torch.bfloat16)
        for r in range(0, a.inter, 1024):
            w[r:r + 1024] = torch.randn(min(1024, a.inter - r), a.hidden, generator=g) * 0.02
        weights.append(w)
    spec = LinearQuantSpec("W8A8", TensorQuant(8, True, PerChannel()), TensorQuant(8, False, PerTensor()), "probe")
    specs = [spec, spec]
    alphas = [round(i / a.grid, 6) for i in range(a.grid + 1)]
    limit = torch.finfo(torch.bfloat16).max / 16
    chunked = hasattr(sm, "search_alpha")

    def search(ws, xs, stats):
        """The search of Smooth.run for one group, as written in the imported checkout; the per-alpha losses."""
        losses = []
        if chunked:
            split_map = sm.distributed.split_map
            sm.distributed.split_map = lambda fn, items: losses.extend(split_map(fn, items)) or losses
            try:
                w_absmax = sm.column_absmax(ws)
                base, best, alpha = sm.search_alpha(xs, ws, specs, stats, stats.absmax, w_absmax, alphas,
                                                    None, limit, None)
            finally:
                sm.distributed.split_map = split_map
            return base, losses, alpha, w_absmax
        w32 = [w.float() for w in ws]  # the code before: float32 copies, whole-width refs
        w_absmax = torch.stack([w.abs().amax(0) for w in w32]).amax(0)
        refs = [xs @ w.T for w in w32]
        base = sm.group_error(xs, refs, w32, specs, torch.ones_like(stats.absmax), stats, None)
        losses = [sm.group_error(xs, refs, w32, specs, sm.smooth_scales(stats.absmax, w_absmax, al, None, limit),
                                 stats, None) for al in alphas]
        alpha = min(zip(losses, alphas), key=lambda e: e[0])[1]
        return base, losses, alpha, w_absmax

    # warm-up: libraries, kernels, thread pools (a narrow slice of the same group)
    small = InputStats(xtx=None, abs_sum=st.abs_sum, rows=st.rows, min=st.min, max=st.max, samples=x[:64])
    search([w[:256] for w in weights], x[:64], small)
    del small

    base_rss = _reset_peak()
    t0 = time.perf_counter()
    base, losses, alpha, w_absmax = search(weights, x, st)
    seconds = time.perf_counter() - t0
    search_peak = _status("VmHWM") - base_rss
    exact = exact_base_mse(sm, weights, x, st, spec) if chunked else None  # after the peak is read
    gc.collect()

    # fold the chosen scales into the two weights (what Smooth.run does next), on a stand-in module
    from types import SimpleNamespace
    from qcompiler.ir.folding import fold
    m = torch.nn.Module()
    m.norm = torch.nn.Module()
    m.norm.weight = torch.nn.Parameter(torch.ones(a.hidden, dtype=torch.bfloat16), requires_grad=False)
    for name, w in zip(("gate", "up"), weights):
        sub = torch.nn.Module()
        sub.weight = torch.nn.Parameter(w, requires_grad=False)
        setattr(m, name, sub)
    del weights, w
    s = sm.smooth_scales(st.absmax, w_absmax, alpha, None, limit)
    group = SimpleNamespace(kind="norm", sites=[SimpleNamespace(weight=SimpleNamespace(target=f"{n}.weight"))
                                                for n in ("gate", "up")],
                            producer_targets=lambda: ["norm.weight"])
    base_rss = _reset_peak()
    fold(m, group, s)
    fold_peak = _status("VmHWM") - base_rss
    chunks = len(sm._row_slices(m.gate.weight, a.tokens, None)) if chunked else 1
    return {"chunked": chunked, "elements": qn.ROW_CHUNK_ELEMENTS if chunked else None, "chunks": chunks,
            "search_peak_mib": search_peak / MIB, "fold_peak_mib": fold_peak / MIB, "search_s": seconds,
            "base": base, "exact_base": exact, "losses": losses, "alphas": alphas, "alpha": alpha, "threads": a.threads,
            "shape": [a.tokens, a.hidden, a.inter]}


def exact_base_mse(sm, weights, x, st, spec) -> float:
    """The MSE without smoothing (s = 1) with the squares summed in float64 (the search sums float32 norms:
    torch's float32 vector_norm of a [1024, 18944] output has a relative error near 2e-3 by itself), in the
    default row chunks (the outputs are the same bits in any chunking: exact int8 products)."""
    import torch
    ones = torch.ones(x.shape[1])
    xq = sm.quant_activation(x, spec.activation, float(st.min.min()), float(st.max.max()))
    total, count = 0.0, 0
    for w, chunks in zip(weights, sm.float_outputs(x, weights, elements=1 << 24)):
        r0 = 0
        for ref in chunks:
            out = sm._chunk_output(x, xq, w[r0:r0 + ref.shape[1]], spec, ones, w.shape[0]) - ref
            total += float(out.double().square().sum())
            count += out.numel()
            r0 += ref.shape[1]
    return total / count


# ---- parent: every configuration under the heavy lock ---------------------------------------------------------
def run_child(checkout: Path, a, elements: int = 0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--tokens", str(a.tokens), "--hidden",
           str(a.hidden), "--inter", str(a.inter), "--grid", str(a.grid), "--threads", str(a.threads),
           "--elements", str(elements)]
    env = dict(os.environ, PYTHONPATH=str(checkout))
    out = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"probe child failed in {checkout}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def git_head(path: Path) -> str:
    r = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def report(rows: dict, a, before_label: str) -> str:
    lines = [f"Probe, not a compile (`bench/probe_smooth_memory.py`): smooth's alpha search for ONE gate/up group "
             f"at Qwen2.5-7B's widths on synthetic random tensors ({a.tokens} sample rows, {a.hidden} -> "
             f"{a.inter}, bf16 weights, static W8A8 specs, grid {a.grid}, {a.threads} thread(s)); peak = VmHWM "
             f"above the RSS before the phase, each configuration a fresh process.", "",
             "| code | search peak MiB | fold peak MiB | search s | chosen alpha |", "|---|---|---|---|---|"]
    for label, r in rows.items():
        name = {"before": f"before ({before_label})", "after": "after (row chunks, default)",
                "one-chunk": "after, forced to one chunk"}[label]
        lines.append(f"| {name} | {r['search_peak_mib']:,.0f} | {r['fold_peak_mib']:,.0f} | {r['search_s']:.1f} "
                     f"| {r['alpha']} |")
    if "after" in rows and "one-chunk" in rows:
        one, aft = rows["one-chunk"], rows["after"]
        rel = [abs(x - y) / y for x, y in zip(aft["losses"] + [aft["base"]], one["losses"] + [one["base"]])]
        lines += ["", f"MSE in {aft['chunks']} row chunks vs one chunk (the summation order): max relative difference "
                      f"{max(rel):.1e} over the {len(rel)} MSEs (the alphas and the unsmoothed one); chosen alpha "
                      f"{aft['alpha']} vs {one['alpha']} ({'same' if aft['alpha'] == one['alpha'] else 'CHANGED'})."]
        ex = aft["exact_base"]
        lines.append(f"Against the MSE without smoothing summed in float64 ({ex:.6g}): one chunk "
                     f"{abs(one['base'] - ex) / ex:.1e} relative, {aft['chunks']} chunks "
                     f"{abs(aft['base'] - ex) / ex:.1e}: "
                     f"the difference is the float32 norm's own rounding over {a.tokens} x {a.inter} squares, smaller "
                     f"per chunk.")
    if "before" in rows and "one-chunk" in rows:
        b, one = rows["before"], rows["one-chunk"]
        same = b["losses"] == one["losses"] and b["base"] == one["base"]
        lines.append(f"One chunk vs the code before: MSEs {'bit-identical' if same else 'DIFFERENT'}.")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", type=Path, help="a checkout of the older code (its qcompiler is imported)")
    p.add_argument("--before-label", help="what --before is, for the table (default: its git HEAD)")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--inter", type=int, default=18944)
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--elements", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-one-chunk", action="store_true", help="skip the one-chunk configuration")
    p.add_argument("--write", action="store_true", help="rewrite the probe's block of BENCHMARKS.md")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from common import HeavyLock, replace_block
    rows = {}
    with HeavyLock("bench/probe_smooth_memory.py"):
        if a.before:
            rows["before"] = run_child(a.before.resolve(), a)
            print("before", json.dumps(rows["before"]), flush=True)
        rows["after"] = run_child(ROOT, a)
        print("after", json.dumps(rows["after"]), flush=True)
        if not a.no_one_chunk:
            rows["one-chunk"] = run_child(ROOT, a, elements=1 << 40)
            print("one-chunk", json.dumps(rows["one-chunk"]), flush=True)
    text = report(rows, a, (a.before_label or git_head(a.before)) if a.before else "")
    text += f"\n\nCommand: `python3 bench/probe_smooth_memory.py{' --before <checkout of main>' if a.before else ''}`" \
            f" at {git_head(ROOT)}."
    print(text)
    if a.write:
        replace_block(BEGIN, END, text)


if __name__ == "__main__":
    main()
