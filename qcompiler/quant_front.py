"""`qcompile quant`: msModelSlim-compatible front (`msmodelslim quant` flags) over the pass pipeline.

    qcompile quant --model_path DIR --save_path OUT --quant_type w8a8|w8a8_dynamic|w8a16|w4a16|w4a8|w8a8c8
                   [--device cpu|npu] [--trust_remote_code [BOOL]] [--model_type NAME] [--calib_file FILE]

Contract: a user of the seed tool switches by changing the program name. `--quant_type` maps to the
equivalent pipeline (`QUANT_TYPES`) with every option at its default, and the compile is the one
`qcompile DIR --passes PIPELINE -o OUT` runs (same validation before work, same artifact and report).
Flags taken as msModelSlim spells them: --model_path, --save_path, --quant_type (default w8a8, as there),
--device (default cpu here: the compile runs on CPU; npu needs torch_npu), --trust_remote_code with an
optional true/false value, --model_type (accepted; the architecture is read from config.json), plus
--w_bit/--a_bit (checked against --quant_type) and --calib_file / --calib_samples / --seq_len / --force.
--trust_remote_code is the flag every qcompile command has (trust.py): qcompile never imports or runs
code from a model folder, so it does not enable code execution; it accepts an `auto_map` whose
architecture qcompile implements, which is then compiled with the built-in implementation. Without it
such a checkpoint is refused, as by `qcompile MODEL_DIR` (one rule, checked in loading.open_checkpoint).
Not supported: msModelSlim's --config YAML (use `qcompile --recipe`), --tags, --device_id, --debug.
"""
import argparse
import importlib.util
from pathlib import Path

from . import trust
from .errors import QCError

#: msModelSlim --quant_type -> qcompile --passes
QUANT_TYPES = {
    "w8a8": "w8a8",
    "w8a8_dynamic": "w8a8d",
    "w8a16": "w8a16",
    "w4a16": "w4a16",
    "w4a8": "w4a8d",
    "w8a8c8": "w8a8,kv8",
}
#: (weight bits, activation bits) of each quant type, for --w_bit / --a_bit
BITS = {"w8a8": (8, 8), "w8a8_dynamic": (8, 8), "w8a16": (8, 16), "w4a16": (4, 16), "w4a8": (4, 8),
        "w8a8c8": (8, 8)}

def _quant_type(text: str) -> str:
    value = text.strip().lower()
    if value not in QUANT_TYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(QUANT_TYPES)}")
    return value


def parser() -> argparse.ArgumentParser:
    mapping = ", ".join(f"{k} -> {v}" for k, v in QUANT_TYPES.items())
    p = argparse.ArgumentParser(
        prog="qcompile quant",
        description="msModelSlim-compatible front: `msmodelslim quant` flags, compiled with qcompile's passes "
                    "on CPU into the same Ascend artifact (plus executable/ and qcompile_report.*).",
        epilog=f"--quant_type maps to --passes: {mapping} (default options; for options, other schemes or "
               f"smoothing use `qcompile MODEL_DIR --passes ...`, see `qcompile passes`). Without --calib_file "
               f"the calibration text is sampled from the model itself. {trust.TRUST_NOTE}")
    p.add_argument("--model_path", required=True, help="Hugging Face model folder (or alias smollm2-135m)")
    p.add_argument("--save_path", required=True, type=Path, help="output folder (must not exist or be empty)")
    p.add_argument("--quant_type", type=_quant_type, default="w8a8", metavar="TYPE",
                   help=f"one of {', '.join(QUANT_TYPES)} (default w8a8)")
    p.add_argument("--device", default="cpu", help="cpu (default) or npu[:N] (needs torch_npu; the compile "
                   "itself runs on CPU either way)")
    trust.add_flag(p)
    p.add_argument("--model_type", default=None, help="accepted for compatibility (e.g. Qwen2.5-7B-Instruct); "
                   "qcompile reads the architecture from config.json")
    p.add_argument("--w_bit", type=int, default=None, help="optional; must match --quant_type")
    p.add_argument("--a_bit", type=int, default=None, help="optional; must match --quant_type")
    p.add_argument("--calib_file", type=Path, default=None,
                   help=".jsonl (inputs_pretokenized or text) or .txt calibration text")
    p.add_argument("--calib_samples", type=int, default=None, help="calibration sequences (default 64; 16 when sampled from the model)")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per calibration sequence (default 512; 256 when sampled)")
    p.add_argument("--force", action="store_true", help="replace --save_path if it exists and is not empty")
    return p


def pipeline_for(quant_type: str) -> str:
    """The --passes string for an msModelSlim quant type; QCError if a pass it needs is not available."""
    from .passes import REGISTRY
    passes = QUANT_TYPES[quant_type]
    missing = [n for n in passes.split(",") if n not in REGISTRY]
    if missing:
        raise QCError(f"--quant_type {quant_type} needs the {', '.join(missing)} pass (int8 KV cache), which this "
                      f"qcompile does not have; use --quant_type w8a8 for the weights and activations alone")
    return passes


def check_bits(quant_type: str, w_bit: int | None, a_bit: int | None) -> None:
    w, a = BITS[quant_type]
    for flag, given, expected in (("--w_bit", w_bit, w), ("--a_bit", a_bit, a)):
        if given is not None and given != expected:
            raise QCError(f"{flag} {given} contradicts --quant_type {quant_type} ({flag} {expected}); "
                          f"drop {flag} or change --quant_type")


def check_device(device: str) -> None:
    kind = device.split(":", 1)[0].strip().lower()
    if kind == "cpu" and ":" not in device:
        return
    if kind != "npu" or (":" in device and not device.split(":", 1)[1].isdigit()):
        raise QCError(f"--device {device!r} is not supported; expected cpu or npu[:N]")
    if importlib.util.find_spec("torch_npu") is None:
        raise QCError(f"--device {device} needs torch_npu, which is not installed; qcompile compiles on CPU: "
                      f"use --device cpu (the default), the artifact is the same")


def run(argv) -> dict:
    """Parse `qcompile quant` arguments, check them, and compile; returns the compile report."""
    from .config import CompileOptions, parse_passes
    from .driver import compile_model
    from .model_zoo import resolve_model_dir
    a = parser().parse_args(argv)
    check_bits(a.quant_type, a.w_bit, a.a_bit)
    check_device(a.device)
    passes = pipeline_for(a.quant_type)
    if a.calib_file is not None and not a.calib_file.is_file():
        raise QCError(f"--calib_file {a.calib_file} does not exist")
    model_dir = resolve_model_dir(a.model_path)
    force = a.force
    if a.save_path.is_dir() and not any(a.save_path.iterdir()):
        force = True  # msModelSlim writes into an existing empty folder
    elif a.save_path.exists() and not a.force:
        raise QCError(f"--save_path {a.save_path} already exists and is not empty; choose another --save_path "
                      f"or pass --force to replace it")
    opts = CompileOptions(model=str(model_dir), out=a.save_path, passes=tuple(parse_passes(passes)),
                          calib=a.calib_file, calib_samples=a.calib_samples, seq_len=a.seq_len, force=force,
                          trust_remote_code=a.trust_remote_code)
    report = compile_model(opts)
    print(f"wrote {a.save_path}: --quant_type {a.quant_type} = --passes {passes} -> {report['model_quant_type']} "
          f"({report['dtype']}), {report['wall_seconds']} s; report: {a.save_path / 'qcompile_report.md'}")
    return report
