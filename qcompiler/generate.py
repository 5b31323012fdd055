"""Greedy generation from a loaded model (executable graph or float checkpoint).

Every step recomputes the whole sequence through all layers (no KV cache yet): simple and exact, fine
for short prompts on small models. The prompt goes through the tokenizer's chat template when it has
one (instruct models), unless `raw=True`.
"""
import torch

from .ir.capture import LayerInputs
from .runtime import LoadedModel


def encode_prompt(tokenizer, prompt: str, raw: bool) -> list[int]:
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def generate(model: LoadedModel, prompt: str, max_new_tokens: int = 64, raw: bool = False, on_token=None) -> str:
    tok = model.tokenizer
    ids = encode_prompt(tok, prompt, raw)
    pe0 = model.head.rope(max(len(ids), 2))
    sample = LayerInputs(model.head.embed(torch.tensor([ids + ids[:1]]))[:, :max(len(ids), 2)], pe0)
    layers = [model.layers.get(i, sample) for i in range(model.layers.num_layers)]
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            seq = torch.tensor([ids + new])
            h = model.head.embed(seq)
            pe = model.head.rope(seq.shape[1])
            for layer in layers:
                h = layer(h, position_embeddings=pe)
            nxt = int(model.head.logits(h[:, -1:]).argmax(-1).item())
            if nxt in eos:
                break
            new.append(nxt)
            if on_token:
                on_token(tok.decode(new, skip_special_tokens=True))
    return tok.decode(new, skip_special_tokens=True)
