"""Random-weight Hugging Face checkpoints of real model shapes, built tensor by tensor (bounded memory).

Memory benchmarks need checkpoints with the widths of 7B-72B models and with many layers; downloading them
is not an option and materializing them (`model.save_pretrained`) would need the whole model in memory.
This module writes the same folder layout `save_pretrained` writes — `config.json` (transformers'
own config class), `model-0000i-of-0000N.safetensors` shards with `model.safetensors.index.json` (or one
`model.safetensors`), a small byte-level BPE tokenizer (`tokenizer.json`, `tokenizer_config.json`) — and
draws every tensor in row blocks straight into its shard (`qcompiler.safetensors_stream.StreamingFile`):
at most safetensors_stream.CHUNK_BYTES of float32 draws plus their converted copy exist at any time, whatever the model size.

Shapes come from a preset table (`PRESETS`, `--list`): a model_type and config.json fields. Tensor names
and shapes are those of the transformers model for that config, read from the model built on the meta
device (no memory): so an architecture transformers has (e.g. a mixture-of-experts `qwen3_moe` preset,
added as one table row) needs no code here. A preset name takes a depth suffix, `-depthN` or `-layersN`
(same meaning: N decoder layers), e.g. `smollm2-135m-depth120`, `qwen2.5-72b-layers2`.

Weights (deterministic: each tensor drawn from its own generator seeded by (seed, name), in fixed row
blocks, so one tensor can be re-drawn alone and the same call gives the same bytes): matrices
N(0, 1/fan_in) so every Linear keeps its input's scale (embeddings and lm_head alike: embedded tokens
have RMS 1/sqrt(hidden), like trained embeddings' ~0.02), the residual-writing projections (`o_proj`,
`down_proj`) further scaled by 1/sqrt(2 x layers) (GPT-2's initialisation) so the residual stream stays
O(1) at any depth; norm weights 1 + N(0, 0.02^2); biases (Qwen2's q/k/v) N(0, 0.02^2).

    python3 bench/synthetic_checkpoint.py --list
    python3 bench/synthetic_checkpoint.py qwen2.5-7b-layers2 -o ~/.cache/qc-bench/synthetic/qwen2.5-7b-layers2

Refused (one line, exit 2): an unknown preset, an existing output folder, too little free disk. The
folder is built under a temporary name beside the target and renamed when complete.
Shape facts: SmolLM2-135M from the model's own config.json (../shared/models); Qwen2.5-7B-Instruct and
Qwen2.5-72B-Instruct from their published config.json files (hidden 3584 / 8192, intermediate 18944 /
29568, 28 / 64 query heads, 4 / 8 kv heads, q/k/v bias, untied 152064-token vocabulary, rope_theta 1e6,
rms_norm_eps 1e-6). Qwen3-30B-A3B (issue 17): hidden 2048, 128 experts of moe_intermediate 768, top-8, 32 query /
4 kv heads of 128, 48 layers, untied 151936-token vocabulary; stored per expert (`mlp.experts.{e}.gate_proj` ...),
as its checkpoint and transformers' save_pretrained store it (qcompiler/ir/moe.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import this checkout's qcompiler
    sys.path.insert(0, str(ROOT))

from qcompiler import safetensors_stream  # noqa: E402
from qcompiler.safetensors_stream import Entry, StreamingFile  # noqa: E402

#: metadata save_pretrained puts into checkpoint shards
SHARD_METADATA = {"format": "pt"}
DEFAULT_SHARD_BYTES = 4 * 2**30
#: BPE vocabulary of the synthetic tokenizer (ids 0..TOKENIZER_VOCAB-1 must be embedding rows)
TOKENIZER_VOCAB = 1024
#: what the tokenizer is trained on (any text works: calibration text is byte-level encoded)
TOKENIZER_TEXT = (
    "Quantization maps floating point weights and activations to small integers. A calibration set gives "
    "the ranges of the activations of every layer; the compiler runs it layer by layer and keeps only one "
    "decoder layer in memory. The quick brown fox jumps over the lazy dog, 0123456789 times. "
    "Language models read text as tokens: words, pieces of words, numbers and punctuation marks. ") * 8


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model shape: transformers model_type + config.json fields (num_hidden_layers = the real depth)."""
    model_type: str
    config: dict
    source: str  # where the shape comes from

    @property
    def full_layers(self) -> int:
        return int(self.config["num_hidden_layers"])


