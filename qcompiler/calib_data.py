"""Calibration data: read text files, cut them into token windows, or sample text from the model itself.

Contract:
- `read_texts(path)` reads a calibration set. `.jsonl` is msModelSlim's layout: one JSON object a line, the text under
  `inputs_pretokenized` (else `text`), blank lines skipped. `.txt` is the whole file, returned as its paragraphs: split
  at each JOINER (a blank line) that has a non-space character on both sides, so JOINER.join(paragraphs) is the file's
  text exactly and every window is what the whole text gives; the paragraphs are documents `make_windows` can stop at (a
  20 MB .txt cut into 64 x 512 windows was tokenized whole: 18 s and 3 GB, the same text as .jsonl 1.3 s and 0.3 GB).
  Any problem (missing file, other extension, bad line, nothing to read) is a QCError that names the file, the line
  where there is one, and what was expected. The whole file is checked, whatever part of it is used (a compile reads it
  before any work; `eval --max-windows` tokenizes only what it needs, but a bad line past that is still an error).
  Memory: a `.jsonl` is read a line at a time, so besides the texts it returns only one line is held (not the file's
  bytes, its decoded text and its list of lines: 3-4x the file).
- `make_windows(tokenizer, texts, seq_len, max_windows)` joins the texts with a blank line, tokenizes once
  WITHOUT special tokens (no BOS/EOS inserted: windows are slices of one running text, so a BOS in the
  middle of it would be a token the model never sees there at inference), and cuts consecutive,
  non-overlapping windows of `seq_len` tokens in order; a partial last window is dropped. Text shorter
  than one window gives a single window of all its tokens. `calibration_shortfall` words the warning
  when that is less than asked (the driver prints it and puts it in the report).
  With `max_windows` it tokenizes only a prefix of the joined text when the tokenizer is one whose tokens
  provably split at a document start (each text's paragraphs are documents: a huge .jsonl record is bounded as
  a .txt is) (`_document_start_layout`: a byte-level BPE as Qwen2/Qwen3, Llama-3,
  SmolLM2 have, or SentencePiece's layout in `tokenizers` as Llama-2 / Mistral / Gemma have): the same ids as
  tokenizing it all, the text after the first document start that yields enough ids left untokenized
  (`qcompile eval --max-windows 1` read 118k tokens of wiki_eval.jsonl to score 512). Any other tokenizer
  (slow ones, the sentencepiece library's, other normalizers / pre-tokenizers / models): the whole text.
- `sample_windows_from_model(model, tokenizer, n, seq_len, seed)` is data-free calibration: sequences
  sampled from the float model at temperature 1 (no top-k / top-p), starting from BOS, with EOS
  suppressed so every row has exactly `seq_len` tokens. A NaN/Inf weight is a QCError naming the tensor
  (checked before sampling); non-finite logits while sampling are a QCError too.

Everything is deterministic: the same inputs (and, for sampling, the same seed and batch size on the
same torch build and device) give the same tensor.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from qcompiler import knobs
from qcompiler.errors import QCError

TEXT_KEYS = ("inputs_pretokenized", "text")
EXTENSIONS = (".jsonl", ".txt")
JOINER = "\n\n"

#: where a .txt is split into paragraphs: a JOINER between two non-space characters (each paragraph then holds a
#: non-space character, so none is dropped as empty, and joining them with JOINER gives the file's text back)
_PARAGRAPH_BREAK = re.compile(r"(?<=\S)" + re.escape(JOINER) + r"(?=\S)")

_EXPECTED = {
    ".jsonl": "one JSON object per line with the text under 'inputs_pretokenized' or 'text'",
    ".txt": "plain UTF-8 text",
}


# ---------------------------------------------------------------------------------------------- reading

def read_texts(path: str | Path, label: str = "calibration set") -> list[str]:
    """The texts of a calibration file (`.jsonl` or `.txt`), in file order, empty texts left out. `label` starts
    every error message (eval's evaluation text: "--data")."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise QCError(f"{label} {path}: unsupported file type '{path.suffix}': "
                      f"expected one of {', '.join(EXTENSIONS)}")
    if not path.is_file():
        raise QCError(f"{label} {path} not found")
    if suffix == ".jsonl":
        texts = _jsonl_texts(path, label)
    else:
        try:
            texts = _PARAGRAPH_BREAK.split(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc.reason, exc.start, label) from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise QCError(f"{label} {path} is empty: expected {_EXPECTED[suffix]}")
    return texts


