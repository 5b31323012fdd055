"""The compile report: `qcompile_report.json` (everything) and `qcompile_report.md` (for people), in OUT."""
import json
from collections import Counter
from pathlib import Path


def _markdown(r: dict) -> str:
    counts = Counter(t for layer in r["layers"] for t in layer["linears"].values())
    lines = [
        f"# qcompile report: {r['model']}",
        "",
        f"- architecture: {r['architecture']}, dtype {r['dtype']}, target {r['target']}",
        f"- passes: {', '.join(r['passes'])}",
    ]
    if r.get("source"):
        lines += [f"- chosen by: {r['source']}"] + [f"  - {n}" for n in r.get("notes") or []]
    lines += [
        f"- excluded (kept float): {', '.join(r['exclude']) or 'none'} (policy {r.get('policy', 'none')}); "
        "lm_head and embeddings float",
        f"- calibration: {r['calibration']}",
        f"- model_quant_type: {r['model_quant_type']}",
        *_engines_md(r),
        f"- decoder Linears by type: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}",
        f"- wall time: {r['wall_seconds']} s, peak RSS: {r['peak_rss_mib']} MiB",
        "",
        "## Seconds per pass (all layers)",
        "",
        "| pass | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in r["pass_seconds"].items()]
    if r.get("phase_seconds"):
        lines += ["", "## Seconds per phase (where the wall time went)", "", "| phase | seconds |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in r["phase_seconds"].items()]
    if r.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r["warnings"]]
    if r.get("fallback"):
        lines += _fallback_md(r["fallback"])
    lines += _sparsity_md(r["layers"])
    lines += _experts_md(r["layers"])
    lines += ["", "## Layers", "", "| layer | seconds | float Linears |", "|---|---|---|"]
    for layer in r["layers"]:
        floats = [k for k, v in layer["linears"].items() if v == "FLOAT"]
        lines.append(f"| {layer['layer']} | {layer['seconds']} | {', '.join(floats) or '-'} |")
    return "\n".join(lines) + "\n"


def _engines_md(r: dict) -> list[str]:
    """Which engines load the artifact (engine support matrix, backends/ascend/engines.py), with notes."""
    engines = r.get("engines") or {}
    if not engines:
        return []
    names = {"vllm-ascend": "vLLM-Ascend", "mindie": "MindIE"}
    loading = [names.get(e, e) for e, v in engines.items() if v["loads"]]
    lines = [f"- loads in: {', '.join(loading) or 'no engine'} (--engine {r.get('engine', 'any')})"]
    for e, v in engines.items():
        lines += [f"  - {names.get(e, e)}: {n}" for n in v["notes"]]
        lines += [f"  - {names.get(e, e)} cannot load it: {w}" for w in v["why_not"]]
    return lines


def _sparsity_md(layers: list) -> list[str]:
    """The sparse pass's achieved fraction of zeros per Linear (layer x Linear), when it ran."""
    recs = [(layer["layer"], layer.get("passes", {}).get("sparse", {}).get("linears", {})) for layer in layers]
    names = list(dict.fromkeys(n for _, rec in recs for n in rec))   # graph order, as recorded
    if not names:
        return []
    method = next(iter(recs[0][1].values()), {}).get("method", "?") if recs[0][1] else "?"
    lines = ["", f"## Sparsity (sparse pass, {method}): achieved fraction of zeros per Linear", "",
             "| layer | " + " | ".join(n.split(".")[-1] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for index, rec in recs:
        lines.append(f"| {index} | " + " | ".join(f"{rec[n]['sparsity']:.4f}" if n in rec else "dense"
                                                  for n in names) + " |")
    return lines


def _experts_md(layers: list) -> list[str]:
    """Mixture-of-experts layers: calibration tokens the router sent to each expert (top-k per token). Dynamic and
    weight-only schemes on experts use none of them; gptq takes each expert's statistics from its routed tokens and
    gives an expert below its threshold RTN or the all-token Hessian (passes/gptq.py): the last column counts the
    expert Linears per treatment (per Linear in the JSON report, passes.gptq.linears); passes that would need other
    per-expert statistics are refused (passes/moe_checks.py check_expert_passes)."""
    rows = [layer for layer in layers if layer.get("expert_tokens") is not None]
    if not rows:
        return []
    lines = ["", "## Experts: calibration tokens routed to each expert", "",
             "| layer | experts | tokens routed (top-k) | min | median | max | experts with 0 tokens | gptq statistics |",
             "|---|---|---|---|---|---|---|---|"]
    for layer in rows:
        counts = layer["expert_tokens"]
        ranked = sorted(counts)
        records = layer.get("passes", {}).get("gptq", {}).get("linears", {})
        kinds = Counter(r["statistics"] for r in records.values() if "statistics" in r)
        gptq = ", ".join(f"{k}: {n} Linears" for k, n in sorted(kinds.items())) or "-"
        lines.append(f"| {layer['layer']} | {len(counts)} | {sum(counts)} | {ranked[0]} | {ranked[len(ranked) // 2]} | "
                     f"{ranked[-1]} | {sum(1 for c in counts if c == 0)} | {gptq} |")
    return lines


def _fallback_md(f: dict) -> list[str]:
    """The fallback pass's decision: what fell back, why (measured sensitivities), the cutoff."""
    from .passes.fallback import unit_label
    cut = f["cutoff"]
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    lines = ["", f"## Fallback ({f['option']}): {f['linears_kept_float']} of {f['linears_quantized_before']} "
             "quantized Linears kept float", "",
             f"- sensitivity: {f['metric']}",
             f"- estimated error E: {fmt(f['error_before'])} -> {fmt(f['error_after'])}; cutoff: lowest chosen "
             f"{fmt(cut['lowest_chosen'])}, highest not chosen {fmt(cut['highest_not_chosen'])}; "
             f"pre-sweep {f.get('seconds', '-')} s", "",
             "| rank | Linears kept float | sensitivity |", "|---|---|---|"]
    lines += [f"| {u['rank']} | {unit_label(u['linears'])} | {fmt(u['sensitivity'])} |" for u in f["chosen"]]
    lines += ["", "Most sensitive units measured:", "", "| rank | Linears | sensitivity |", "|---|---|---|"]
    lines += [f"| {u['rank']} | {unit_label(u['linears'])} | {fmt(u['sensitivity'])} |" for u in f["ranking_top"]]
    return lines


def write_report(folder: Path, report: dict) -> None:
    (Path(folder) / "qcompile_report.json").write_text(json.dumps(report, indent=2) + "\n")
    # a path that is not valid UTF-8 (model, --calib) holds surrogate escapes: written as \udcXX, as stderr shows it
    (Path(folder) / "qcompile_report.md").write_text(_markdown(report), encoding="utf-8", errors="backslashreplace")