_QWEN25 = dict(architectures=["Qwen2ForCausalLM"], hidden_act="silu", vocab_size=152064,
               max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
               use_sliding_window=False, sliding_window=None)

#: name -> shape. Add a row for a new shape (a MoE model: its model_type and config fields).
PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset("llama", dict(
        architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, num_hidden_layers=30, vocab_size=49152, hidden_act="silu",
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
        "SmolLM2-135M-Instruct config.json (../shared/models/get_models.py)"),
    "qwen2.5-7b": Preset("qwen2", dict(
        _QWEN25, hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
        num_hidden_layers=28, max_window_layers=28), "Qwen2.5-7B-Instruct config.json"),
    "qwen2.5-72b": Preset("qwen2", dict(
        _QWEN25, hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_key_value_heads=8,
        num_hidden_layers=80, max_window_layers=80), "Qwen2.5-72B-Instruct config.json"),
    "qwen3-30b-a3b": Preset("qwen3_moe", dict(
        architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_hidden_layers=48, vocab_size=151936,
        hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False, sliding_window=None), "Qwen3-30B-A3B config.json (issue 17 part 6 shapes)"),
}

_DEPTH = re.compile(r"^(?P<base>.+?)-(?:depth|layers)(?P<n>[1-9][0-9]*)$")


class BuildError(Exception):
    """Bad request (unknown preset, existing folder, no disk space): the CLI prints it on one line, exit 2."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to build: a preset at a given depth (and any config overrides, e.g. tiny test shapes)."""
    name: str
    model_type: str
    config: dict
    full_layers: int  # depth of the real model the shape comes from (for extrapolations)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])


def resolve(name: str, **overrides) -> Spec:
    """The Spec of preset `name` (`base`, `base-depthN` or `base-layersN`), config fields overridden."""
    m = _DEPTH.match(name)
    base, layers = (m["base"], int(m["n"])) if m and m["base"] in PRESETS else (name, None)
    if base not in PRESETS:
        raise BuildError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}, optionally with "
                         "-depthN / -layersN")
    preset = PRESETS[base]
    config = dict(preset.config)
    if layers is not None:
        config["num_hidden_layers"] = layers
    config.update(overrides)
    return Spec(name, preset.model_type, config, preset.full_layers)


def hf_config(spec: Spec, dtype: torch.dtype = torch.bfloat16):
    """The transformers config object of `spec` (token ids of the synthetic tokenizer filled in)."""
    from transformers import AutoConfig
    fields = dict(spec.config, bos_token_id=0, eos_token_id=0, pad_token_id=None,
                  dtype=str(dtype).replace("torch.", ""))
    return AutoConfig.for_model(spec.model_type, **fields)