def _not_utf8(path: Path, reason: str, byte: int, label: str = "calibration set") -> QCError:
    return QCError(f"{label} {path} is not UTF-8 text ({reason} at byte {byte})")


def _jsonl_texts(path: Path, label: str = "calibration set") -> list[str]:
    """The texts of a `.jsonl`, read a line at a time, with the errors of decoding the whole file and then parsing
    its `str.splitlines()` (what it did before, 3-4x the file in memory): a byte that is not UTF-8 anywhere in the
    file wins over a bad line before it (the rest is still decoded after a bad line), whose error is raised at the
    end. Same lines: the file is read in pieces ending at b"\\n" (no UTF-8 sequence holds that byte, so each piece
    decodes alone, with the same reason and offset), and splitlines() of the whole text is that of its pieces
    (each piece ends at a line break; "\\r\\n" stays in one). The former universal-newline read turned "\\r\\n"
    and "\\r" into "\\n" first: the same line breaks for splitlines()."""
    texts, bad, number, offset = [], None, 0, 0
    with path.open("rb") as f:
        for piece in f:
            try:
                lines = piece.decode("utf-8").splitlines()
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, exc.reason, offset + exc.start, label) from None
            offset += len(piece)
            for line in lines:
                number += 1
                if bad is not None or not line.strip():
                    continue
                try:
                    text = _text_of_line(path, number, line, label)
                except QCError as exc:
                    bad = exc
                    continue
                if text.strip():
                    texts.append(text)
    if bad is not None:
        raise bad
    return texts


def _text_of_line(path: Path, number: int, line: str, label: str = "calibration set") -> str:
    where = f"{label} {path}, line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise QCError(f"{where}: not valid JSON ({exc.msg}): expected {_EXPECTED['.jsonl']}") from None
    key = next((k for k in TEXT_KEYS if isinstance(row, dict) and k in row), None)
    if key is None:
        raise QCError(f"{where}: no 'inputs_pretokenized' or 'text' key: expected {_EXPECTED['.jsonl']}")
    if not isinstance(row[key], str):
        raise QCError(f"{where}: '{key}' is a {type(row[key]).__name__}: expected a string")
    return row[key]


# ---------------------------------------------------------------------------------------------- windows

