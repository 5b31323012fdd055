"""`qcompile quant`: msModelSlim's command lines, unchanged, compiled by qcompile's passes.

    qcompile quant --model_path DIR --save_path OUT [--quant_type T | --config_path FILE.yaml]   (one-click)
    qcompile quant --model_path DIR --save_directory OUT --w_bit 8 --a_bit 8 --anti_method m1 ...  (scripts)

Contract: a user of msModelSlim switches by changing the program name (`msmodelslim quant ARGS`, or
`python3 quant_llama.py ARGS` / `python3 quant_qwen.py ARGS`, become `qcompile quant ARGS`). Three modes,
each producing a FrontPlan (msmodelslim_plan.py) that becomes the same CompileOptions `qcompile MODEL
--passes ...` builds, so validation before work, artifact and report are the main command's:
- one-click `--quant_type T` (msmodelslim/cli/naive_quantization/__main__.py flags: --model_path, --save_path,
  --device, --model_type, --quant_type, --config_path, --trust_remote_code): T's best-practice recipe
  (recipes.py, measured per architecture; printed with its source). Neither --quant_type nor --config_path:
  w8a8, as msModelSlim (application.py DEFAULT_QUANT_TYPE).
- `--config_path FILE.yaml`: msModelSlim's practice config (msmodelslim_yaml.py). Given with --quant_type,
  the config wins, as msModelSlim's `get_best_practice` does (the quant type is reported as ignored).
- traditional flags (any of quant_llama.py / quant_qwen.py's flags, or --save_directory): the script's own
  logic (msmodelslim_flags.py). --w_bit/--a_bit together with an explicit --quant_type are only checked
  against it.
qcompile's additions: --calib_file (one-click; the scripts' own flag), --calib_samples, --seq_len, --force.
--device / --device_type npu[:N[,M]] is accepted and the compile runs on CPU (the artifact does not depend on
the device). Without calibration text the calibration is sampled from the float model, which must fit in
memory: the driver checks the estimate before any work (memory.py; exit 2 asking for --calib_file).
--trust_remote_code is the flag every qcompile command has (trust.py, one rule): qcompile never imports or
runs code from a model folder, so it does not enable code execution; it accepts an `auto_map` whose architecture
qcompile implements, which is then compiled with the built-in implementation. Without it such a checkpoint is
refused, as by `qcompile MODEL_DIR` (trust.check_config, run on config.json before the front reads it).
Every bad or unsupported input is one exit-2 line (argparse errors included: `QuantArgumentParser.error`).
"""
import argparse
import importlib.util
import re
import sys
from pathlib import Path

from . import trust
from .errors import QCError, require_file
from .msmodelslim_flags import DEFAULTS as SCRIPT_DEFAULTS
from .msmodelslim_flags import FLAG_HELP, FLAG_MAP
from .recipes import QUANT_TYPE_RECIPES, check_quant_type

#: one-click flags besides the shared ones; the traditional flags are SCRIPT_DEFAULTS' keys
SCRIPT_FLAGS = tuple(k for k in SCRIPT_DEFAULTS if k not in ("calib_file", "model_type"))
LIST_FLAGS = ("disable_names", "calib_texts")
STORE_TRUE_FLAGS = ("mindie_format",)


class QuantArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (QCError), naming a stray value after an empty `--flag=`."""

    def error(self, message):
        hint = ""
        m = re.search(r"unrecognized arguments: (.*)", message)
        if m and self._empty_eq:
            hint = (f" ({' '.join(self._empty_eq)} has an empty value; write the flag and its value separated by a "
                    f"space or joined by '=' without a space)")
        raise QCError(f"qcompile quant: {message}{hint}")

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        self._empty_eq = [a for a in args if a.startswith("--") and a.endswith("=")]
        parsed = super().parse_args(args, namespace)
        # `--save_path ""` was the current folder and `--quant_type ""` the default: an empty value is a mistake
        empty = [a[:-1] for a in self._empty_eq] + [a for a, b in zip(args, args[1:])
                                                     if a.startswith("--") and "=" not in a and not b.strip()]
        if empty:
            raise QCError(f"qcompile quant: {empty[0]} has an empty value; expected a value after it")
        return parsed


def parser() -> QuantArgumentParser:
    types = "|".join(QUANT_TYPE_RECIPES)
    table = "; ".join(f"{q}: {r.llama.describe()}" + (f" (qwen: {r.qwen.describe()})" if r.qwen != r.llama else "")
                      for q, r in QUANT_TYPE_RECIPES.items())
    flags = "; ".join(f"{k} -> {v}" for k, v in FLAG_MAP.items())
    p = QuantArgumentParser(
        prog="qcompile quant",
        description="msModelSlim's command lines compiled by qcompile on CPU into the same Ascend artifact (plus "
                    "executable/ and qcompile_report.*): one-click `msmodelslim quant` flags (--quant_type, "
                    "--config_path) or the traditional quant_llama.py / quant_qwen.py flags.",
        epilog=f"--quant_type best practice (measured, BENCHMARKS.md): {table}. Traditional flags: {flags}. "
               f"Without --calib_file the calibration text is sampled from the model itself. {trust.TRUST_NOTE}")
    one = p.add_argument_group("one-click (msmodelslim quant)")
    one.add_argument("--model_path", required=True, help="Hugging Face model folder (or alias smollm2-135m)")
    one.add_argument("--save_path", type=Path, default=None, help="output folder (must not exist or be empty)")
    one.add_argument("--quant_type", default=None, metavar="TYPE", help=f"{types} (default w8a8)")
    one.add_argument("--config_path", type=Path, default=None, help="msModelSlim practice YAML (modelslim_v1 / v0)")
    one.add_argument("--device", default=None, help="cpu or npu[:N[,M...]]: the compile runs on CPU either way")
    trust.add_flag(one)
    one.add_argument("--model_type", default=None, help="one-click: a name such as Qwen2.5-7B-Instruct (reported; the "
                     "architecture is read from config.json); scripts: llama2, llama3, ..., qwen2, qwen3")
    trad = p.add_argument_group("traditional scripts (quant_llama.py / quant_qwen.py)")
    trad.add_argument("--save_directory", type=Path, default=None, help="output folder (the scripts' name)")
    for flag in SCRIPT_FLAGS:
        help_text = FLAG_HELP[flag]
        if flag in LIST_FLAGS:
            trad.add_argument(f"--{flag}", nargs="+", default=None, metavar="TEXT", help=help_text)
        elif flag in STORE_TRUE_FLAGS:
            trad.add_argument(f"--{flag}", action="store_const", const=True, default=None, help=help_text)
        else:
            default = SCRIPT_DEFAULTS[flag]
            trad.add_argument(f"--{flag}", default=None, metavar="VALUE",
                              help=help_text + ("" if default in (None, "") else f" [script default {default}]"))
    own = p.add_argument_group("qcompile")
    own.add_argument("--calib_file", type=Path, default=None,
                     help=".jsonl (inputs_pretokenized or text) or .txt calibration text")
    own.add_argument("--calib_samples", type=int, default=None, help="calibration sequences (default 64; 16 when "
                     "sampled from the model)")
    own.add_argument("--seq_len", type=int, default=None, help="tokens per calibration sequence (default 512; "
                     "256 when sampled)")
    own.add_argument("--force", action="store_true", help="replace the output folder if it exists and is not empty")
    return p


def check_device(device: str | None, flag: str = "--device") -> str | None:
    """cpu, npu, npu:N or npu:N,M,...; returns a note for npu (the compile itself runs on CPU)."""
    if device is None or device.strip().lower() == "cpu":
        return None
    if not re.fullmatch(r"npu(:\d+(,\d+)*)?", device.strip().lower()):
        raise QCError(f"{flag} {device!r} is not supported; expected cpu, npu or npu:N[,M...]")
    have = importlib.util.find_spec("torch_npu") is not None
    return (f"{flag} {device}: qcompile compiles on CPU (the artifact is the same)"
            + ("" if have else "; torch_npu is not installed"))


def _read_config(model_dir: Path, trust_remote_code: bool) -> dict:
    """config.json as data, after the one trust rule (trust.check_config) so custom code is refused first."""
    from .loading import SUPPORTED_ARCHITECTURES, read_config
    cfg = read_config(model_dir)
    trust.check_config(model_dir / "config.json", cfg, SUPPORTED_ARCHITECTURES, trust_remote_code)
    if "num_hidden_layers" not in cfg:
        raise QCError(f"{model_dir}/config.json: not a decoder LLM config (no num_hidden_layers)")
    return cfg


def script_settings(a: argparse.Namespace) -> dict:
    """The traditional flags the user gave (flag -> raw value; --model_type is added in script mode)."""
    return {k: getattr(a, k) for k in SCRIPT_FLAGS if getattr(a, k) is not None}


def choose_mode(a: argparse.Namespace) -> str:
    """'config', 'script' or 'quant_type' (module docstring); QCError for a mix msModelSlim cannot run."""
    given = script_settings(a)
    bits_only = set(given) <= {"w_bit", "a_bit"}
    if a.config_path is not None:
        if given:
            raise QCError(f"--config_path cannot be combined with the traditional script flags "
                          f"{', '.join('--' + k for k in given)}")
        return "config"
    if a.save_directory is not None or (given and not (bits_only and a.quant_type is not None)):
        if a.quant_type is not None:
            raise QCError(f"--quant_type (one-click) cannot be combined with the traditional script flags "
                          f"{', '.join('--' + k for k in given) or '--save_directory'} (msModelSlim runs them as "
                          f"different programs)")
        return "script"
    return "quant_type"


def check_bits(quant_type: str, w_bit, a_bit) -> None:
    row = check_quant_type(quant_type)
    for flag, given, expected in (("--w_bit", w_bit, row.w_bit), ("--a_bit", a_bit, row.a_bit)):
        if given is not None and str(given) != str(expected):
            raise QCError(f"{flag} {given} contradicts --quant_type {quant_type} ({flag} {expected}); "
                          f"drop {flag} or change --quant_type")


def plan_for(a: argparse.Namespace, model_dir: Path):
    """The FrontPlan of the parsed arguments (mode per `choose_mode`)."""
    from .msmodelslim_plan import FrontPlan
    from .config import parse_passes
    from .recipes import MOE_MODEL_TYPES, arch_family, recipe_for
    config = _read_config(model_dir, a.trust_remote_code)
    model_type = str(config.get("model_type", ""))
    mode = choose_mode(a)
    if mode == "config":
        from .msmodelslim_yaml import plan_from_config
        plan = plan_from_config(a.config_path, config, model_type, calib_given=a.calib_file is not None)
        if a.quant_type is not None:
            plan.notes.append(f"--quant_type {a.quant_type} ignored: --config_path wins (as in msModelSlim)")
        return plan
    if mode == "script":
        from .msmodelslim_flags import plan_from_settings
        settings = script_settings(a)
        if a.model_type is not None:
            settings["model_type"] = a.model_type
        return plan_from_settings(settings, config, model_type, lambda k: f"--{k}", "qcompile quant")
    quant_type = (a.quant_type or "w8a8").strip().lower()
    check_bits(quant_type, a.w_bit, a.a_bit)
    recipe = recipe_for(quant_type, model_type)
    family = arch_family(model_type)
    why = QUANT_TYPE_RECIPES[quant_type].why
    if model_type in MOE_MODEL_TYPES:
        family, why = model_type, "MOE_RECIPES: the dynamic pipelines mixture-of-experts compiles support"
    plan = FrontPlan(source=f"best practice of --quant_type {quant_type} for {family} models (qcompiler/recipes.py: "
                            f"{why})",
                     passes=parse_passes(recipe.passes), target=recipe.target, dtype=recipe.dtype,
                     exclude=list(recipe.exclude), policy="auto")
    if a.model_type:
        plan.notes.append(f"--model_type {a.model_type}: the architecture is read from config.json ({model_type})")
    return plan


def compile_options(plan, model_dir: Path, out: Path, a: argparse.Namespace, force: bool,
                    out_option: str = "--save_path"):
    """The CompileOptions `qcompile MODEL --passes ...` would build for this plan; its messages name the options as
    given here (`out_option`: --save_path or --save_directory; the calibration file: --calib_file, or the YAML's
    dataset field when that chose it)."""
    from .config import CompileOptions
    calib = a.calib_file if a.calib_file is not None else plan.calib
    if calib is not None:
        require_file("--calib_file", calib)
    return CompileOptions(model=str(model_dir), out=out, passes=tuple(plan.passes), target=plan.target,
                          dtype=plan.dtype, calib=Path(calib) if calib is not None else None,
                          calib_texts=tuple(plan.calib_texts) if plan.calib_texts and calib is None else None,
                          calib_samples=a.calib_samples, seq_len=a.seq_len, exclude=tuple(plan.exclude),
                          force=force, policy=plan.policy, part_file_size=plan.part_file_size,
                          trust_remote_code=a.trust_remote_code,
                          source=f"qcompile quant: {plan.source}", notes=tuple(plan.notes), out_option=out_option,
                          calib_option="--calib_file" if a.calib_file is not None or not getattr(a, "config_path", None)
                          else f"--config_path {a.config_path} dataset")


def run(argv) -> dict:
    """Parse `qcompile quant` arguments, map them, check them, and compile; returns the compile report."""
    a = parser().parse_args(argv)  # before the imports (torch): --help and a bad flag answer at once
    from .driver import compile_model
    from .model_zoo import resolve_model_dir
    from .outdir import symlink_on_path
    out = a.save_path if a.save_path is not None else a.save_directory
    if out is None:
        raise QCError("qcompile quant: give --save_path (one-click) or --save_directory (scripts)")
    if a.save_path is not None and a.save_directory is not None:
        raise QCError("qcompile quant: give --save_path or --save_directory, not both")
    notes = [n for n in (check_device(a.device), check_device(a.device_type, "--device_type")) if n]
    if a.calib_file is not None:
        require_file("--calib_file", a.calib_file)
    model_dir = resolve_model_dir(a.model_path)
    plan = plan_for(a, model_dir)
    force = a.force
    option = '--save_path' if a.save_path is not None else '--save_directory'
    why = symlink_on_path(out)
    if why:  # rule 1 (outdir.py): before the empty-folder rule below looks through the link
        raise QCError(f"{option} {out} {why}: give the folder itself; choose another one")
    if out.is_dir() and not any(out.iterdir()):
        force = True  # msModelSlim writes into an existing empty folder
    elif out.exists() and not a.force:
        raise QCError(f"{option} {out} already exists and "
                      f"is not empty; choose another one or pass --force to replace it")
    plan.notes[:0] = notes
    opts = compile_options(plan, model_dir, out, a, force, out_option=option)
    for line in [f"qcompile quant: {plan.source}", f"  = qcompile {a.model_path} {plan.describe()}"] + \
            [f"  note: {n}" for n in plan.notes]:
        print(line, file=sys.stderr)
    report = compile_model(opts)
    print(f"wrote {out}: {report['model_quant_type']} ({report['dtype']}) from {plan.describe()}, "
          f"{report['wall_seconds']} s; report: {out / 'qcompile_report.md'}")
    return report
