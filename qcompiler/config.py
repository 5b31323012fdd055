"""Compile configuration: --passes strings, YAML recipes, and the frozen options of one compile.

Pass syntax (CLI and recipe share names and values):
    --passes smooth:alpha=0.8,w4a16:group=128,kv8
    (comma between passes, colon before each key=value option)
Recipe (YAML, `--recipe FILE`); every key optional, command-line options win over the recipe:
    passes:                    # a list (strings or {name: {option: value}}) or one --passes string
      - smooth: {alpha: 0.8}
      - w8a8
    target: ascend910b
    dtype: bfloat16
    exclude: ['mlp\\.down_proj']
    calib_samples: 64
    seq_len: 512
    policy: auto               # auto | qwen | none (qcompiler/policy.py)
    engine: any                # any | vllm-ascend | mindie (qcompiler/engine_check.py)
"""
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import QCError, require_file

PassSpec = tuple[str, dict]   # (pass name, {option: value})

RECIPE_KEYS = {"passes", "target", "dtype", "exclude", "calib", "calib_samples", "seq_len", "policy", "engine"}


def parse_passes(text: str) -> list[PassSpec]:
    """'smooth:alpha=0.8,w8a8' -> [('smooth', {'alpha': '0.8'}), ('w8a8', {})]."""
    specs = []
    for chunk in [c.strip() for c in text.split(",")]:
        if not chunk:
            raise QCError(f"--passes {text!r}: empty pass name (expected name[:key=value...],name2,...)")
        name, *opts = chunk.split(":")
        options = {}
        for opt in opts:
            key, sep, value = opt.partition("=")
            if not sep or not key:
                raise QCError(f"--passes {text!r}: option {opt!r} of pass {name} must be key=value")
            options[key.strip()] = value.strip()
        specs.append((name.strip(), options))
    return specs


def _recipe_passes(value, path) -> list[PassSpec]:
    if isinstance(value, str):
        return parse_passes(value)
    if not isinstance(value, list):
        raise QCError(f"{path}: 'passes' must be a list or a string like 'smooth,w8a8'")
    specs = []
    for item in value:
        if isinstance(item, str):
            specs.extend(parse_passes(item))
        elif isinstance(item, dict) and len(item) == 1:
            (name, opts), = item.items()
            if opts is not None and not isinstance(opts, dict):
                raise QCError(f"{path}: options of pass {name} must be a mapping")
            specs.append((str(name), dict(opts or {})))
        else:
            raise QCError(f"{path}: each pass is a name or {{name: {{option: value}}}}, got {item!r}")
    return specs


def load_recipe(path: str | Path) -> dict:
    """Read a YAML recipe into a dict of compile options (passes parsed to PassSpecs)."""
    import yaml
    path = Path(path)
    require_file("recipe", path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise QCError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise QCError(f"{path}: a recipe is a mapping with keys {', '.join(sorted(RECIPE_KEYS))}")
    unknown = set(data) - RECIPE_KEYS
    if unknown:
        raise QCError(f"{path}: unknown recipe keys {sorted(unknown)}; valid: {', '.join(sorted(RECIPE_KEYS))}")
    empty = [k for k in ("passes", "target", "dtype", "calib", "policy", "engine")
             if k in data and (data[k] is None or data[k] == [] or (isinstance(data[k], str) and not data[k].strip()))]
    if empty:  # `passes: []` compiled the default w8a8, `calib: ""` sampled from the model: a mistake, said so
        raise QCError(f"{path}: '{empty[0]}' is empty; give it a value or leave the key out")
    if "passes" in data:
        data["passes"] = _recipe_passes(data["passes"], path)
    if "exclude" in data:
        excl = data["exclude"]
        excl = [excl] if isinstance(excl, str) else excl
        if not isinstance(excl, list) or not all(isinstance(e, str) for e in excl):
            raise QCError(f"{path}: 'exclude' must be a regex string or a list of them, got {data['exclude']!r}")
        data["exclude"] = excl
    for key in ("calib_samples", "seq_len"):
        if key in data and (not isinstance(data[key], int) or isinstance(data[key], bool)):
            raise QCError(f"{path}: '{key}' must be an integer, got {data[key]!r}")
    for key in ("target", "dtype", "calib", "policy", "engine"):
        if key in data and not isinstance(data[key], str):
            raise QCError(f"{path}: '{key}' must be a string, got {data[key]!r}")
    return data


#: (sequences, tokens) of calibration when not given: from a file, and when sampled from the model itself.
#: Sampling runs the float model token by token on CPU (minutes for 16 x 256 on a 135M model), hence smaller.
FILE_CALIB_DEFAULT = (64, 512)
SAMPLED_CALIB_DEFAULT = (16, 256)


@dataclass(frozen=True)
class CompileOptions:
    model: str
    out: Path
    passes: tuple = (("w8a8", {}),)
    target: str = "ascend910b"
    dtype: str | None = None
    calib: Path | None = None
    calib_samples: int | None = None   # None: 64, or 16 when sampled from the model (see calib_shape)
    seq_len: int | None = None         # None: 512, or 256 when sampled from the model
    exclude: tuple[str, ...] = ()
    dump: Path | None = None
    dump_layers: tuple[int, ...] | None = None   # --dump-layers: only these layers (None: all)
    dump_passes: tuple[str, ...] | None = None   # --dump-passes: only these passes (`capture`: the captured graph)
    batch_size: int | None = None     # None: model.auto_batch_size(seq_len)
    force: bool = False
    recipe_path: Path | None = None    # the --recipe file (an input OUT must not contain)
    recipe: dict = field(default_factory=dict)
    policy: str = "auto"               # built-in float Linears (policy.py): auto | qwen | none
    trust_remote_code: bool = False    # --trust-remote-code (trust.py): accept auto_map; never runs code
    engine: str = "any"                # engines that must load the artifact (engine_check.py)
    calib_texts: tuple[str, ...] | None = None  # calibration text given inline (msModelSlim calib_texts)
    part_file_size: int | None = None  # GiB per weight shard (None: the writer's 5 GiB), 0: one file
    source: str | None = None          # how the options were chosen (qcompile quant: recipe / config / flags)
    notes: tuple[str, ...] = ()        # what a front decided on the way (reported)
    resume: bool = False               # --resume: continue a killed compile of OUT (resume.py); stay resumable
    # the options as the front spelled them, for messages (`qcompile quant`: --save_path / --save_directory,
    # --calib_file); outdir.OutputFolder names them
    out_option: str = "-o"
    calib_option: str = "--calib"

    def calib_shape(self) -> tuple[int, int]:
        """(sequences, tokens per sequence) of calibration, defaults resolved."""
        given = self.calib is not None or bool(self.calib_texts)
        n, length = FILE_CALIB_DEFAULT if given else SAMPLED_CALIB_DEFAULT
        return (self.calib_samples or n, self.seq_len or length)

    def __post_init__(self):
        if self.calib_samples is not None and self.calib_samples < 1:
            raise QCError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.seq_len is not None and self.seq_len < 2:
            raise QCError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.part_file_size is not None and (isinstance(self.part_file_size, bool) or self.part_file_size < 0):
            raise QCError(f"part_file_size must be an integer >= 0 (GiB per weight file, 0 = one file), got "
                          f"{self.part_file_size!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise QCError(f"--batch-size must be >= 1, got {self.batch_size}")
        from .policy import check_policy
        check_policy(self.policy)
        from .engine_check import check_engine_choice
        check_engine_choice(self.engine)
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as e:
                raise QCError(f"--exclude {pattern!r} is not a valid regular expression ({e})") from None
