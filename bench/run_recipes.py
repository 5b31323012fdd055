"""Best-practice recipes of `qcompile quant --quant_type T`: every candidate pipeline measured on SmolLM2-135M.

For each msModelSlim quant type and each architecture (llama `smollm2-135m`, qwen2 `smollm2-135m-qwen2`) the
candidate pipelines below are compiled and evaluated with the convention of BENCHMARKS.md:

    qcompile MODEL --passes P [FLAGS] --calib wiki_calib.jsonl --calib-samples 64 --seq-len 512 -o OUT --force
    qcompile eval OUT --data wiki_eval.jsonl --seq-len 512 --max-windows 40 --json
    python3 ../shared/tools/check_ascend_artifact.py --json OUT

The candidate with the lowest perplexity is the type's recipe for that architecture; qcompiler/recipes.py
holds the chosen pipelines (the single source of truth `qcompile quant` reads) and the table this script
writes into BENCHMARKS.md (between `<!-- recipes -->` markers) flags any type whose recipe is not the measured
best. Rows already measured with identical settings in bench/results/pipelines.json (run_pipelines.py, same
convention) are reused, not re-run, and marked so. Derived candidates (`+kv8`) extend the winner of another
type. Two extra rows: the README's main job exactly as written (`qcompile smollm2-135m --passes smooth,w8a8,kv8
--target ascend910b -o OUT`, calibration sampled from the model) with `qcompile run OUT --prompt ...`, and
`qcompile quant --quant_type w8a8` itself (it must reproduce its recipe's perplexity).

Each row (compile + eval) runs under one acquisition of the global heavy lock (run_pipelines.HeavyLock), results
are appended to bench/results/recipes.json after every row, and a row whose settings are measured is skipped,
so the script can be stopped and resumed:

    python3 bench/run_recipes.py                      # every row not yet measured
    python3 bench/run_recipes.py --only w4a8          # the candidates of some quant types (and the extra rows)
    python3 bench/run_recipes.py --rows readme,quant  # only the README main job and the qcompile quant rows
    python3 bench/run_recipes.py --markdown           # only rewrite recipes.md and the BENCHMARKS.md table
    python3 bench/run_recipes.py --list
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's qcompiler, not an installed one
from common import HeavyLock, replace_block  # noqa: E402
from run_pipelines import CALIB, EVAL, MODELS, SHARED, check, load1, qcompile, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PIPELINES_JSON = ROOT / "bench" / "results" / "pipelines.json"
PROMPT = "What is quantization?"
FP16_310P = ("--target", "ascend310p", "--dtype", "float16")
DOWN_FLOAT = ("--exclude", r"mlp\.down_proj")

#: quant type -> candidates (passes, extra compile flags, note); "+kv8:T" = the winner of type T plus kv8
CANDIDATES = {
    "w8a8": [("smooth,w8a8", (), "alpha searched per group"),
             ("smooth,gptq,w8a8", (), ""),
             ("smooth:shift=true,w8a8", (), "qwen2 only: shift needs the q/k/v biases"),
             ("smooth,w8a8:act_observer=histogram", (), "L2 histogram clip range (msModelSlim act_method 2)")],
    "w8a8_dynamic": [("w8a8d", (), ""), ("smooth,w8a8d", (), "")],
    "w8a8c8": [("+kv8:w8a8", (), "the w8a8 recipe + int8 KV cache")],
    "w8a16": [("w8a16", (), "RTN, calibration-free"), ("gptq,w8a16", (), "")],
    "w4a16": [("awq,gptq,w4a16", (), "group 64 on SmolLM2 (128 does not divide 576)"),
              ("awq,w4a16", (), ""), ("gptq,w4a16", (), "")],
    "w4a8": [("awq,gptq,{qkv}w4a8d:group=32", (), "issue 12's two-stage per-group form, msModelSlim's LLaMA-3.1 group"),
             ("smooth,awq,gptq,{qkv}w4a8d:group=32", (), ""),
             ("awq,gptq,{qkv}w4a8d:group=64", (), "")],
    "w4a8c8": [("+kv8:w4a8", (), "the w4a8 recipe + int8 KV cache")],
    "w8a8s": [("sparse:ratio=0,w8a8s", FP16_310P, "msModelSlim's lowbit: 4-bit codes, no pruning"),
              ("smooth,sparse:ratio=0,gptq,w8a8s", FP16_310P, "lowbit + smooth + gptq"),
              ("smooth,sparse:ratio=0,gptq,w8a8s", FP16_310P + DOWN_FLOAT,
               "as msModelSlim's W8A8S practice: every down_proj float"),
              ("smooth,sparse:ratio=0,w8a8s:fraction=0.01", FP16_310P,
               "co_sparse's default fraction: 1% weight outliers keep int8 codes")],
    "w16a16s": [("sparse:ratio=0.3,w16a16s", (), "sparsegpt, msModelSlim float_sparse's default ratio 0.3")],
}
#: `{qkv}` in a W4A8 candidate: qwen2's biased q/k/v take W8A8_DYNAMIC (no engine adds a W4A8_DYNAMIC Linear's bias);
#: the same prefix as qcompiler/recipes.py's qwen recipes
QKV = {"llama": "", "qwen2": r"w8a8d:match=self_attn\.[qkv]_proj,"}
#: rows measured before issue 12 (per-channel W4A8_DYNAMIC, which no engine loads dense): kept in recipes.json under
#: this quant_type_key, out of the tables and the recipe choice
OBSOLETE = "w4a8 per-channel (before issue 12)"
#: candidates measured on one variant only: shift needs biases (qwen2's q/k/v); the one that lost by far on llama
#: (W8A8S without smooth/gptq: 5.4x) is not repeated on qwen2
ONLY_VARIANT = {("w8a8", "smooth:shift=true,w8a8"): "qwen2", ("w8a8s", "sparse:ratio=0,w8a8s"): "llama"}
#: candidates listed for completeness but only reported where run_pipelines.py already measured them (they
#: cannot win: RTN w8a16 is at float perplexity; awq alone lost to awq,gptq on both models in session 1 / qwen2)
REUSE_ONLY = {"gptq,w8a16", "awq,w4a16", "gptq,w4a16"}
#: pipelines.json passes that are the same pipeline as a recipe candidate (w4a16's group resolves to 64 on SmolLM2)
SAME_AS = {"awq,gptq,w4a16": "awq,gptq,w4a16:group=64", "awq,w4a16": "awq,w4a16:group=64",
           "gptq,w4a16": "gptq,w4a16:group=64"}


def settings(variant: str, passes: str | None, flags=(), args=None, calib="file") -> dict:
    s = {"model": MODELS[variant], "passes": passes or "(float)", "eval": EVAL.name, "seq_len": 512,
         "max_windows": args.max_windows}
    if passes:
        if calib == "file":
            s.update(calib=CALIB.name, calib_samples=64, calib_seq_len=512)
        else:
            s.update(calib=calib)
        if flags:
            s["flags"] = list(flags)
    return s


def code_version() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        head = ""
    return head or os.environ.get("QC_BENCH_COMMIT", "unknown")


def evaluate(target: str, log: Path, args) -> dict:
    cmd = qcompile() + ["eval", target, "--data", str(EVAL), "--seq-len", "512", "--max-windows",
                        str(args.max_windows), "--json"]
    rc, wall, _ = run_measured(cmd, log)
    if rc:
        raise RuntimeError(f"eval failed ({rc}); see {log}")
    out = json.loads([ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1])
    out["wall_s"] = round(wall, 1)
    return out


def short(cmd: list[str]) -> str:
    return " ".join(["qcompile"] + cmd[len(qcompile()):]).replace(str(SHARED), "../shared")


def measure(key: str, compile_cmd: list[str] | None, out: Path | None, variant: str, args, run_prompt=False) -> dict:
    """One row under one lock acquisition: compile (unless float), eval, optional `qcompile run`, checker."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    row = {"variant": variant, "code": code_version()}
    with HeavyLock() as lock:
        row["lock_wait_s"] = round(lock.waited, 1)
        row["load_before"] = load1()
        if compile_cmd is None:
            ev = evaluate(MODELS[variant], work / f"{key}.eval.log", args)
        else:
            row["command"] = short(compile_cmd)
            rc, wall, rss = run_measured(compile_cmd, work / f"{key}.compile.log")
            row["load_after_compile"] = load1()
            if rc:
                tail = (work / f"{key}.compile.log").read_text()[-600:]
                raise RuntimeError(f"compile failed ({rc}): {tail}")
            row.update(compile_wall_s=round(wall, 1), peak_rss_mib=round(rss, 1))
            report = json.loads((out / "qcompile_report.json").read_text())
            row.update(quant_type=report.get("model_quant_type"), pass_seconds=report.get("pass_seconds", {}),
                       calibration=report.get("calibration"), report_wall_s=report.get("wall_seconds"))
            ev = evaluate(str(out), work / f"{key}.eval.log", args)
            if run_prompt:
                cmd = qcompile() + ["run", str(out), "--prompt", PROMPT, "--max-new-tokens", "64"]
                res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                row["run"] = {"command": short(cmd).replace(str(out), "OUT"), "prompt": PROMPT,
                              "answer": res.stdout.strip(), "rc": res.returncode}
        row["load_after"] = load1()
    row.update(ppl=ev["ppl"], eval=ev)
    if compile_cmd is not None:
        row["checker"] = check(out)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    row["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return row


def compile_cmd(variant: str, passes: str, flags, out: Path) -> list[str]:
    return qcompile() + [MODELS[variant], "--passes", passes, *flags, "--calib", str(CALIB), "--calib-samples",
                         "64", "--seq-len", "512", "-o", str(out), "--force"]


def winner(results: dict, variant: str, quant_type: str) -> dict | None:
    rows = [r for r in results.values() if r.get("variant") == variant and r.get("quant_type_key") == quant_type]
    return min(rows, key=lambda r: r["ppl"]) if rows else None


def expand(results: dict, variant: str, quant_type: str) -> list[tuple[str, tuple, str]]:
    """Candidates of a type for a variant, with derived ones resolved (skipped until their base is measured)."""
    out = []
    for passes, flags, note in CANDIDATES[quant_type]:
        only = ONLY_VARIANT.get((quant_type, passes))
        if only and only != variant:
            continue
        passes = passes.replace("{qkv}", QKV[variant])
        if passes.startswith("+kv8:"):
            base = winner(results, variant, passes[len("+kv8:"):])
            if base is None:
                continue
            passes, flags = base["settings"]["passes"] + ",kv8", tuple(base["settings"].get("flags", ()))
        out.append((passes, flags, note))
    return out


def reused(variant: str, passes: str, flags, args) -> dict | None:
    """A pipelines.json row with the same pipeline and settings (same model, calibration, eval windows)."""
    if flags or not PIPELINES_JSON.exists():
        return None
    want = settings(variant, SAME_AS.get(passes, passes), (), args)
    for row in json.loads(PIPELINES_JSON.read_text()).values():
        if row.get("settings") == want:
            return dict(row, reused_from=f"bench/results/pipelines.json ({row.get('measured_at')})")
    return None


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def row_key(variant: str, quant_type: str, passes: str | None, flags=()) -> str:
    return f"{variant}/{quant_type}/{passes or '(float)'}" + (" " + " ".join(flags) if flags else "")


def run_rows(args, path: Path) -> list[str]:
    """Float first, then every type's candidates in CANDIDATES order: a derived (+kv8) candidate is expanded
    when its type is reached, after its base type's rows are measured."""
    failed = []
    wanted = args.only or list(CANDIDATES)
    for variant in args.variants.split(","):
        for quant_type in ["float"] + [q for q in CANDIDATES if q in wanted]:
            results = json.loads(path.read_text()) if path.exists() else {}
            todo = [(None, (), "")] if quant_type == "float" else expand(results, variant, quant_type)
            for passes, flags, note in todo:
                key = row_key(variant, quant_type, passes, flags)
                want = settings(variant, passes, flags, args)
                results = json.loads(path.read_text()) if path.exists() else {}
                if results.get(key, {}).get("settings") == want:
                    continue
                row = reused(variant, passes, flags, args) if passes else None
                if row is None and passes in REUSE_ONLY:
                    continue
                if row is None:
                    print(f"measuring {key}", flush=True)
                    out = Path(args.work) / key.replace("/", "_").replace(",", "+").replace(" ", "_")
                    try:
                        cmd = compile_cmd(variant, passes, flags, out) if passes else None
                        row = measure(key.replace("/", "_").replace(" ", "_"), cmd, out, variant, args)
                    except RuntimeError as e:
                        print(f"{key}: {e}", flush=True)
                        failed.append(key)
                        continue
                row.update(settings=want, quant_type_key=quant_type, note=note)
                results = json.loads(path.read_text()) if path.exists() else {}
                results[key] = row
                save(results, path)
                print(f"{key}: ppl {row['ppl']:.3f}", flush=True)
    return failed


def run_extra(args, path: Path) -> list[str]:
    """The README main job (sampled calibration, + qcompile run) and `qcompile quant --quant_type w8a8`."""
    failed = []
    results = json.loads(path.read_text()) if path.exists() else {}
    out = Path(args.work) / "readme_main_job"
    key = "llama/readme/smooth,w8a8,kv8"
    want = settings("llama", "smooth,w8a8,kv8", ("--target", "ascend910b"), args, calib="sampled (default)")
    if "readme" in args.rows and results.get(key, {}).get("settings") != want:
        cmd = qcompile() + ["smollm2-135m", "--passes", "smooth,w8a8,kv8", "--target", "ascend910b", "-o", str(out),
                            "--force"]
        try:
            row = measure("readme", cmd, out, "llama", args, run_prompt=True)
            row.update(settings=want, quant_type_key="readme", note="README main job, exactly as written")
            results = json.loads(path.read_text()) if path.exists() else {}
            results[key] = row
            save(results, path)
        except RuntimeError as e:
            print(f"{key}: {e}", flush=True)
            failed.append(key)
    for variant in args.variants.split(",") if "quant" in args.rows else ():
        key = f"{variant}/quant/--quant_type w8a8"
        out = Path(args.work) / f"quant_w8a8_{variant}"
        want = settings(variant, "qcompile quant --quant_type w8a8", (), args)
        if results.get(key, {}).get("settings") == want:
            continue
        cmd = qcompile() + ["quant", "--model_path", MODELS[variant], "--save_path", str(out), "--quant_type", "w8a8",
                            "--calib_file", str(CALIB), "--force"]
        try:
            row = measure(f"quant_{variant}", cmd, out, variant, args)
        except RuntimeError as e:
            print(f"{key}: {e}", flush=True)
            failed.append(key)
            continue
        row.update(settings=want, quant_type_key="quant", note="must equal the w8a8 recipe's perplexity")
        results = json.loads(path.read_text()) if path.exists() else {}
        results[key] = row
        save(results, path)
    return failed


def table(results: dict) -> list[str]:
    from qcompiler.recipes import QUANT_TYPE_RECIPES, arch_family
    lines = ["| quant type | model | candidate --passes (flags) | ppl | x float | checker | source | recipe |",
             "|---|---|---|---|---|---|---|---|"]
    for quant_type in CANDIDATES:
        for variant in ("llama", "qwen2"):
            fl = results.get(row_key(variant, "float", None))
            rows = [r for r in results.values() if r.get("variant") == variant and r.get("quant_type_key") == quant_type]
            if not rows:
                continue
            best = min(rows, key=lambda r: r["ppl"])
            recipe = QUANT_TYPE_RECIPES[quant_type].for_family(arch_family(variant))
            for r in sorted(rows, key=lambda r: r["ppl"]):
                st = r["settings"]
                flags = " ".join(st.get("flags", ()))
                chk = r.get("checker") or {}
                chk_s = f"{chk.get('errors')} errors, {chk.get('warnings')} warnings" if chk else "-"
                src = "reused (pipelines.json)" if r.get("reused_from") else f"measured ({r.get('code', '?')})"
                is_recipe = (st["passes"] == recipe.passes and list(st.get("flags", ())) == list(recipe.flags()))
                mark = "**recipe**" if is_recipe else ""
                if r is best and not is_recipe:
                    mark = "best, NOT the recipe"
                xf = f"{r['ppl'] / fl['ppl']:.3f}" if fl else "-"
                lines.append(f"| {quant_type} | {variant} | `{st['passes']}`{' `' + flags + '`' if flags else ''} | "
                             f"{r['ppl']:.3f} | {xf} | {chk_s} | {src} | {mark} |")
    return lines


def write_markdown(results: dict, path: Path) -> str:
    fl = {v: (results.get(row_key(v, "float", None)) or {}).get("ppl") for v in ("llama", "qwen2")}
    lines = ["# Best-practice recipes of `qcompile quant --quant_type` on SmolLM2-135M", "",
             f"Generated by `python3 bench/run_recipes.py` ({platform.machine()}, {os.cpu_count()} shared cores). "
             "Calibration wiki_calib.jsonl 64 x 512; perplexity of the executable graph on wiki_eval.jsonl, "
             "512-token windows, first 40; x float = ppl / float ppl of the same model "
             f"(llama {fl['llama']}, qwen2 {fl['qwen2']}). The recipe of each type and architecture is the lowest "
             "perplexity among its candidates (qcompiler/recipes.py). `measured (commit)` rows ran with this "
             "script at that commit; `reused` rows are run_pipelines.py rows with identical pipeline and settings.",
             ""] + table(results)
    extra = [r for r in results.values() if r.get("quant_type_key") in ("readme", "quant")]
    if extra:
        lines += ["", "| row | command | ppl | x float | checker |", "|---|---|---|---|---|"]
        for r in extra:
            f = fl.get(r["variant"])
            chk = r.get("checker") or {}
            lines.append(f"| {r['note']} | `{r.get('command')}` | {r['ppl']:.3f} | "
                         f"{r['ppl'] / f:.3f} | {chk.get('errors')} errors, {chk.get('warnings')} warnings |"
                         if f else f"| {r['note']} | `{r.get('command')}` | {r['ppl']:.3f} | - | - |")
            if r.get("run"):
                lines += ["", f"`{r['run']['command']}` answered:", "", "```", r["run"]["answer"], "```"]
    old = [r for r in results.values() if r.get("quant_type_key") == OBSOLETE]
    if old:
        lines += ["", f"{OBSOLETE}: per-channel int4 W4A8_DYNAMIC, which issue 12 replaced by the per-group form (no "
                  "engine loads it for a dense Linear); kept for the record, not a candidate:", "",
                  "| model | --passes | ppl | x float | measured |", "|---|---|---|---|---|"]
        for r in sorted(old, key=lambda r: r["ppl"]):
            f = fl.get(r["variant"])
            lines.append(f"| {r['variant']} | `{r['settings']['passes']}` | {r['ppl']:.3f} | "
                         f"{r['ppl'] / f:.3f} | {r.get('code', '?')} |" if f else
                         f"| {r['variant']} | `{r['settings']['passes']}` | {r['ppl']:.3f} | - | {r.get('code', '?')} |")
    text = "\n".join(lines) + "\n"
    path.with_suffix(".md").write_text(text)
    return text


def update_benchmarks(results: dict) -> None:
    replace_block("<!-- recipes -->", "<!-- /recipes -->", "\n".join(table(results)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="llama,qwen2")
    p.add_argument("--only", nargs="*", help="quant types (see --list)")
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--work", default="/tmp/qc-bench-recipes")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "recipes.json")
    p.add_argument("--keep", action="store_true", help="keep the compiled OUT folders in --work")
    p.add_argument("--rows", default="candidates,readme,quant",
                   help="which rows: candidates (per quant type), readme (the README main job), quant (qcompile "
                        "quant --quant_type w8a8); comma list, default all")
    p.add_argument("--list", action="store_true")
    p.add_argument("--markdown", action="store_true", help="only rewrite recipes.md and BENCHMARKS.md's table")
    args = p.parse_args(argv)
    if args.list:
        for qt, cands in CANDIDATES.items():
            for passes, flags, note in cands:
                print(f"{qt:13s} {passes:36s} {' '.join(flags):40s} {note}")
        return 0
    if args.only and set(args.only) - set(CANDIDATES):
        raise SystemExit(f"unknown quant types {sorted(set(args.only) - set(CANDIDATES))}")
    failed = [] if args.markdown or "candidates" not in args.rows else run_rows(args, args.results)
    if not args.markdown:
        failed += run_extra(args, args.results)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    print(write_markdown(results, args.results))
    update_benchmarks(results)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
