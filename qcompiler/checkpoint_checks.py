"""A checkpoint checked against its config.json before any work, and what the captured graph cannot compute.

`check_checkpoint(ckpt)` (called by loading.open_checkpoint, so compile, quant, eval, run and inspect all
get it) builds the model transformers would build from config.json on the meta device (no memory, no
weights; transformers' own code is the single source of truth for names and shapes) and refuses, each
with one QCError line:
- a config whose `model_type` builds another class than its `architectures` entry;
- RoPE whose tables depend on the sequence length, or an unknown RoPE type. The type is the one the
  model's rotary module resolved (transformers 5 reads `rope_parameters` or `rope_scaling`, key
  `rope_type` or `type`: configuration_utils / modeling_rope_utils.RotaryEmbeddingConfigMixin.
  standardize_rope_params). Which types change with the length: modeling_rope_utils.dynamic_rope_update,
  whose wrapper recomputes `inv_freq` in the forward for every type containing "dynamic" and for
  "longrope"; the known types are ROPE_INIT_FUNCTIONS plus "default". The captured graph holds one table,
  so these would be silently wrong at other lengths;
- a sliding attention window that can take effect (shorter than max_position_embeddings), as transformers
  resolves it (an attention module's `sliding_window`, set from layer_types: modeling_qwen2.Qwen2Attention.
  __init__; configuration_qwen2 derives layer_types from use_sliding_window / max_window_layers when absent)
  or as the raw keys ask (use_sliding_window and a layer >= max_window_layers), or as vLLM applies the parsed
  config's sliding_window (to every layer, or to the "sliding_attention" ones when layer_types mixes types; a
  Llama config's sliding_window, which transformers' Llama ignores, included). The captured graph attends to the
  whole prefix;
- `is_causal` false (bidirectional attention, embedding models: `check_causal`);
- a partial_rotary_factor other than 1: vLLM rotates only part of each head, transformers' Llama / Qwen
  attention all of it (`check_partial_rotary`);
- already-quantized weights of any kind: a tensor stored in an integer or 8-bit float dtype (fp8, int8,
  packed int4 in int8/uint8/int32), or a tensor the model does not have beside a Linear's weight (GPTQ /
  AWQ qweight, qzeros, scales, g_idx; `weight_scale`, `input_scale`, `weight_packed`, ...);
- a missing tensor, a tensor the model does not have (rotary `inv_freq` buffers excepted), a tensor whose
  shape differs from the one config.json implies (one line: tensor, its shape, the expected shape), a
  float tensor in a dtype qcompiler cannot convert exactly enough (anything but float32/16, bfloat16, float64).
  A tied embedding stored only as `lm_head.weight` is accepted (loading.py reads it for both names).

Also here: `check_token_ids` (a tokenizer emitting ids the embedding has no row for), `check_seq_len`
(--seq-len beyond max_position_embeddings) and `header_dtype` (the checkpoint's float dtype from the
safetensors headers, for a config.json without torch_dtype/dtype). Only headers are read here.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from .errors import QCError, one_line

#: safetensors header dtypes -> names users know (torch's); the float ones qcompiler converts from
HEADER_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
                 "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "F4": "float4_e2m1fn_x2", "I8": "int8",
                 "U8": "uint8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32", "I64": "int64",
                 "U64": "uint64", "BOOL": "bool"}
FLOAT_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: buffers some checkpoints store that transformers recomputes (ignored when present)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"

_QUANTIZED_HINT = ("the checkpoint is already quantized; qcompile needs the float checkpoint (bfloat16, float16 or "
                   "float32 weights)")


def _hf_config_of(ckpt):
    """transformers' config of `ckpt` (QCError naming config.json if transformers refuses it)."""
    from .ir.capture import hf_config
    try:
        return hf_config(ckpt)
    except Exception as e:  # transformers raises many types for inconsistent configs
        raise _config_error(ckpt, e) from None


def _config_error(ckpt, e: Exception) -> QCError:
    return QCError(f"{ckpt.path / 'config.json'}: transformers cannot build the model from it ({one_line(e)})")


