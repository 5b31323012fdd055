"""Peak memory and seconds per layer of a compile at real widths and depths (issue 15, part 1).

For each case (synthetic checkpoint x pipeline), under one acquisition of the global heavy lock:

    python3 -m qcompiler.cli CKPT --passes P --calib wiki_calib.jsonl --calib-samples 16 --seq-len 512 \
        -o OUT --force          (run in --checkout, default this repository: its qcompiler is imported)

Checkpoints come from bench/synthetic_checkpoint.py (random weights, real shapes; built tensor by tensor
into --cache on first use): SmolLM2-135M's width at 8, 30 and 120 layers (does peak RSS depend on depth?)
and 2-4 layers of Qwen2.5-7B's and Qwen2.5-72B's shapes (what does a layer of a real model cost?).
Measured from outside the compile process: peak RSS = ru_maxrss of that child (os.wait4: the kernel's
high-water mark, exact), plus a 0.1 s psutil poll of its RSS split into anonymous and file-backed pages
(/proc/PID/status RssAnon / RssFile: file-backed pages are mapped checkpoint data the kernel can drop)
with the time of each peak; wall seconds; per-layer seconds and per-pass seconds from the compile's
report. Results go to bench/results/memory.json (one row per label/preset/pipeline; rows already there
are skipped unless --redo), bench/results/memory.md and the memory section of BENCHMARKS.md, with
extrapolations to the full depth (28 / 80 layers):

    seconds(full) = (wall - sum of layer seconds) + full_layers x mean seconds of the layers after the first
    peak(full)    = the measured peak (depth-independent: the SmolLM2 rows at 8/30/120 layers show it)

    python3 bench/run_memory.py --list
    python3 bench/run_memory.py --cases smollm2-135m-depth8 smollm2-135m-depth30 --pipelines w8a16
    python3 bench/run_memory.py --label before --checkout /tmp/qc-base      # the same cases, older code
    python3 bench/run_memory.py --markdown                                  # only rewrite the tables

Disk: the 72B shape's checkpoint at 2 layers is ~8.5 GB, its OUT ~5 GB; OUT folders are deleted after each
case, checkpoints are kept in --cache for the next case (--drop-checkpoints deletes each after its last case).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import synthetic_checkpoint as sc  # noqa: E402
from common import HeavyLock, replace_block  # noqa: E402
from run_pipelines import load1  # noqa: E402

SHARED = ROOT.parent / "shared"
CALIB = SHARED / "data" / "calib" / "wiki_calib.jsonl"
RESULTS = ROOT / "bench" / "results" / "memory.json"
CACHE = Path.home() / ".cache" / "qc-bench" / "synthetic"

CASES = ["smollm2-135m-depth8", "smollm2-135m-depth30", "smollm2-135m-depth120",
         "qwen2.5-7b-layers2", "qwen2.5-7b-layers4", "qwen2.5-72b-layers2"]
PIPELINES = ["w8a16", "w8a8d", "smooth,w8a8", "gptq,w4a16"]
GIB, MIB = 2**30, 2**20


class Poller:
    """Samples a process's RSS (anonymous / file-backed) every `interval` s until it exits."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval, self.samples = pid, interval, []
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self):
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.M))
        if "VmRSS" not in fields:  # a zombie: the process is gone
            return None
        return tuple(int(fields.get(k, 0)) * 1024 for k in ("VmRSS", "RssAnon", "RssFile"))

    def _run(self):
        while True:
            got = self._read()
            if got is None:
                return
            self.samples.append((round(time.perf_counter() - self.t0, 2),) + got)
            time.sleep(self.interval)

    def join(self):
        self._thread.join(timeout=5)

    def summary(self) -> dict:
        if not self.samples:
            return {}
        peak = max(self.samples, key=lambda s: s[1])
        anon = max(self.samples, key=lambda s: s[2])
        step = max(1, len(self.samples) // 300)
        return {"poll_peak_rss_mib": round(peak[1] / MIB, 1), "poll_peak_at_s": peak[0],
                "poll_peak_anon_mib": round(anon[2] / MIB, 1), "poll_peak_anon_at_s": anon[0],
                "file_at_anon_peak_mib": round(anon[3] / MIB, 1),
                "timeline": [[s[0], round(s[1] / MIB), round(s[2] / MIB)] for s in self.samples[::step]]}


def run_compile(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run one compile; its wall time, exit code, ru_maxrss and RSS poll."""
    env = dict(os.environ, QC_NO_PROGRESS="1")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        poller = Poller(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    poller.join()
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": round(wall, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), **poller.summary()}


def checkpoint(preset: str, cache: Path, log) -> Path:
    folder = cache / preset
    if (folder / "synthetic.json").is_file():
        return folder
    log(f"building {preset} into {folder}")
    return sc.build_checkpoint(folder, preset, seed=0, progress=True)


def sizes(spec: "sc.Spec") -> dict:
    """Bytes (bf16) of the head (embeddings, final norm, lm_head) and of one decoder layer."""
    total = sc.checkpoint_bytes(spec)
    head = sc.checkpoint_bytes(sc.Spec(spec.name, spec.model_type, dict(spec.config, num_hidden_layers=0),
                                       spec.full_layers))
    return {"head_bytes": head, "layer_bytes": (total - head) // spec.num_layers}


def settings(preset: str, pipeline: str, args) -> dict:
    return {"preset": preset, "passes": pipeline, "calib": CALIB.name, "calib_samples": args.calib_samples,
            "seq_len": args.seq_len}


def measure(preset: str, pipeline: str, args, log) -> dict:
    spec = sc.resolve(preset)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.label}_{preset}_{pipeline.replace(',', '_').replace(':', '_')}"
    out = work / tag
    row = {"settings": settings(preset, pipeline, args), "label": args.label, "checkout": str(args.checkout),
           "commit": _commit(Path(args.checkout)), **sizes(spec), "num_layers": spec.num_layers,
           "full_layers": spec.full_layers}
    with HeavyLock() as lock:
        row["lock_wait_s"] = round(lock.waited, 1)
        ckpt = checkpoint(preset, Path(args.cache), log)
        cmd = [sys.executable, "-m", "qcompiler.cli", str(ckpt), "--passes", pipeline, "--calib", str(CALIB),
               "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len), "-o", str(out), "--force"]
        row["command"] = " ".join(["qcompile"] + cmd[3:]).replace(str(SHARED), "../shared").replace(
            str(Path.home()), "~")
        row["load_before"] = load1()
        log("$ " + row["command"])
        row.update(run_compile(cmd, Path(args.checkout), work / f"{tag}.log"))
        row["load_after"] = load1()
        if row["rc"] != 0:
            row["log_tail"] = (work / f"{tag}.log").read_text()[-3000:]
            shutil.rmtree(out, ignore_errors=True)
            return row
        report = json.loads((out / "qcompile_report.json").read_text())
        layer_s = [float(layer["seconds"]) for layer in report["layers"]]
        row.update(report_wall_s=report.get("wall_seconds"), pass_seconds=report.get("pass_seconds", {}),
                   layer_seconds=layer_s, out_bytes=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()))
        shutil.rmtree(out, ignore_errors=True)
    row["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return row


def _commit(checkout: Path) -> str:
    """The checkout's commit: `git rev-parse`, or a COMMIT file (a `git archive` snapshot)."""
    if (checkout / "COMMIT").is_file():
        return (checkout / "COMMIT").read_text().strip()
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
                           capture_output=True, text=True).stdout.strip()
    return res.stdout.strip() + ("+changes" if dirty else "")


# ------------------------------------------------------------------------------------------------ tables

def per_layer(row: dict) -> tuple[float, float]:
    """(fixed seconds outside the layer loop, mean seconds of a layer after the first)."""
    layers = row["layer_seconds"]
    rest = layers[1:] or layers
    return row["wall_s"] - sum(layers), sum(rest) / len(rest)


def extrapolate(row: dict) -> dict:
    fixed, layer = per_layer(row)
    return {"full_s": fixed + layer * row["full_layers"], "fixed_s": fixed, "layer_s": layer}


def _f(v, d=0):
    return "-" if v is None else f"{v:,.{d}f}"


def hessian_work_bytes(config: dict) -> int:
    """What GPTQ / SparseGPT hold on top of a layer's working set at their largest Linear: its float32 Hessian
    H (k x k, k the widest Linear input: the MLP's down_proj) and the float64 k x k buffer its inverse factor
    is computed in (2 x H), 3 x 4 k^2 bytes. One Hessian is in memory at a time (passes/gptq.py, sequential;
    measured 2.17-2.47 x H above the caller's H by bench/probe_gptq_peak.py). Dense layers only: a MoE layer's
    per-expert Grams (passes/gptq.py "Cost") are not counted."""
    heads = config["num_attention_heads"] * config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    k = max(config["hidden_size"], config["intermediate_size"], heads)
    return 3 * 4 * k * k


def bound_bytes(row: dict) -> int:
    """The issue's bound for a row: bf16 head (embeddings, final norm, lm_head) + two decoder layers + the
    calibration hidden states in and out; for a pipeline with gptq or sparse (SparseGPT) also their Hessian
    work (`hessian_work_bytes`), which no rounding that reads a k x k Hessian can avoid."""
    st = row["settings"]
    config = sc.resolve(st["preset"]).config
    act = st["calib_samples"] * st["seq_len"] * config["hidden_size"] * 2 * 2
    bound = row["head_bytes"] + 2 * row["layer_bytes"] + act
    if {"gptq", "sparse"} & {p.split(":")[0] for p in st["passes"].split(",")}:
        bound += hessian_work_bytes(config)
    return bound


def table(results: dict, label: str) -> list[str]:
    rows = [r for r in results.values() if r.get("label") == label and r.get("rc") == 0]
    if not rows:
        return []
    order = {p: i for i, p in enumerate(CASES)}
    pipes = {p: i for i, p in enumerate(PIPELINES)}
    rows.sort(key=lambda r: (order.get(r["settings"]["preset"], 99), pipes.get(r["settings"]["passes"], 99)))
    lines = ["| checkpoint | layers | --passes | peak RSS MiB | peak anon MiB (file-backed then) | wall s | "
             "s / layer | bound GiB | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st = r["settings"]
        _, layer = per_layer(r)
        bound = bound_bytes(r) / GIB
        lines.append(f"| {st['preset']} | {r['num_layers']} | `{st['passes']}` | {_f(r['peak_rss_mib'])} | "
                     f"{_f(r.get('poll_peak_anon_mib'))} ({_f(r.get('file_at_anon_peak_mib'))}) | {_f(r['wall_s'], 1)} | "
                     f"{_f(layer, 1)} | {bound:.2f} | {r.get('load_before')} -> {r.get('load_after')} |")
    return lines


def depth_check(results: dict, label: str) -> list[str]:
    """Peak RSS across the SmolLM2 depths, per pipeline: max / min - 1 (the issue's bound: 10%)."""
    out = []
    for pipe in PIPELINES:
        peaks = {r["settings"]["preset"]: r["peak_rss_mib"] for r in results.values()
                 if r.get("label") == label and r.get("rc") == 0 and r["settings"]["passes"] == pipe
                 and r["settings"]["preset"].startswith("smollm2-135m-depth")}
        if len(peaks) >= 2:
            spread = max(peaks.values()) / min(peaks.values()) - 1
            ok = "within" if spread <= 0.10 else "NOT within"
            out.append(f"- `{pipe}`: " + ", ".join(f"{k.rsplit('-', 1)[1]} {v:,.0f}" for k, v in sorted(
                peaks.items(), key=lambda kv: int(kv[0].rsplit('depth', 1)[1]))) +
                f" MiB: spread {spread:.1%} ({ok} 10%)")
    return out


def extrapolation_table(results: dict, label: str) -> list[str]:
    rows = [r for r in results.values() if r.get("label") == label and r.get("rc") == 0
            and not r["settings"]["preset"].startswith("smollm2")]
    if not rows:
        return []
    pipes = {p: i for i, p in enumerate(PIPELINES)}
    rows.sort(key=lambda r: (r["settings"]["preset"], pipes.get(r["settings"]["passes"], 99)))
    lines = ["| model (full depth) | from | --passes | s / layer | fixed s | full compile h | peak RSS GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = extrapolate(r)
        base = r["settings"]["preset"].rsplit("-", 1)[0]
        lines.append(f"| {base} ({r['full_layers']} layers) | {r['num_layers']} layers | `{r['settings']['passes']}` | "
                     f"{e['layer_s']:.1f} | {e['fixed_s']:.0f} | {e['full_s'] / 3600:.2f} | {r['peak_rss_mib'] / 1024:.1f} |")
    return lines


def write_markdown(results: dict, args) -> str:
    labels = sorted({r["label"] for r in results.values()}, key=lambda x: (x != "after", x))
    lines = ["# Memory and seconds per layer at real widths (issue 15 part 1)", "",
             f"Generated by `python3 bench/run_memory.py` ({platform.machine()}, {os.cpu_count()} cores shared with "
             "other jobs; every compile ran alone under the global heavy lock). Synthetic random-weight checkpoints "
             "(bench/synthetic_checkpoint.py, bf16), calibration `wiki_calib.jsonl` 16 x 512 tokens. peak RSS = "
             "ru_maxrss of the compile process (os.wait4); peak anon = the highest anonymous RSS seen by a 0.1 s "
             "poll (and the file-backed RSS at that moment: mapped checkpoint pages the kernel may drop); s / layer "
             "= mean of the report's per-layer seconds after the first layer; bound = the issue's head + 2 layers + "
             "calib (bf16 embeddings + lm_head + final norm, two decoder layers, calibration hidden states in and "
             "out), plus for gptq / sparse the Hessian work of the widest Linear (H and its float64 factor "
             "buffer, 3 x 4 k^2 bytes: `hessian_work_bytes`).", ""]
    for label in labels:
        lines += [f"## {label}", ""] + table(results, label) + [""]
        dc = depth_check(results, label)
        if dc:
            lines += ["Peak RSS across depths (SmolLM2 width):", ""] + dc + [""]
        ex = extrapolation_table(results, label)
        if ex:
            lines += ["Extrapolated to the full depth (fixed + layers x s / layer; peak RSS as measured, "
                      "independent of depth):", ""] + ex + [""]
    cmds = sorted({r["command"] for r in results.values() if r.get("command")})
    lines += ["Commands:", "", "```"] + cmds + ["```", ""]
    text = "\n".join(lines)
    RESULTS.with_suffix(".md").write_text(text)
    return text


def update_benchmarks(results: dict) -> None:
    """Replace the <!-- memory --> ... <!-- /memory --> block of BENCHMARKS.md with the 'after' tables."""
    body = []
    for label in ("after", "before"):
        t = table(results, label)
        if not t:
            continue
        body += [f"**{label}**" + (" (main before this work)" if label == "before" else "") + ":", ""] + t + [""]
        dc = depth_check(results, label)
        if dc:
            body += ["Peak RSS across depths:", ""] + dc + [""]
        if label == "after":
            ex = extrapolation_table(results, label)
            if ex:
                body += ["Extrapolated to the full models:", ""] + ex + [""]
    if not body:
        return
    replace_block("<!-- memory -->", "<!-- /memory -->", "\n".join(body),
                  heading="## Memory at real widths (issue 15) — `python3 bench/run_memory.py`")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=CASES, help="synthetic presets (default: all)")
    p.add_argument("--pipelines", nargs="*", default=PIPELINES)
    p.add_argument("--label", default="after", help="row label (e.g. before / after)")
    p.add_argument("--checkout", default=str(ROOT), help="qcompiler checkout to run (default: this one)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--cache", default=str(CACHE), help="where synthetic checkpoints are built and kept")
    p.add_argument("--work", default="/tmp/qc-bench-memory")
    p.add_argument("--redo", action="store_true", help="measure rows already in memory.json again")
    p.add_argument("--drop-checkpoints", action="store_true", help="delete each checkpoint after its last case")
    p.add_argument("--list", action="store_true")
    p.add_argument("--markdown", action="store_true", help="only rewrite the tables from memory.json")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.list:
        for c in CASES:
            s = sc.resolve(c)
            z = sizes(s)
            print(f"{c:24s} layers {s.num_layers:4d} head {z['head_bytes'] / GIB:6.2f} GiB, layer "
                  f"{z['layer_bytes'] / GIB:6.3f} GiB")
        return 0
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.markdown:
        for ci, preset in enumerate(args.cases):
            for pipeline in args.pipelines:
                key = f"{args.label}/{preset}/{pipeline}"
                old = results.get(key)
                if old and old.get("rc") == 0 and old["settings"] == settings(preset, pipeline, args) and not args.redo:
                    log(f"skip {key} (measured {old.get('measured_at')})")
                    continue
                row = measure(preset, pipeline, args, log)
                results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
                results[key] = row
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(results, indent=1) + "\n")
                if row["rc"]:
                    log(f"{key}: FAILED rc={row['rc']}: {row.get('log_tail', '')[-500:]}")
                else:
                    fixed, layer = per_layer(row)
                    log(f"{key}: peak RSS {row['peak_rss_mib']:,.0f} MiB (anon {row.get('poll_peak_anon_mib')}), wall "
                        f"{row['wall_s']} s, {layer:.1f} s/layer, load {row['load_before']} -> {row['load_after']}")
            if args.drop_checkpoints:
                shutil.rmtree(Path(args.cache) / preset, ignore_errors=True)
    print(write_markdown(results, args))
    update_benchmarks(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
