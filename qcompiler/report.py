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
        f"- excluded (kept float): {', '.join(r['exclude']) or 'none'}; lm_head and embeddings float",
        f"- calibration: {r['calibration']}",
        f"- model_quant_type: {r['model_quant_type']}",
        f"- decoder Linears by type: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}",
        f"- wall time: {r['wall_seconds']} s, peak RSS: {r['peak_rss_mib']} MiB",
        "",
        "## Seconds per pass (all layers)",
        "",
        "| pass | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in r["pass_seconds"].items()]
    if r.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in r["warnings"]]
    lines += ["", "## Layers", "", "| layer | seconds | float Linears |", "|---|---|---|"]
    for layer in r["layers"]:
        floats = [k for k, v in layer["linears"].items() if v == "FLOAT"]
        lines.append(f"| {layer['layer']} | {layer['seconds']} | {', '.join(floats) or '-'} |")
    return "\n".join(lines) + "\n"


def write_report(folder: Path, report: dict) -> None:
    (Path(folder) / "qcompile_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (Path(folder) / "qcompile_report.md").write_text(_markdown(report))