def make_windows(tokenizer, texts: list[str], seq_len: int, max_windows: int | None) -> torch.LongTensor:
    """[N, seq_len] token windows cut in order from the joined texts (see the module docstring)."""
    _check_positive("seq_len", seq_len)
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
    need = None if max_windows is None else max(max_windows * seq_len, 2)  # 2: the check below
    ids = _token_ids(tokenizer, texts, need)
    if len(ids) < 2:
        raise QCError(f"calibration text holds {len(ids)} token(s): need at least 2")
    if len(ids) < seq_len:
        return torch.tensor([ids], dtype=torch.long)
    count = len(ids) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: the joined text is meant to be longer than model_max_length; don't warn about it.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _token_ids(tokenizer, texts: list[str], need: int | None) -> list[int]:
    """Ids of the joined texts, or, when `need` is given and a document start allows it, a prefix of them holding
    at least `need` ids: always `ids == all_ids[:len(ids)]` with all_ids the whole joined text's ids.

    The prefix ends at the start b of a document j >= 1 whose first character is visible, not white space and
    not the first character of any added token. For a tokenizer `_document_start_layout` calls "byte_level", the
    ids of the text before b depend only on the text up to b (b - 1 is the joiner's newline): the pre-tokenizer's
    regex cannot match across "\n" followed by such a character (no alternative takes a newline before a
    letter, digit or mark, a white-space run stops at it, lookahead reads one character), BPE runs on each
    piece alone, NFC never composes across a newline, and no added token can span b (none holds a newline,
    none starts with text[b]). So the ids of (text before b) + text[b] are all_ids' first ids followed by
    the ids of text[b] on its own (checked: anything else falls back to the whole text).

    SentencePiece's layout in `tokenizers` (Llama-2 / Mistral / Gemma tokenizer.json: BPE over the whole text, or
    over Metaspace's "▁" pieces, no regex): no piece boundary at b, but no merge can join across it. BPE merges the
    lowest (rank, position) pair of adjacent symbols until none is a merge; the symbol ending at b - 1 ends with
    "\n" (or its byte token <0x0A>) and the one starting at b starts with text[b] or "<0x" (both not white space),
    and `_document_start_layout` accepts no merge of such a pair (nor a vocabulary token holding "\n" before a
    non-space: `ignore_merges`), so the symbols before b are merged exactly as without what follows. "\n" is never
    the unknown token (so no fused unknown spans b); the normalizer and Metaspace only replace " " by "▁" (one
    character each) and prepend at the start of the text or of a part between added tokens (none spans b). The
    ids of the text before b are then the ids of (text before b) + text[b] whose offsets end by b, and they are
    all_ids' first ids (checked: the ids after them start at b; ids and offsets from one call, `_ids_and_offsets`)."""
    layout = _document_start_layout(tokenizer) if need is not None else None
    if layout is not None:
        # Document starts inside a text too: its paragraphs (split as a .txt is) are documents, and JOINER.join of
        # them is the same joined text (re.split at JOINER, joined with JOINER), so the same all_ids. Without
        # this a .jsonl record holding 50 MB of text was tokenized whole for a few windows.
        texts = [p for t in texts for p in _PARAGRAPH_BREAK.split(t)]
        firsts = {t.content[0] for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if t.content}
        ends = [0]  # ends[j]: length of JOINER.join(texts[:j]) + JOINER
        for t in texts:
            ends.append(ends[-1] + len(t) + len(JOINER))
        target = 0  # characters before the boundary wanted (estimated from the last try's characters per id)
        j = 1
        while j < len(texts):
            c = texts[j][:1]
            if ends[j] < target or not c or c.isspace() or not c.isprintable() or c in firsts:
                j += 1
                continue
            text = JOINER.join(texts[:j]) + JOINER + c
            if layout == "byte_level":
                ids, tail = _encode(tokenizer, text), _encode(tokenizer, c)
                m = len(ids) - len(tail)
                if m <= 0 or ids[m:] != tail:
                    break  # not the split the argument above promises: tokenize everything
            else:  # "sentencepiece": text[b] alone would get the prepended "▁"; the offsets say where b falls
                ids, offsets = _ids_and_offsets(tokenizer, text)
                b = len(text) - 1
                m = sum(1 for _, e in offsets or () if e <= b)
                if (offsets is None or len(offsets) != len(ids) or m <= 0 or m == len(ids)
                        or any(e > b for _, e in offsets[:m]) or any(s < b for s, _ in offsets[m:])):
                    break  # no offsets, or a token across b: not the split the argument below promises
            if m >= need:
                return ids[:m]
            target = ends[j] * need / m * 1.05
            j += 1
    return _encode(tokenizer, JOINER.join(texts))


def _ids_and_offsets(tokenizer, text: str):
    """(ids, character offsets of each id) of `text` without special tokens, from the tokenizer's own call
    (transformers' return_offsets_mapping), or, for qcompiler's FastTokenizer (whose call is its backend's
    encode_batch, and ignores that argument), from that encode_batch; offsets None when the tokenizer gives none."""
    from .fast_tokenizer import FastTokenizer
    if isinstance(tokenizer, FastTokenizer):
        enc = tokenizer.backend_tokenizer.encode_batch([text], add_special_tokens=False)[0]
        return enc.ids, enc.offsets
    out = tokenizer(text, add_special_tokens=False, verbose=False, return_offsets_mapping=True)
    return out["input_ids"], out.get("offset_mapping")


