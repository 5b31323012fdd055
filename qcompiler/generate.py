"""Greedy generation from a loaded model (executable graph or float checkpoint).

With `use_cache=True` (the default) each layer runs its decode step (ir/decode.py): the prompt is
prefilled once, then every new token goes through the layers alone, reading and extending a KV cache held
in static buffers sized prompt + max_new_tokens (int8 codes when the model was compiled with kv8).
`use_cache=False` recomputes the whole sequence at every step (the reference the cache is tested
against; `qcompile run --no-cache`). The prompt goes through the tokenizer's chat template when it has one
(instruct models), unless `raw=True`.
"""
import torch

from .checkpoint_checks import check_token_ids, embedding_rows
from .errors import QCError
from .ir.capture import LayerInputs
from .model import LoadedModel


def encode_prompt(tokenizer, prompt: str, raw: bool) -> list[int]:
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def generate(model: LoadedModel, prompt: str, max_new_tokens: int = 64, raw: bool = False, on_token=None,
             use_cache: bool = True, max_positions: int | None = None) -> str:
    """Greedy continuation of `prompt`. QCError when its token ids lie outside the embedding or when
    prompt + `max_new_tokens` exceeds `max_positions` (the model's max_position_embeddings, if known: RoPE
    and the graph are only defined up to it)."""
    tok = model.tokenizer
    ids = encode_prompt(tok, prompt, raw)
    check_token_ids(ids, embedding_rows(model), tok, "--prompt (with the chat template)" if not raw else "--prompt")
    if max_positions is not None and len(ids) + max_new_tokens > max_positions:
        raise QCError(f"--prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} = "
                      f"{len(ids) + max_new_tokens} tokens is beyond the model's max_position_embeddings "
                      f"({max_positions}); expected at most {max_positions} in all")
    if use_cache and model.forward is None:  # whole-model runtimes (onnx) have no KV cache: recompute
        return tok.decode(generate_ids_cached(model, ids, max_new_tokens, on_token), skip_special_tokens=True)
    if model.forward is not None:  # whole-model runtime (onnxruntime): ids -> logits
        def next_token(seq):
            return int(model.forward(seq)[:, -1].argmax(-1).item())
    else:
        pe0 = model.head.rope(max(len(ids), 2))
        sample = LayerInputs(model.head.embed(torch.tensor([ids + ids[:1]]))[:, :max(len(ids), 2)], pe0)
        layers = [model.layers.get(i, sample, prepared=True) for i in range(model.layers.num_layers)]

        def next_token(seq):
            h = model.head.embed(seq)
            pe = model.head.rope(seq.shape[1])
            for layer in layers:
                h = layer(h, position_embeddings=pe)
            return int(model.head.logits(h[:, -1:]).argmax(-1).item())
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            nxt = next_token(torch.tensor([ids + new]))
            if nxt in eos:
                break
            new.append(nxt)
            if on_token:
                on_token(tok.decode(new, skip_special_tokens=True))
    return tok.decode(new, skip_special_tokens=True)


class KVCache:
    """Static per-layer cache buffers [B, kv_heads, capacity, head_dim] (dtype per CacheSpec) and the fill level."""

    def __init__(self, specs, batch: int, capacity: int):
        self.buffers = [spec.buffers(batch, capacity) for spec in specs]
        self.capacity, self.length = capacity, 0

    def nbytes(self) -> int:
        """Bytes of the K/V buffers (the scales are layer tensors, not cache)."""
        return sum(t.numel() * t.element_size() for kv in self.buffers for t in kv)


def decode_layers(model: LoadedModel, sample: LayerInputs):
    """[(decode step, CacheSpec)] for every layer of `model`."""
    return [model.layers.decode(i, sample) for i in range(model.layers.num_layers)]


def forward_cached(model: LoadedModel, layers, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
    """Run tokens `ids` [B, L] (positions cache.length..+L-1) through the decode steps, storing their K/V;
    returns the last hidden states [B, L, H]."""
    start, n = cache.length, ids.shape[1]
    if start + n > cache.capacity:
        raise ValueError(f"KV cache full: {start} + {n} tokens > capacity {cache.capacity}")
    h = model.head.embed(ids)
    cos, sin = model.head.rope(n, start=start)
    pos = torch.tensor(start)
    for (step, _spec), (k_cache, v_cache) in zip(layers, cache.buffers):
        h, k_new, v_new = step(h, cos, sin, k_cache, v_cache, pos)
        k_cache[:, :, start:start + n] = k_new
        v_cache[:, :, start:start + n] = v_new
    cache.length = start + n
    return h


def generate_ids_cached(model: LoadedModel, ids: list[int], max_new_tokens: int, on_token=None,
                        stop_at_eos: bool = True) -> list[int]:
    """Greedy decoding with the KV cache: one prefill of the prompt, then one token per step."""
    tok = model.tokenizer
    pe0 = model.head.rope(max(len(ids), 2))
    sample = LayerInputs(model.head.embed(torch.tensor([ids + ids[:1]]))[:, :max(len(ids), 2)], pe0)
    layers = decode_layers(model, sample)
    cache = KVCache([spec for _, spec in layers], 1, len(ids) + max_new_tokens)
    eos = {tok.eos_token_id} if (stop_at_eos and tok.eos_token_id is not None) else set()
    new: list[int] = []
    chunk = ids
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            h = forward_cached(model, layers, cache, torch.tensor([chunk]))
            nxt = int(model.head.logits(h[:, -1:]).argmax(-1).item())
            if nxt in eos:
                break
            new.append(nxt)
            chunk = [nxt]
            if on_token:
                on_token(tok.decode(new, skip_special_tokens=True))
    return new