def meta_model(ckpt, hf_config=None):
    """The transformers model of `ckpt`'s config.json on the meta device (QCError if transformers refuses it)."""
    from transformers import AutoModelForCausalLM
    hf_config = hf_config or _hf_config_of(ckpt)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=ckpt.dtype, trust_remote_code=False)
    except Exception as e:
        raise _config_error(ckpt, e) from None
    from .ir.moe import replace_moe_blocks
    replace_moe_blocks(model)  # the checkpoint's per-expert names, not transformers' fused experts
    return model


def check_checkpoint(ckpt, dense_spec=None) -> None:
    """Every check of the module docstring; QCError on the first problem. Reads only safetensors headers.
    `dense_spec`: the checkpoint's ir/dense_layer.describe(ckpt), when the caller wants transformers left
    unimported: describe() accepts only configs that pass the config checks here (model_type matching the
    architecture, RoPE "default", no sliding window), and its tensor table equals the meta model's
    (tests/ir/test_dense_layer.py), so the tensors are checked against that table with the same messages."""
    if dense_spec is not None:
        from .ir.dense_layer import model_tensors
        check_tensors(ckpt, *model_tensors(dense_spec, ckpt.num_layers))
        return
    cfg_file = ckpt.path / "config.json"
    hf_config = _hf_config_of(ckpt)
    check_rope(hf_config, cfg_file)
    check_partial_rotary(hf_config, cfg_file)
    check_causal(hf_config, cfg_file)
    model = meta_model(ckpt, hf_config)
    if type(model).__name__ != ckpt.architecture:
        raise QCError(f"{cfg_file}: architectures says {ckpt.architecture} but model_type "
                      f"{ckpt.config.get('model_type')!r} builds {type(model).__name__}; make them agree")
    check_sliding_window(model, cfg_file, ckpt.config)
    check_tensors(ckpt, {n: list(t.shape) for n, t in model.state_dict().items()},
                  {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def rope_types(hf_config) -> list[str]:
    """The RoPE type(s) transformers resolved (flat rope_parameters, or one per layer type when nested)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    nested = [v for v in params.values() if isinstance(v, dict)]
    groups = nested if nested and "rope_type" not in params else [params]
    return [str(g.get("rope_type", g.get("type", "default"))) for g in groups]


def check_rope(hf_config, cfg_file: Path) -> None:
    """Refuse RoPE types whose tables change with the sequence length, and unknown ones (module docstring)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    static = ["default"] + sorted(t for t in ROPE_INIT_FUNCTIONS if not _length_dependent(t))
    for rope_type in rope_types(hf_config):
        if _length_dependent(rope_type):
            raise QCError(f"{cfg_file}: RoPE type {rope_type!r} (rope_parameters / rope_scaling) recomputes its "
                          "tables from the sequence length, which a compiled graph cannot; supported: "
                          f"{', '.join(static)}")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise QCError(f"{cfg_file}: unknown RoPE type {rope_type!r} (rope_parameters / rope_scaling); "
                          f"supported: {', '.join(static)}")


def _length_dependent(rope_type: str) -> bool:
    """As transformers' modeling_rope_utils.dynamic_rope_update decides which types recompute inv_freq."""
    return "dynamic" in rope_type or rope_type == "longrope"


def check_partial_rotary(hf_config, cfg_file: Path) -> None:
    """Refuse a partial_rotary_factor other than 1 (top level, or under rope_parameters / rope_scaling, flat or per
    layer type, as transformers standardized it): vLLM's get_rope rotates only the first
    `int(head_dim * partial_rotary_factor)` dims of each head (layers/rotary_embedding/__init__.py, for llama,
    qwen2, qwen3, qwen2_moe, qwen3_moe alike), while transformers' Llama / Qwen attention rotates all of head_dim:
    with the "default" RoPE type its rotary module ignores the factor (the graph then silently rotates every
    dim), with the other types the table is narrower than the heads and the capture fails."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    groups = [params] + [v for v in params.values() if isinstance(v, dict)]
    factors = [g.get("partial_rotary_factor") for g in groups] + [getattr(hf_config, "partial_rotary_factor", None)]
    for factor in factors:
        if factor is not None and factor != 1.0:
            raise QCError(f"{cfg_file}: partial_rotary_factor {factor}: vLLM rotates only that fraction of each "
                          "attention head's dims, transformers' attention (whose layers qcompile compiles) rotates "
                          "all of them; expected partial_rotary_factor 1.0 or none")


def check_causal(hf_config, cfg_file: Path) -> None:
    """Refuse `is_causal` false (embedding models such as gte-Qwen2 set it): transformers then builds a bidirectional
    mask (masking_utils.create_causal_mask: "if not getattr(config, 'is_causal', True)") and vLLM's llama / qwen2 /
    qwen3 build encoder-only attention (`AttentionType.ENCODER_ONLY`), while qcompile's graphs, calibration and
    executable attention are causal: the float eval differed from transformers by a relative logit error of 0.84."""
    value = getattr(hf_config, "is_causal", True)
    if not value:
        raise QCError(f"{cfg_file}: is_causal is {json.dumps(value)}: transformers and vLLM then attend "
                      "bidirectionally (an embedding model), qcompile compiles causal decoders only; expected "
                      "is_causal true or none")


def check_sliding_window(model, cfg_file: Path, config: dict) -> None:
    """Refuse a sliding attention window shorter than max_position_embeddings: when transformers' attention
    modules have one (layer_types), when the raw keys ask for one (use_sliding_window with a layer at or beyond
    max_window_layers), or when vLLM would apply the parsed config's sliding_window (comment below)."""
    max_pos = getattr(model.config, "max_position_embeddings", None)

    def shorter(window):
        return isinstance(window, int) and not isinstance(window, bool) and (max_pos is None or window < max_pos)
    sliding = [(i, layer.self_attn.sliding_window) for i, layer in enumerate(model.model.layers)
               if shorter(getattr(layer.self_attn, "sliding_window", None))]
    window, first = config.get("sliding_window"), config.get("max_window_layers") or 0
    if not sliding and config.get("use_sliding_window") and shorter(window) and len(model.model.layers) > first:
        sliding = [(first, window)]
    # vLLM reads the window from the config transformers parsed: without mixed layer_types it gives every layer
    # config.sliding_window (config/model.py get_sliding_window -> engine/arg_utils.py CacheConfig.sliding_window ->
    # attention.py Attention.__init__; 0 means none, ModelConfig.__post_init__), with mixed ones llama.py gives it
    # to the "sliding_attention" layers. transformers' Llama ignores the key, and Qwen2 / Qwen3 keep it only with
    # use_sliding_window, then slide only from max_window_layers on.
    types, parsed = getattr(model.config, "layer_types", None), getattr(model.config, "sliding_window", None)
    if not sliding and shorter(parsed) and parsed > 0:
        mixed = isinstance(types, (list, tuple)) and len(set(types)) > 1
        first = next((i for i, t in enumerate(types[:len(model.model.layers)]) if t == "sliding_attention"),
                     None) if mixed else 0
        if first is not None:
            sliding = [(first, parsed)]
    if sliding:
        i, window = sliding[0]
        raise QCError(f"{cfg_file}: layer {i} attends through a sliding window of {window} tokens "
                      f"(use_sliding_window / sliding_window / max_window_layers / layer_types), shorter than "
                      f"max_position_embeddings {max_pos}: qcompile's graphs attend to the whole prefix; "
                      "remove the window (use_sliding_window false, layer_types all full_attention) only if the "
                      "model was trained without it")


def _where(ckpt, name: str) -> Path:
    return ckpt.path / ckpt.weight_map[name]


def check_tensors(ckpt, expected: dict[str, list[int]], linears: set[str]) -> None:
    """Names, dtypes and shapes of the stored tensors against the model's ({name: shape} of its state dict,
    the names of its Linear modules; module docstring)."""
    stored = ckpt.stored_tensors()  # name -> (header dtype, shape); aliases (tied embedding) left out
    # 1. quantized storage first: it explains the missing / misshapen tensors that come with it
    for name, (dtype, shape) in stored.items():
        if dtype not in FLOAT_HEADER_DTYPES and (name in expected or dtype.startswith(("F8", "F4"))):
            raise QCError(f"{_where(ckpt, name)}: tensor {name} is {HEADER_DTYPES.get(dtype, dtype)} {shape}: "
                          f"{_QUANTIZED_HINT}")
    unexpected = [n for n in stored if n not in expected and not n.endswith(IGNORED_SUFFIXES)]
    for name in unexpected:
        owner = next((m for m in _prefixes(name) if m in linears), None)
        if owner is not None:
            extra = sorted(n[len(owner) + 1:] for n in unexpected if n.startswith(owner + "."))
            raise QCError(f"{_where(ckpt, name)}: Linear {owner} stores {', '.join(extra)}: quantization tensors "
                          f"(GPTQ/AWQ/fp8-style layouts); {_QUANTIZED_HINT}")
    # 2. names
    need = [n for n in expected if n not in (EMBED, LM_HEAD)] + [EMBED] + ([] if ckpt.tie_word_embeddings else [LM_HEAD])
    missing = [n for n in need if not ckpt.has(n)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        tied = " (tie_word_embeddings is true: either embed_tokens or lm_head will do)" if missing[0] == EMBED else ""
        raise QCError(f"{ckpt.path}: weight {missing[0]} is missing from the safetensors files{more}{tied}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise QCError(f"{_where(ckpt, unexpected[0])}: tensor {unexpected[0]}{more} is not part of a "
                      f"{ckpt.architecture} with this config.json; expected only the model's own tensors")
    # 3. shapes
    for name, (dtype, shape) in stored.items():
        want = expected.get(name)
        if want is not None and shape != want:
            raise QCError(f"{_where(ckpt, name)}: tensor {name} has shape {shape}; config.json implies {want}")


def _prefixes(name: str):
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def header_dtype(path: Path, stored: dict) -> torch.dtype | None:
    """The float dtype holding most of the checkpoint's bytes, from the safetensors headers (None if none)."""
    counts = Counter()
    for dtype, shape in stored.values():
        if dtype in FLOAT_HEADER_DTYPES:
            n = 1
            for d in shape:
                n *= d
            counts[dtype] += n
    return FLOAT_HEADER_DTYPES[counts.most_common(1)[0][0]] if counts else None


def check_token_ids(ids, rows: int | None, tokenizer, where: str) -> None:
    """QCError naming the first token whose id has no embedding row (ids: tensor or list of ints)."""
    if rows is None:
        return
    flat = torch.as_tensor(ids).reshape(-1)
    if flat.numel() == 0 or int(flat.max()) < rows:
        return
    bad = int(flat[flat >= rows][0])
    try:
        token = tokenizer.convert_ids_to_tokens(bad)
    except Exception:  # a tokenizer without the id in its vocabulary table
        token = None
    raise QCError(f"{where}: the tokenizer produced token {token!r} (id {bad}), but the model's embedding has "
                  f"{rows} rows (ids 0..{rows - 1}): tokenizer and model do not match (tokens added without "
                  "resizing the embedding?)")


def embedding_rows(model) -> int | None:
    """Rows of a model.LoadedModel's embedding (its vocab_size for whole-model runtimes; None if unknown)."""
    if model.head is not None:
        return int(model.head.embed_weight.shape[0])
    value = model.info.get("vocab_size")
    return int(value) if value is not None else None


def max_positions(folder: Path) -> int | None:
    """max_position_embeddings of `folder/config.json` (a model folder or a compiled OUT), if stated."""
    try:
        value = json.loads((Path(folder) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_seq_len(seq_len: int, limit: int | None, option: str = "--seq-len") -> None:
    """QCError when `seq_len` exceeds the model's max_position_embeddings `limit`."""
    if limit is not None and seq_len > limit:
        raise QCError(f"{option} {seq_len} is beyond the model's max_position_embeddings ({limit}); expected "
                      f"{option} <= {limit}")
