"""Loading a Hugging Face checkpoint folder: config, lazy safetensors weights, tokenizer.

Contract:
- `open_checkpoint(path, dtype)` validates the folder (config.json, a supported architecture,
  not already quantized, readable safetensors) and returns a `Checkpoint`; every problem is a
  one-line `QCError`.
- Weights are read lazily, one tensor at a time, from the safetensors files (memory-mapped by
  safetensors): the compiler never holds every layer's float copy. Each read opens the file anew: a
  tensor in the checkpoint's dtype is a view of its own mapping, released with the tensor. (A handle kept
  open would keep every page read through it mapped, so the process's RSS would grow by every layer read
  until the compile ends.)
- `Checkpoint.tensor(name)` returns the tensor in the compile dtype and rejects NaN/Inf weights,
  naming the tensor.
- Before returning, `open_checkpoint` checks every tensor's name, dtype and shape against what
  config.json implies, and refuses what the captured graph cannot compute (checkpoint_checks.py).
  A tied embedding stored only as `lm_head.weight` is read under both names; a tied model storing both
  with different values is refused (`_check_tied_head`).
- The checkpoint's dtype is config.json's dtype / torch_dtype (`config_dtype`: transformers' key, one of
  CONFIG_DTYPES, anything else refused); without either, the float dtype of most of its bytes (safetensors
  headers), which is said on stderr.
- Nothing in the folder is run or unpickled (trust.py): a config.json / tokenizer_config.json asking for
  custom code is refused before anything is loaded, and every transformers call passes
  `trust_remote_code=False`.
Limits: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM and the MoE Qwen3MoeForCausalLM /
Qwen2MoeForCausalLM (ir/moe.py) only; no .bin checkpoints.
"""
import fnmatch
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from .checkpoint_checks import FLOAT_HEADER_DTYPES, check_checkpoint, header_dtype
from .errors import QCError, one_line
from .safetensors_open import safe_open
from .trust import check_config, check_tokenizer_files

