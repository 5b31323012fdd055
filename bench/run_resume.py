"""Resume after a kill (issue 15 part 2): SmolLM2-135M killed after layer K (default: 15 of 30 layers done),
resumed with --resume, against an uninterrupted compile of the same command.

Under ONE acquisition of the global heavy lock (the three runs share the machine's load):
1. uninterrupted: `python3 -m qcompiler.cli smollm2-135m --passes P --calib wiki_calib.jsonl
   --calib-samples N --seq-len L -o A` (this checkout's qcompiler);
2. killed: the same command with `-o B` and QC_TEST_KILL_AFTER_LAYER=K-1 (knobs.py: SIGKILL right after
   layer K-1's resume state is committed, as a power loss would stop it);
3. resumed: the same command with `-o B --resume`.
Wall seconds of each process from outside (process start and imports included), peak RSS (os.wait4), and
from the reports the seconds spent committing the per-layer resume state (phase "resume state") and
restoring it (phase "resume: restore state"). Equality: every file of A and B byte for byte (reports
aside) and the reports without wall times (tests/byte_identity.py `compile_differences`).
Results: bench/results/resume.json, resume.md and the resume section of BENCHMARKS.md.

    flock /tmp/qc-heavy.lock env QC_HEAVY_LOCK_HELD=1 nice -n 5 python3 bench/run_resume.py
    python3 bench/run_resume.py --passes smooth,w8a8 --calib-samples 16 --kill-at 15
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from common import HeavyLock, replace_block  # noqa: E402
from run_memory import _commit, run_compile  # noqa: E402
from run_pipelines import load1  # noqa: E402
from tests.byte_identity import compile_differences  # noqa: E402

SHARED = ROOT.parent / "shared"
CALIB = SHARED / "data" / "calib" / "wiki_calib.jsonl"
RESULTS = ROOT / "bench" / "results" / "resume.json"
MODEL = "smollm2-135m"
MARK = ("<!-- resume -->", "<!-- /resume -->")
HEADING = ("## Resume after a kill (issue 15) — `flock /tmp/qc-heavy.lock env QC_HEAVY_LOCK_HELD=1 nice -n 5 "
           "python3 bench/run_resume.py`")


def _phase(out: Path, name: str) -> float:
    return json.loads((out / "qcompile_report.json").read_text())["phase_seconds"].get(name, 0.0)


def measure(args, work: Path) -> dict:
    cmd = [sys.executable, "-m", "qcompiler.cli", MODEL, "--passes", args.passes, "--calib", str(CALIB),
           "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len)]
    a, b = work / "a", work / "b"
    row = {"passes": args.passes, "calib": f"{args.calib_samples} x {args.seq_len}", "kill_at": args.kill_at,
           "commit": _commit(ROOT)}
    with HeavyLock("bench/run_resume.py") as lock:
        row["lock_wait_s"], row["load_before"] = round(lock.waited, 1), load1()
        row["uninterrupted"] = run_compile(cmd + ["-o", str(a)], ROOT, work / "a.log")
        os.environ["QC_TEST_KILL_AFTER_LAYER"] = str(args.kill_at - 1)
        try:
            row["killed"] = run_compile(cmd + ["-o", str(b)], ROOT, work / "killed.log")
        finally:
            del os.environ["QC_TEST_KILL_AFTER_LAYER"]
        state = [p for p in work.iterdir() if p.name.startswith(".b.tmp-")]
        row["state_mib"] = round(sum(f.stat().st_size for p in state for f in p.rglob("*") if f.is_file())
                                 / 2**20, 1)
        row["resume_state_mib"] = round(sum(f.stat().st_size for p in state for f in (p / ".resume").rglob("*")
                                            if f.is_file()) / 2**20, 1)
        row["resumed"] = run_compile(cmd + ["-o", str(b), "--resume"], ROOT, work / "resumed.log")
        row["load_after"] = load1()
    for k in ("uninterrupted", "killed", "resumed"):
        row[k] = {x: row[k][x] for x in ("rc", "wall_s", "peak_rss_mib")}
    ok = row["uninterrupted"]["rc"] == 0 and row["resumed"]["rc"] == 0 and row["killed"]["rc"] == -9
    row["differences"] = compile_differences(a, b) if ok else ["a run failed: see the logs in " + str(work)]
    if ok:
        row["commit_state_s_uninterrupted"] = round(_phase(a, "resume state"), 1)
        row["restore_state_s"] = round(_phase(b, "resume: validate state") + _phase(b, "resume: restore state"), 2)
        rb = json.loads((b / "qcompile_report.json").read_text())
        row["resumed_at_layer"] = rb.get("resumed_at_layer")
        # median seconds of a layer in each run: how loaded the machine was while it ran
        la = [x["seconds"] for x in json.loads((a / "qcompile_report.json").read_text())["layers"]]
        lb = [x["seconds"] for x in rb["layers"]]
        done = row["resumed_at_layer"]
        row["uninterrupted"]["layer_median_s"] = statistics.median(la)
        row["killed"]["layer_median_s"] = statistics.median(lb[:done])
        row["resumed"]["layer_median_s"] = statistics.median(lb[done:])
    return row


def markdown(row: dict) -> str:
    u, k, r = row["uninterrupted"], row["killed"], row["resumed"]
    same = "**yes**" if not row["differences"] else "NO: " + "; ".join(row["differences"][:5])
    med = lambda x: x.get("layer_median_s", "-")  # noqa: E731
    return "\n".join([
        f"`--passes {row['passes']}`, calibration {row['calib']} of wiki_calib.jsonl, killed after layer "
        f"{row['kill_at'] - 1} (0-based: {row['kill_at']} of 30 layers committed; commit {row['commit']}; load "
        f"{row['load_before']} -> {row['load_after']}):", "",
        "| run | layers | wall s | median s / layer | peak RSS MiB |", "|---|---|---|---|---|",
        f"| uninterrupted | 0-29 | {u['wall_s']} | {med(u)} | {u['peak_rss_mib']} |",
        f"| killed (SIGKILL after layer {row['kill_at'] - 1}'s commit) | 0-{row['kill_at'] - 1} | {k['wall_s']} | "
        f"{med(k)} | {k['peak_rss_mib']} |",
        f"| `--resume` | {row.get('resumed_at_layer')}-29 | {r['wall_s']} | {med(r)} | {r['peak_rss_mib']} |",
        f"| killed + resumed | 0-29 | {round(k['wall_s'] + r['wall_s'], 1)} | | |", "",
        f"- byte-identical to the uninterrupted compile (every OUT file; report apart from timings): {same}",
        f"- committing the resume state after every layer took {row.get('commit_state_s_uninterrupted')} s of "
        f"the uninterrupted run in all; validating and restoring it (sha256 of every reused file, the "
        f"fingerprint) {row.get('restore_state_s')} s; the killed compile's staging folder held {row['state_mib']} MiB, of which "
        f"{row['resume_state_mib']} MiB resume state (manifest + the next layer's inputs)",
    ]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passes", default="w8a8")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--kill-at", type=int, default=15, help="layers done when the compile is killed (default 15)")
    p.add_argument("--keep", type=Path, help="keep the OUT folders and logs here")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="qc-resume-", dir=a.keep))
    try:
        row = measure(a, work)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(row, indent=1))
    RESULTS.write_text(json.dumps(row, indent=1) + "\n")
    text = markdown(row)
    (RESULTS.with_suffix(".md")).write_text(text)
    replace_block(*MARK, text, heading=HEADING)
    return 0 if not row["differences"] else 1


if __name__ == "__main__":
    sys.exit(main())
