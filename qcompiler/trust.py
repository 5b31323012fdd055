"""What qcompile trusts: a model folder and an OUT folder are data, never code.

Contract (one rule for every command: compile, `qcompile quant`, eval, run, inspect):
- qcompile reads only JSON (config.json, tokenizer files, model.json, graph files) and safetensors from
  a model folder or an OUT folder. It never imports a folder's `*.py`, never unpickles (`*.bin`, `*.pt`,
  `*.pt2`, `*.pkl` are not read), and passes `trust_remote_code=False` to every transformers call
  (config, tokenizer, model) so transformers' "run custom code? [y/N]" prompt is unreachable.
- Before anything is loaded, a folder that asks for custom code is refused with one line naming the file:
  `auto_map` in config.json or tokenizer_config.json, or a config.json `model_type` transformers has no
  built-in configuration class for (a custom model_type needs custom code to be read at all). A known
  model_type that builds another class than `architectures` says is checkpoint_checks.py's refusal.
- `--trust-remote-code` (spelled `--trust_remote_code` too; msModelSlim's flag) never executes anything.
  It accepts an `auto_map` whose architecture qcompile implements: the model (and its tokenizer) is then
  computed by qcompile's built-in implementation of that architecture and transformers' built-in
  tokenizer classes, as if `auto_map` were absent. OUT folders made from such a checkpoint carry no
  `auto_map` (artifact.py drops it) and no `*.py`. A custom model_type, or an `auto_map` on an
  architecture qcompile does not implement, is refused with or without the flag.
Why the flag exists at all: fine-tunes often keep an `auto_map` to code identical to the built-in
architecture; a user who checked that can say so. Without the flag the refusal is the safe default,
because the custom code may compute something else than the built-in architecture of the same name.
"""
import argparse
import json
from pathlib import Path

from .errors import QCError

FLAG = "--trust-remote-code"
FLAG_ALIASES = (FLAG, "--trust_remote_code")
FLAG_HELP = ("accept a checkpoint whose config.json / tokenizer_config.json has auto_map (custom code) when "
             "qcompile implements its architecture: it is then computed by qcompile's built-in implementation. "
             "qcompile never executes code from a model folder or OUT, with or without this flag (see README, "
             "'What qcompile trusts'). Optional value true/false; default false")

#: One line for --help epilogs.
TRUST_NOTE = ("trust: model folders and OUT folders are read as data only (JSON + safetensors): no *.py is "
              "imported, nothing is unpickled; custom code (auto_map, custom model_type) is refused, see "
              f"{FLAG}.")


def parse_bool(text: str) -> bool:
    """argparse type for an optional true/false value (msModelSlim's `--trust_remote_code True`)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_flag(parser: argparse.ArgumentParser) -> None:
    """Add the one trust flag (both spellings, optional BOOL) to a command's parser."""
    parser.add_argument(*FLAG_ALIASES, dest="trust_remote_code", type=parse_bool, nargs="?", const=True,
                        default=False, metavar="BOOL", help=FLAG_HELP)


def _json(path: Path):
    """A JSON file's content, or None when absent or unreadable (the loaders report those themselves)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _auto_map_names(auto_map) -> str:
    names = sorted(auto_map) if isinstance(auto_map, dict) else [str(auto_map)]
    return ", ".join(map(str, names))


def check_config(config_path: Path, config: dict, supported: dict[str, str], allow_auto_map: bool) -> None:
    """Refuse a config.json that needs custom code (module docstring). `supported`: the architectures
    qcompile implements (loading.SUPPORTED_ARCHITECTURES). QCError naming config.json."""
    if not isinstance(config, dict):
        return  # the loader reports a config.json that is not an object
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    auto_map = config.get("auto_map")
    if auto_map:
        if arch not in supported:
            raise QCError(f"{config_path}: architecture {arch!r} comes with custom code (auto_map) and is not "
                          f"implemented by qcompile, which never executes model code; supported: "
                          f"{', '.join(supported)} (dense only)")
        if not allow_auto_map:
            raise QCError(f"{config_path}: auto_map names custom code ({_auto_map_names(auto_map)}), which "
                          f"qcompile never runs; pass {FLAG} to use qcompile's built-in {arch} implementation "
                          f"instead")
    model_type = config.get("model_type")
    if arch not in supported or model_type in supported.values():
        return  # the supported model types are transformers' own: no lookup (its import costs ~0.5 s of a run)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise QCError(f"{config_path}: model_type {model_type!r} is not a type transformers knows (the built-in "
                      f"{arch} is {supported[arch]!r}): a custom model_type needs custom code, which qcompile "
                      f"never runs (with or without {FLAG})")


def check_tokenizer_files(folder: Path, allow_auto_map: bool) -> None:
    """Refuse a tokenizer that asks for custom code: `auto_map` in tokenizer_config.json, or (read by
    transformers' AutoTokenizer too) in config.json. QCError naming the file."""
    for name in ("tokenizer_config.json", "config.json"):
        content = _json(Path(folder) / name)
        auto_map = content.get("auto_map") if isinstance(content, dict) else None
        if auto_map and not allow_auto_map:
            raise QCError(f"{Path(folder) / name}: auto_map names custom code ({_auto_map_names(auto_map)}), "
                          f"which qcompile never runs; pass {FLAG} to load the tokenizer with transformers' "
                          f"built-in classes instead")