#: architecture (config.json "architectures"[0]) -> model_type.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",   # mixture of experts: ir/moe.py
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' / 'float16' for a torch dtype."""
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype for --dtype; QCError for anything but bfloat16/float16."""
    if name not in DTYPES:
        raise QCError(f"--dtype {name!r} is not supported: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class Checkpoint:
    """A validated HF folder with lazily readable weights."""
    path: Path
    config: dict                       # config.json as read
    architecture: str
    dtype: torch.dtype                 # the dtype everything is compiled for
    source_dtype: torch.dtype          # the checkpoint's own dtype
    weight_map: dict[str, str]         # tensor name -> safetensors file name
    trust_remote_code: bool = False    # the user's --trust-remote-code (trust.py): never runs code
    #: names read from another stored tensor: {"model.embed_tokens.weight": "lm_head.weight"} when tied
    aliases: dict[str, str] = field(default_factory=dict)
    #: ir/dense_layer.DenseLayerSpec when opened with dense=True and the config is one it understands
    dense_spec: object = None

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def raw_tensor(self, name: str) -> torch.Tensor:
        """One tensor as stored (no conversion; a view of the file's own mapping, see the module docstring);
        QCError if missing or unreadable."""
        if name not in self.weight_map:
            raise QCError(f"{self.path}: tensor {name!r} missing from the safetensors files")
        try:
            with safe_open(self.path / self.weight_map[name], "pt") as f:
                return f.get_tensor(self.aliases.get(name, name))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise QCError(f"{self.path / self.weight_map[name]}: cannot read tensor {name!r} ({e})") from None

    def stored_tensors(self) -> dict[str, tuple[str, list[int]]]:
        """{stored name: (safetensors header dtype such as 'BF16', shape)} without reading any data."""
        out, by_file = {}, {}
        for name, file_name in self.weight_map.items():
            if name not in self.aliases:
                by_file.setdefault(file_name, []).append(name)
        for file_name, names in by_file.items():
            with safe_open(self.path / file_name, "pt") as f:
                for name in names:
                    info = f.get_slice(name)
                    out[name] = (info.get_dtype(), list(info.get_shape()))
        return {name: out[name] for name in self.weight_map if name in out}

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, converted to the compile dtype; QCError if missing, unreadable or not finite."""
        t = self.raw_tensor(name)
        if t.is_floating_point():
            if not all_finite(t):
                raise QCError(f"{self.path}: weight {name!r} contains NaN or Inf; expected finite weights")
            t = _convert(t, self.dtype, name)
        return t

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix` (e.g. 'model.layers.3.'), keyed without the prefix."""
        return {n[len(prefix):]: self.tensor(n) for n in sorted(self.weight_map) if n.startswith(prefix)}


#: elements per step of the whole-tensor checks below (their temporaries stay this small)
CHECK_CHUNK = 1 << 24


def row_blocks(t: torch.Tensor):
    """`t` as consecutive blocks of leading rows, about CHECK_CHUNK elements each (all of `t` if 0-d)."""
    if t.dim() == 0 or t.numel() == 0:
        yield t
        return
    step = max(1, CHECK_CHUNK // max(1, t[0].numel()))
    for start in range(0, t.shape[0], step):
        yield t[start:start + step]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t`, block by block (never a bool copy of a whole embedding). Per block, min and max are
    finite iff every element is (aminmax propagates NaN, and an Inf is an extreme): one reduction pass,
    ~6x faster than `isfinite(b).all()` on bf16 weights."""
    for b in row_blocks(t):
        if b.numel():
            lo, hi = torch.aminmax(b)
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                return False
    return True


def absmax(t: torch.Tensor) -> float:
    """max |t| (0.0 for an empty tensor), block by block."""
    return max((float(b.abs().max()) for b in row_blocks(t) if b.numel()), default=0.0)


def _convert(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if t.dtype == dtype:
        return t
    if dtype == torch.float16:
        # bf16/fp32 values beyond fp16's range would become Inf: refuse rather than corrupt.
        big = absmax(t)
        if big > torch.finfo(torch.float16).max:
            raise QCError(f"weight {name!r} holds {big:.3g}, outside float16's range (65504); "
                          "compile with --dtype bfloat16")
    return t.to(dtype)


def check_float16_range(ckpt: Checkpoint, hint: str = "compile with --dtype bfloat16") -> None:
    """Before any work, when a bf16/fp32 checkpoint is compiled as float16: every floating tensor must lie
    within float16's range (else it would become Inf). QCError naming the first tensor that does not.
    Reads each tensor once (memory-mapped, one at a time)."""
    if ckpt.dtype != torch.float16 or ckpt.source_dtype == torch.float16:
        return
    limit = torch.finfo(torch.float16).max
    for name in sorted(set(ckpt.weight_map) - set(ckpt.aliases)):
        t = ckpt.raw_tensor(name)
        if not t.is_floating_point() or t.dtype == torch.float16 or not t.numel():
            continue
        big = absmax(t)
        if big > limit:  # NaN/Inf are reported by Checkpoint.tensor when the tensor is used
            raise QCError(f"weight {name!r} holds {big:.3g}, outside float16's range (65504): it cannot be "
                          f"converted to --dtype float16; {hint}")


def _non_finite_constant(name: str):
    """json.loads' parse_constant: NaN / Infinity / -Infinity are not JSON. Python's reader takes them, but the
    artifact's config.json is written as strict JSON (artifact.write_json), so one such value failed the compile
    with a traceback after every layer was done."""
    raise ValueError(f"{name} is not a JSON number; expected finite numbers")


def read_config(path: Path) -> dict:
    """The JSON object of folder `path`'s config.json; QCError naming it when it is missing, not JSON (NaN and
    Infinity included), or not a JSON object (data only: the trust rules are trust.check_config's)."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise QCError(f"{path}: no config.json; expected a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text(), parse_constant=_non_finite_constant)
    except (ValueError, OSError) as e:
        raise QCError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise QCError(f"{cfg_path}: a JSON {type(cfg).__name__}, expected a JSON object (the model's configuration)")
    return cfg


def _architecture(cfg: dict, path: Path) -> str:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise QCError(f"{path / 'config.json'}: architectures is {archs!r}; expected a list of class names, "
                      "e.g. [\"LlamaForCausalLM\"]")
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise QCError(f"{path}: architecture {arch!r} is not supported; supported: "
                      f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


#: top-level names of a model (or OUT) folder that qcompile or transformers open: config, weights and their index,
#: tokenizer files (backends/ascend/artifact.py COPY_PATTERNS: what OUT copies of them)
READ_PATTERNS = ("config.json", "*.safetensors", "*.index.json", "tokenizer*", "special_tokens_map.json",
                 "generation_config.json", "chat_template*", "vocab.json", "merges.txt", "*.model", "added_tokens.json")


def check_special_files(path: Path) -> None:
    """QCError naming the entry when one of READ_PATTERNS in folder `path` is (or links to) a FIFO, socket or
    device: opening a FIFO blocks until a writer appears (a compile, eval or inspect hung there, and its SIGTERM
    handler never ran), a device reads forever. Folders and missing link targets are reported where they are read."""
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in READ_PATTERNS):
            continue
        try:
            mode = os.stat(entry.path).st_mode  # follows symlinks (Hugging Face caches link to blobs)
        except OSError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise QCError(f"{entry.path}: not a regular file (a FIFO, socket or device); expected a file")


#: READ_PATTERNS files checked by their own readers here (read_config, the safetensors and index readers)
_OWN_READERS = ("config.json", "*.safetensors", "*.index.json")
#: suffixes of the auxiliary files OUT copies as they are (artifact.copy_source_files) and what each must be
AUX_JSON, AUX_TEXT = (".json",), (".txt", ".jinja")


def check_aux_files(path: Path) -> None:
    """QCError naming the file when an auxiliary file of folder `path` that OUT copies (READ_PATTERNS less
    config.json / weights / index: tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    added_tokens.json, generation_config.json, chat_template.json, vocab.json; merges.txt, chat_template.jinja)
    is broken, before any work: a *.json that is not strict JSON (NaN / Infinity included) or not a JSON object,
    a *.txt / *.jinja that is not UTF-8 text. Binary files (tokenizer.model, *.model: SentencePiece protobuf)
    are left to their reader. Why refuse rather than copy: every reader fails or, worse, drops the file silently:
    - transformers tokenization_utils_base.py `PreTrainedTokenizerBase._from_pretrained` json.load()s
      tokenizer_config.json, special_tokens_map.json, added_tokens.json and tokenizer.json (encoding utf-8)
      and reads chat_template.jinja as UTF-8; BPE tokenizers json.load vocab.json and read merges.txt as UTF-8;
      processors json.load the legacy chat_template.json (transformers utils/hub.py
      LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE). A JSONDecodeError / UnicodeDecodeError there stops the engine.
    - generation_config.json: transformers generation/configuration_utils.py `GenerationConfig.from_pretrained`
      turns a JSONDecodeError into OSError, and vLLM vllm/transformers_utils/config.py
      `try_get_generation_config` catches OSError as "not found" and falls back to config.json: the checkpoint's
      EOS ids and sampling defaults are then silently lost; a JSON that is not an object is a TypeError there
      (`from_dict`), and one in qcompile's own calibration sampling (ir/capture.py float_model)."""
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        name = entry.name
        if (not any(fnmatch.fnmatchcase(name, p) for p in READ_PATTERNS)
                or any(fnmatch.fnmatchcase(name, p) for p in _OWN_READERS) or not entry.is_file()):
            continue
        suffix = Path(name).suffix
        if suffix not in AUX_JSON + AUX_TEXT:
            continue
        try:
            text = Path(entry.path).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise QCError(f"{entry.path}: not UTF-8 text ({e.reason} at byte {e.start}); the engines' tokenizer "
                          f"and config readers decode it as UTF-8") from None
        except OSError as e:
            raise QCError(f"{entry.path}: cannot be read ({one_line(e)})") from None
        if suffix in AUX_TEXT:
            continue
        try:
            content = json.loads(text, parse_constant=_non_finite_constant)
        except ValueError as e:
            raise QCError(f"{entry.path}: not valid JSON ({e}); OUT would carry it to the engines, which fail on "
                          f"it or ignore it") from None
        if not isinstance(content, dict):
            raise QCError(f"{entry.path}: a JSON {type(content).__name__}, expected a JSON object")


#: folders whose files check_folder_files passed in this process: (real path, device, inode, mtime_ns)
_CHECKED_FOLDERS: set[tuple] = set()


def check_folder_files(path: Path) -> None:
    """check_special_files and check_aux_files of folder `path`, once per folder per process: open_checkpoint
    and load_tokenizer both ask for the same model folder in one compile / eval (the scan and the JSON parse of
    tokenizer.json ran twice). The key is the folder's real path with its inode and mtime: adding, removing or
    renaming an entry (a FIFO put there, a file replaced by rename) changes the folder's mtime, so the check runs
    again; a file rewritten in place between two calls of one process is the one change not seen again."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_mtime_ns)
    if key in _CHECKED_FOLDERS:
        return
    check_special_files(path)
    check_aux_files(path)
    _CHECKED_FOLDERS.add(key)


def _check_not_quantized(cfg: dict, path: Path) -> None:
    """A compiled OUT (or any quantized checkpoint) given as the model: its int8 weights are not a float model."""
    marker = next((m for m in ("quant_model_description.json", "executable/model.json") if (path / m).exists()), None)
    key = next((k for k in ("quantize", "quantization_config", "compression_config") if cfg.get(k)), None)
    if marker or key:
        what = marker or f"config.json has {key!r}"
        raise QCError(f"{path}: already quantized ({what}); expected the float Hugging Face checkpoint")


#: config.json sizes that must be positive integers where given (a 0 or -1 layer count was reported as "tensor
#: model.layers.0... is not part of a LlamaForCausalLM with this config.json", naming the weights, not the config;
#: 0 experts as missing dense MLP weights; max_position_embeddings 0 as "expected --seq-len <= 0")
POSITIVE_SIZES = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings",
                  "moe_intermediate_size", "num_experts", "num_local_experts", "num_experts_per_tok",
                  "decoder_sparse_step")
#: config.json numbers that must be positive (and finite: read_config refuses NaN / Infinity) where given: a zero
#: or negative one made every activation NaN, reported as "pass lower failed ... activation range must be finite"
POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")


def _check_sizes(cfg: dict, path: Path) -> None:
    """QCError naming config.json and the key when one of POSITIVE_SIZES is given (not null) but is not a positive
    integer (a bool, a string, a float, 0 or negative), when one of POSITIVE_NUMBERS (top level or in
    rope_parameters / rope_scaling) is not a positive number, or when num_experts_per_tok exceeds the experts."""
    for key in POSITIVE_SIZES:
        value = cfg.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise QCError(f"{path / 'config.json'}: {key} is {value!r}; expected a positive integer")
    places = [("", cfg)] + [(f"{k}.", cfg[k]) for k in ("rope_parameters", "rope_scaling")
                            if isinstance(cfg.get(k), dict)]
    for prefix, where in places:
        for key in POSITIVE_NUMBERS:
            value = where.get(key)
            if value is not None and (type(value) not in (int, float) or value <= 0):
                raise QCError(f"{path / 'config.json'}: {prefix}{key} is {value!r}; expected a positive number")
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")  # ir/moe.num_experts reads them in this order
    top_k = cfg.get("num_experts_per_tok")
    if experts and top_k and top_k > experts:
        raise QCError(f"{path / 'config.json'}: num_experts_per_tok is {top_k}, more than the {experts} experts; "
                      "expected 1 to the number of experts")


def _weight_map(path: Path) -> dict[str, str]:
    """{tensor name: safetensors file name} of the folder: its model.safetensors.index.json's weight_map, else
    every *.safetensors file's header. QCError naming the file when the index is not a weight map, names a shard
    outside the folder or missing, or names a tensor under a shard whose header does not hold it, and when one
    tensor name is stored in two of the files read (which copy a reader takes would be arbitrary)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise QCError(f"{index}: unreadable index ({e}); expected {{'weight_map': {{...}}}}") from None
        if not isinstance(wmap, dict) or not all(isinstance(f, str) for f in wmap.values()):
            raise QCError(f"{index}: weight_map is not {{tensor name: file name}}")
        headers = {}
        for f in sorted(set(wmap.values())):
            parts = Path(f).parts
            if not f or Path(f).is_absolute() or ".." in parts or not f.endswith(".safetensors"):
                # a crafted index pulled another folder's file into the artifact: the model folder is read alone
                raise QCError(f"{index}: shard {f!r} is not a .safetensors file inside the model folder; expected "
                              "file names relative to it")
            if not (path / f).is_file():
                raise QCError(f"{index}: shard {f} is missing")
            headers[f] = _check_header(path / f)
        _check_no_duplicates(path, headers)
        for name, f in wmap.items():
            if name not in headers[f]:
                # (a lying index was read until safetensors' get_slice raised: a traceback)
                raise QCError(f"{index}: names tensor {name!r} in {f}, whose header does not hold it; expected "
                              "every weight_map entry to name the shard that stores the tensor")
        return dict(wmap)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = list(path.glob("*.bin"))
        hint = " (.bin checkpoints are not supported: convert them to safetensors)" if bins else ""
        raise QCError(f"{path}: no *.safetensors weights found{hint}")
    headers = {f.name: _check_header(f) for f in files}
    _check_no_duplicates(path, headers)
    return {name: file_name for file_name, names in headers.items() for name in names}


def _check_no_duplicates(path: Path, headers: dict[str, list[str]]) -> None:
    """QCError naming both files when a tensor name is stored in two of them ({file name: tensor names}).
    Without it, the last file of the glob silently won (or the index's choice, while vLLM-Ascend's loader, which
    iterates every tensor of the indexed shards, would take the other copy)."""
    seen: dict[str, str] = {}
    for file_name, names in headers.items():
        for name in names:
            if name in seen:
                raise QCError(f"{path}: tensor {name!r} is stored in both {seen[name]} and {file_name}; expected "
                              "each tensor in one safetensors file")
            seen[name] = file_name


def _check_header(file: Path) -> list[str]:
    try:
        with safe_open(file, "pt") as h:
            return list(h.keys())
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise QCError(f"{file}: corrupt or unreadable safetensors file ({e})") from None


#: config.json torch_dtype / dtype values of a float checkpoint: the float dtypes its safetensors may hold
#: (checkpoint_checks.FLOAT_HEADER_DTYPES); float32 / float64 checkpoints are compiled as bfloat16 (open_checkpoint)
CONFIG_DTYPES = {dtype_name(d): d for d in sorted(FLOAT_HEADER_DTYPES.values(), key=lambda d: (d.itemsize, str(d)))}


def config_dtype(cfg: dict, path: Path) -> torch.dtype | None:
    """The dtype config.json states, or None when it states none.

    The key is transformers' (configuration_utils.py `PretrainedConfig.__init__`): `dtype` when it is not null,
    else `torch_dtype`; null is the same as absent. transformers turns a string into `getattr(torch, value)`, so it
    fails on "auto", "bfloat17" or "torch.float16" and passes 7 through to break later: any value but one of
    CONFIG_DTYPES is a QCError naming config.json, the key and the accepted values (an int8 / float8 value is a
    quantized checkpoint, not one qcompile compiles). The one source of truth for the checkpoint's stated dtype."""
    key = "dtype" if cfg.get("dtype") is not None else "torch_dtype" if cfg.get("torch_dtype") is not None else None
    if key is None:
        return None
    value = cfg[key]
    if not isinstance(value, str) or value not in CONFIG_DTYPES:
        raise QCError(f"{path / 'config.json'}: {key} is {json.dumps(value)}; expected one of "
                      f"{', '.join(CONFIG_DTYPES)}, or no {key} (the dtype is then read from the safetensors headers)")
    return CONFIG_DTYPES[value]


def _source_dtype(ckpt: Checkpoint, stated: torch.dtype | None, log) -> torch.dtype:
    """The checkpoint's own dtype: `stated` (config.json's, `config_dtype`), else the float dtype of most of the
    stored bytes (safetensors headers, said on `log`), else bfloat16 (no float tensor: check_checkpoint refuses it)."""
    if stated is not None:
        return stated
    found = header_dtype(ckpt.path, ckpt.stored_tensors())
    if found is None:
        return torch.bfloat16
    log(f"note: {ckpt.path / 'config.json'} states no dtype (nor torch_dtype): the checkpoint's dtype is "
        f"{dtype_name(found)}, read from its safetensors headers")
    return found


def open_checkpoint(path: str | Path, dtype: str | None = None, trust_remote_code: bool = False,
                    dense: bool = False, log=None) -> Checkpoint:
    """Validate an HF folder and open its weights lazily. dtype None: the checkpoint's own (fp32 -> bf16).
    `trust_remote_code`: the user's --trust-remote-code (trust.py; never executes anything).
    `dense`: set `ckpt.dense_spec` to ir/dense_layer.describe(ckpt) and, when it is not None, check the
    tensors against that table without importing transformers (checkpoint_checks.check_checkpoint).
    `log`: where a dtype read from the safetensors headers is said (default: stderr)."""
    path = Path(path)
    if not path.is_dir():
        raise QCError(f"model folder {path} does not exist")
    check_folder_files(path)  # before any work: FIFOs would block, OUT copies the auxiliary files
    cfg = read_config(path)
    check_config(path / "config.json", cfg, SUPPORTED_ARCHITECTURES, trust_remote_code)
    check_tokenizer_files(path, trust_remote_code)  # before any work (load_tokenizer checks again: OUT folders)
    check_tokenizer_present(path)
    arch = _architecture(cfg, path)
    _check_not_quantized(cfg, path)
    _check_sizes(cfg, path)
    stated = config_dtype(cfg, path)  # refused before the weights are read
    ckpt = Checkpoint(path=path, config=cfg, architecture=arch, dtype=torch.bfloat16, source_dtype=torch.bfloat16,
                      weight_map=_weight_map(path), trust_remote_code=trust_remote_code)
    _alias_tied_embedding(ckpt)
    src = _source_dtype(ckpt, stated, log or (lambda msg: print(msg, file=sys.stderr)))
    ckpt.source_dtype = src
    ckpt.dtype = parse_dtype(dtype) if dtype else (src if src in DTYPES.values() else torch.bfloat16)
    if dense:
        from .ir.dense_layer import describe
        ckpt.dense_spec = describe(ckpt)
    check_checkpoint(ckpt, ckpt.dense_spec)
    _check_tied_head(ckpt)
    return ckpt


def _check_tied_head(ckpt: Checkpoint) -> None:
    """QCError when tie_word_embeddings is true but the folder stores an lm_head.weight whose values differ from
    model.embed_tokens.weight: transformers 5 then does not tie them (modeling_utils: "both are present in the
    checkpoints with different values, so we will NOT tie them") and computes with the stored lm_head, while
    vLLM skips every `lm_head.*` tensor of a tied model (llama.py / qwen2.py / qwen3.py `load_weights`,
    skip_prefixes) and projects with the embedding: which head the model was trained with cannot be told, and
    the artifact, which holds only the embedding, computes one of them. Compared block by block (same dtype: the
    bits; else the values in float32)."""
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    if not ckpt.tie_word_embeddings or embed in ckpt.aliases or not (ckpt.has(embed) and ckpt.has(head)):
        return
    a, b = ckpt.raw_tensor(embed), ckpt.raw_tensor(head)
    same = a.shape == b.shape and all(
        torch.equal(x, y) if x.dtype == y.dtype else torch.equal(x.float(), y.float())
        for x, y in zip(row_blocks(a), row_blocks(b)))
    if not same:
        raise QCError(f"{ckpt.path / 'config.json'}: tie_word_embeddings is true, but the checkpoint stores an "
                      f"{head} that differs from {embed} ({ckpt.path / ckpt.weight_map[head]}): transformers "
                      "would use the stored lm_head, vLLM-Ascend the embedding; expected tie_word_embeddings false "
                      f"(the model has its own lm_head) or no {head} tensor (it is tied)")


def _alias_tied_embedding(ckpt: Checkpoint) -> None:
    """Tied checkpoints may store the shared matrix only as lm_head.weight (transformers loads it): read it
    as model.embed_tokens.weight too."""
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    if ckpt.tie_word_embeddings and not ckpt.has(embed) and ckpt.has(head):
        ckpt.weight_map[embed] = ckpt.weight_map[head]
        ckpt.aliases[embed] = head


#: files holding a tokenizer's vocabulary (fast: tokenizer.json; SentencePiece: *.model; BPE: vocab.json +
#: merges.txt; WordPiece: vocab.txt; tiktoken): a folder with none of them has no tokenizer
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken")


def check_tokenizer_present(path: Path) -> None:
    """QCError naming the folder when it holds none of TOKENIZER_VOCAB_FILES (transformers said "Couldn't
    instantiate the backend tokenizer from one of: ", and a compile said so only after its work began)."""
    if not any(any(Path(path).glob(pattern)) for pattern in TOKENIZER_VOCAB_FILES):
        raise QCError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_VOCAB_FILES)}); expected the checkpoint's "
                      "tokenizer next to its config.json (copy them from the original model folder)")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The folder's tokenizer; QCError when it has none or asks for custom code (trust.check_tokenizer_files;
    `trust_remote_code` never runs code). A fast_tokenizer.FastTokenizer when that builds the same tokenizer
    as transformers (read from tokenizer.json without importing transformers: `qcompile run` starts in
    seconds), else transformers' AutoTokenizer (built-in classes only)."""
    from .fast_tokenizer import load_fast_tokenizer
    check_folder_files(path)
    check_tokenizer_files(path, trust_remote_code)
    if (path / "config.json").is_file():  # transformers' AutoTokenizer reads it (a compiled OUT's config.json too)
        read_config(path)
    check_tokenizer_present(path)
    fast = load_fast_tokenizer(path)
    if fast is not None:
        return fast
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a missing/broken tokenizer
        raise QCError(f"{path}: cannot load the tokenizer ({one_line(e)})") from None
