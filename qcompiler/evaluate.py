"""Perplexity of a model (compiled executable graph or float checkpoint) on a text file.

Convention: the texts are joined with blank lines, tokenized once without special tokens, and cut into
consecutive non-overlapping windows of --seq-len tokens (a trailing partial window is dropped unless it
is the only one; with --max-windows only the text those windows need is tokenized, the same ids:
calib_data.make_windows). Each window is scored on its own: perplexity = exp(mean NLL of tokens 2..L of every
window), `tokens` = number of scored tokens. Layer-major: all windows pass layer i before layer i+1 is
loaded, so only one decoder layer is in memory.
"""
import math
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import knobs
from .calib_data import make_windows, read_texts
from .checkpoint_checks import check_token_ids, embedding_rows
from .ir.capture import LayerInputs
from .model import LoadedModel, auto_batch_size, run_layer_batched


#: windows per lm_head batch: logits are windows x seq_len x vocab floats (4 x 512 x 152k x 4 B = 1.2 GB)
LOGIT_WINDOWS = 4


def perplexity(model: LoadedModel, windows: torch.LongTensor, batch_size: int | None = None) -> dict:
    if model.forward is not None:  # whole-model runtime (onnxruntime): ids -> logits in one call
        return _perplexity_whole(model, windows, batch_size)
    head = model.head
    seq_len = windows.shape[1]
    batch_size = batch_size or auto_batch_size(seq_len)
    pe = head.rope(seq_len)
    with torch.inference_mode():
        hidden = head.embed(windows)
    bar = tqdm(range(model.layers.num_layers), desc=f"eval ({model.kind})", unit="layer", file=sys.stderr,
               disable=not knobs.progress_enabled())
    for i in bar:
        layer = model.layers.get(i, LayerInputs(hidden[:1], pe), prepared=True, rows=windows.numel())
        hidden = run_layer_batched(layer, hidden, pe, batch_size)
        del layer
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], LOGIT_WINDOWS):
            logits = head.logits(hidden[start:start + LOGIT_WINDOWS]).float()
            target = windows[start:start + LOGIT_WINDOWS, 1:]
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   reduction="sum").item()
            count += target.numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "windows": int(windows.shape[0]), "seq_len": int(seq_len)}


def _perplexity_whole(model: LoadedModel, windows: torch.LongTensor, batch_size: int | None) -> dict:
    """Same scoring as `perplexity`, for a model whose `forward` maps ids to logits."""
    nll, count = 0.0, 0
    step = min(batch_size or LOGIT_WINDOWS, LOGIT_WINDOWS)  # logits of `step` windows are in memory at once
    for start in tqdm(range(0, windows.shape[0], step), desc=f"eval ({model.kind})", unit="batch",
                      file=sys.stderr, disable=not knobs.progress_enabled()):
        ids = windows[start:start + step]
        logits = model.forward(ids).float()
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += ids[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])}


def evaluate_file(model: LoadedModel, data_path, seq_len: int, max_windows: int | None = None,
                  batch_size: int | None = None) -> dict:
    windows = make_windows(model.tokenizer, read_texts(data_path, "--data"), seq_len, max_windows)
    check_token_ids(windows, embedding_rows(model), model.tokenizer, f"--data {data_path}")
    result = perplexity(model, windows, batch_size)
    result.update(data=str(data_path), model_kind=model.kind, dtype=model.info.get("dtype"))
    return result