def tensor_shapes(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the checkpoint stores, in the model's order (tied weights once),
    from the transformers model built on the meta device."""
    from transformers import AutoModelForCausalLM
    from qcompiler.ir.moe import replace_moe_blocks
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(spec), trust_remote_code=False)
    replace_moe_blocks(model)  # MoE: the per-expert names checkpoints store, not transformers' fused experts
    persistent = set(model.state_dict())
    out = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # deduplicated: a tied lm_head once
    out += [(n, tuple(b.shape)) for n, b in model.named_buffers() if n in persistent]
    return out


def checkpoint_bytes(spec: Spec, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of tensor data the checkpoint holds."""
    return sum(Entry(n, dtype, s).nbytes for n, s in tensor_shapes(spec))


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def init_of(name: str, shape: tuple[int, ...], num_layers: int) -> tuple[float, float]:
    """(mean, std) of tensor `name`'s entries (module docstring)."""
    if len(shape) == 1:
        return (1.0, 0.02) if name.endswith("norm.weight") else (0.0, 0.02)
    std = 1.0 / math.sqrt(shape[-1])
    if re.search(r"(o_proj|down_proj)\.weight$", name):
        std /= math.sqrt(2 * num_layers)
    return 0.0, std


def draw(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, num_layers: int,
         chunk_bytes: int | None = None):
    """Yield tensor `name`'s values as consecutive row blocks of at most `chunk_bytes` (default
    safetensors_stream.CHUNK_BYTES) of float32 draws (a block is at least one row). The same chunk size
    gives the same values."""
    chunk_bytes = chunk_bytes or safetensors_stream.CHUNK_BYTES
    mean, std = init_of(name, shape, num_layers)
    g = _generator(seed, name)
    rows = shape[0] if shape else 1
    per_row = max(1, math.prod(shape[1:]) if len(shape) > 1 else 1)
    step = max(1, chunk_bytes // (4 * per_row)) if len(shape) > 1 else max(rows, 1)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = torch.randn((n,) + tuple(shape[1:]), generator=g)
        block.mul_(std).add_(mean)
        yield block.to(dtype)
        del block


def _plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    shards, size = [[]], 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer (transformers PreTrainedTokenizerFast) trained on TOKENIZER_TEXT; id 0 is
    `<|endoftext|>` (BOS and EOS). Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def build_checkpoint(folder: Path, spec: Spec | str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False) -> Path:
    """Write the checkpoint of `spec` into `folder` (must not exist); returns it. See the module docstring."""
    spec = resolve(spec) if isinstance(spec, str) else spec
    folder = Path(folder)
    if folder.exists():
        raise BuildError(f"output folder {folder} exists: choose a new one (or delete it)")
    entries = [Entry(n, dtype, s) for n, s in tensor_shapes(spec)]
    total = sum(e.nbytes for e in entries)
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if free < total + 2**30:
        raise BuildError(f"{folder.parent}: {free / 2**30:.1f} GiB free, the checkpoint needs "
                         f"{total / 2**30:.1f} GiB (+1 GiB margin)")
    tokenizer = train_tokenizer(min(TOKENIZER_VOCAB, int(spec.config["vocab_size"])))
    tmp = folder.with_name(f".{folder.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        hf_config(spec, dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shards = _plan_shards(entries, max_shard_bytes)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
        bar = _bar(total, progress, spec.name)
        for fname, shard in zip(names, shards):
            with StreamingFile(tmp / fname, shard, SHARD_METADATA) as f:
                for e in f.order:
                    for block in draw(e.name, e.shape, dtype, seed, spec.num_layers):
                        f.write(block)
                        bar.update(block.numel() * block.element_size())
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {e.name: fname for fname, shard in zip(names, shards) for e in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        manifest = {"preset": spec.name, "model_type": spec.model_type, "seed": seed,
                    "dtype": str(dtype).replace("torch.", ""), "num_layers": spec.num_layers,
                    "full_layers": spec.full_layers, "bytes": total, "config": spec.config}
        (tmp / "synthetic.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _bar(total: int, enabled: bool, name: str):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"building {name}",
                file=sys.stderr, disable=not enabled)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", nargs="?", help="preset name, e.g. smollm2-135m-depth8 (see --list)")
    p.add_argument("-o", "--out", help="folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--shard-gib", type=float, default=DEFAULT_SHARD_BYTES / 2**30,
                   help="largest shard (GiB; a bigger single tensor gets its own shard)")
    p.add_argument("--list", action="store_true", help="print the presets with their sizes")
    args = p.parse_args(argv)
    try:
        if args.list:
            for name, preset in PRESETS.items():
                spec = resolve(name)
                head = checkpoint_bytes(dataclasses.replace(spec, config=dict(spec.config, num_hidden_layers=0)))
                layer = (checkpoint_bytes(spec) - head) / spec.num_layers
                print(f"{name:14s} {preset.model_type:6s} layers {spec.num_layers:3d}  bf16: layer "
                      f"{layer / 2**30:6.3f} GiB, embeddings+norm+lm_head {head / 2**30:6.3f} GiB  ({preset.source})")
            return 0
        if not args.preset or not args.out:
            p.error("give a preset and -o FOLDER (or --list)")
        dtype = getattr(torch, args.dtype)
        folder = build_checkpoint(Path(args.out).expanduser(), args.preset, args.seed, dtype,
                                  int(args.shard_gib * 2**30), progress=True)
    except BuildError as e:
        print(f"synthetic_checkpoint: {e}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