#: pre-tokenizer regexes (tokenizers' Split, then ByteLevel without its own regex) whose pieces end at every "\n"
#: followed by a visible non-space character: Qwen2/Qwen3 (digits one by one) and Llama-3 (digits in threes)
_SPLIT_PATTERNS = tuple(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + digits +
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+" for digits in (r"\p{N}", r"\p{N}{1,3}"))


def _document_start_layout(tokenizer) -> str | None:
    """The `tokenizers` layout whose ids `_token_ids` may stop at a document start, or None. A Hugging Face fast
    tokenizer's backend, a BPE without dropout, no added token holding a newline, and either
    - "byte_level": no normalizer or NFC, a byte-level BPE pre-tokenized by GPT-2's regex (ByteLevel use_regex) or a
      Split of one of `_SPLIT_PATTERNS`, no prefix space added (Qwen2/Qwen3, Llama-3, SmolLM2, GPT-2);
    - "sentencepiece": SentencePiece's layout (Llama-2, Mistral, Gemma): normalizers among NFC, Prepend (no
      newline in it) and Replace(" ", "▁"); no pre-tokenizer or Metaspace("▁"); no continuing-subword prefix or
      end-of-word suffix; "\n" in the vocabulary or byte-fallen back to <0x0A>; no merge of a symbol ending in
      "\n" / <0x0A> with one starting with a non-space character, no vocabulary token holding "\n" before a
      non-space character (the argument is in `_token_ids`).
    Anything else (slow tokenizers, SentencePiece's own library, other regexes or normalizers) answers None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        norm = json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else None
        if type(backend.model).__name__ != "BPE" or backend.model.dropout not in (None, 0.0):
            return None
        pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
        if any("\n" in t.content for t in backend.get_added_tokens_decoder().values()):
            return None
        if norm in (None, {"type": "NFC"}) and _byte_level_pre_tokenizer(pre):
            return "byte_level"
        if _sentencepiece_normalizer(norm) and _metaspace_or_none(pre) and _no_merge_across_newline(backend):
            return "sentencepiece"
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    return None


def _byte_level_pre_tokenizer(pre: dict) -> bool:
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex") is True and pre.get("add_prefix_space") is False
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers", ())) != 2:
        return False
    split, byte_level = pre["pretokenizers"]
    return (split.get("type") == "Split" and split.get("pattern") in [{"Regex": p} for p in _SPLIT_PATTERNS]
            and split.get("behavior") == "Isolated" and split.get("invert") is False
            and byte_level == {**byte_level, "type": "ByteLevel", "use_regex": False, "add_prefix_space": False})


def _sentencepiece_normalizer(norm: dict | None) -> bool:
    """None, or NFC / Prepend (without a newline) / Replace(" ", "▁"), alone or in a Sequence."""
    if norm is None:
        return True
    items = norm["normalizers"] if norm.get("type") == "Sequence" else [norm]
    return all(n == {"type": "NFC"}
               or (n.get("type") == "Prepend" and "\n" not in n.get("prepend", "\n"))
               or n == {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"} for n in items)


def _metaspace_or_none(pre: dict) -> bool:
    return pre == {} or (pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581"
                         and pre.get("prepend_scheme") in ("always", "first", "never")
                         and pre.get("split") in (True, False))


def _no_merge_across_newline(backend) -> bool:
    """The BPE's conditions of the "sentencepiece" layout that read its vocabulary and merges (tokenizer.json's)."""
    model = json.loads(backend.to_str())["model"]
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return False
    vocab = model["vocab"]
    if "\n" not in vocab and not (model.get("byte_fallback") is True and "<0x0A>" in vocab):
        return False  # "\n" could be the unknown token, fused with an unknown text[b]
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if (left.endswith("\n") or left.endswith("<0x0A>")) and right[:1] and not right[:1].isspace():
            return False
    for token in vocab:
        if any(token[i] == "\n" and not token[i + 1].isspace() for i in range(len(token) - 1)):
            return False
    return True


def calibration_shortfall(asked: tuple[int, int], got: tuple[int, int], source) -> list[str]:
    """[warning] when the windows `got` (sequences, tokens) hold fewer sequences or tokens than `asked`."""
    if got[0] >= asked[0] and got[1] >= asked[1]:
        return []
    return [f"calibration set {source} is shorter than asked: {asked[0]} x {asked[1]} tokens asked, "
            f"{got[0]} x {got[1]} available ({got[0] * got[1]} of {asked[0] * asked[1]} tokens); calibrating "
            "on what there is (give more text, or lower --calib-samples / --seq-len)"]


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise QCError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------- sampling

def sample_windows_from_model(model, tokenizer, n: int, seq_len: int, seed: int = 0,
                              batch_size: int = 16) -> torch.LongTensor:
    """[n, seq_len] token ids sampled from `model` itself: data-free calibration text.

    Each row starts with the tokenizer's BOS (without one: a non-EOS token drawn from the seeded
    generator), then plain multinomial sampling (temperature 1, no top-k / top-p, no penalties: the
    model's own distribution, whatever its generation_config says) with every EOS suppressed. Only
    `tokenizer.bos_token_id` / `tokenizer.eos_token_id` are read. The caller's global RNG state is left
    as it was. Same seed and batch size -> same tensor; a different batch size draws differently.
    """
    from tqdm.auto import tqdm

    _check_positive("n", n)
    _check_positive("batch_size", batch_size)
    if not isinstance(seq_len, int) or seq_len < 2:
        raise QCError(f"seq_len must be an integer >= 2 for self-sampled calibration, got {seq_len!r}")
    _check_finite(model)
    eos_ids = _eos_ids(model, tokenizer)
    device = next(model.parameters()).device
    batches = [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    rows = []
    was_training = model.training
    model.eval()  # dropout off: sample the model as it is deployed
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            starts = _start_tokens(model, tokenizer, n, eos_ids, seed)
            for batch in tqdm(batches, desc="sampling calibration text", unit="batch",
                              disable=not knobs.progress_enabled()):
                prompt = starts[batch.start:batch.stop, None].to(device)
                try:
                    rows.append(_sample(model, prompt, seq_len, eos_ids).cpu())
                except RuntimeError as exc:  # torch.multinomial on NaN/Inf probabilities
                    if "probability tensor" not in str(exc):
                        raise
                    raise QCError("sampling calibration text: the float model's logits are NaN/Inf (activations "
                                  "overflow the model dtype?); pass --calib FILE or try --dtype bfloat16") from None
    finally:
        model.train(was_training)
    return torch.cat(rows)


def _check_finite(model) -> None:
    """QCError naming the first parameter holding NaN/Inf: sampling from it would fail or give garbage."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise QCError(f"weight {name!r} contains NaN or Inf; expected finite weights")


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that would end a sequence: the tokenizer's EOS and the generation config's (int or list)."""
    found = [getattr(tokenizer, "eos_token_id", None)]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found += config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]
    return sorted({int(i) for i in found if i is not None})


def _start_tokens(model, tokenizer, n: int, eos_ids: list[int], seed: int) -> torch.LongTensor:
    bos = getattr(tokenizer, "bos_token_id", None)
    vocab = model.get_input_embeddings().num_embeddings
    if bos is not None:
        from qcompiler.checkpoint_checks import check_token_ids
        check_token_ids([int(bos)], vocab, tokenizer, "sampling calibration text (the tokenizer's BOS)")
        return torch.full((n,), int(bos), dtype=torch.long)
    if hasattr(tokenizer, "__len__"):
        vocab = min(vocab, len(tokenizer))  # embedding tables are often padded past the real vocabulary
    allowed = torch.tensor([i for i in range(vocab) if i not in set(eos_ids)], dtype=torch.long)
    picks = torch.randint(len(allowed), (n,), generator=torch.Generator().manual_seed(seed))
    return allowed[picks]


def _sample(model, prompt: torch.LongTensor, seq_len: int, eos_ids: list[int]) -> torch.LongTensor:
    from transformers import GenerationConfig

    new = seq_len - prompt.shape[1]
    # A complete config, swapped in for the call: generate() fills unset fields from the model's own
    # generation_config (a checkpoint's top_k=20, repetition_penalty=1.05, ...), which would bias the text.
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_beams=1,
        max_new_tokens=new, min_new_tokens=new, use_cache=True,
        suppress_tokens=eos_ids or None, eos_token_id=eos_ids or None,
        pad_token_id=eos_ids[0] if eos_ids else 0,  # never used (no padding); set to keep generate quiet
    )
    saved = model.generation_config
    model.generation_config = config
    try:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    finally:
        model.generation_config = saved
    return out[:, :seq_len]
