"""Tests for qcompiler.calib_data: reading calibration files, cutting token windows, self-sampling."""
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qcompiler.calib_data import make_windows, read_texts, sample_windows_from_model
from qcompiler.errors import QCError
from tests.helpers import SHARED

SHARED_CALIB = SHARED / "data" / "calib"  # ../shared beside the checkout, wherever it is cloned


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ read_texts

def test_jsonl_reads_both_keys_in_order_and_skips_blank_lines(tmp_path):
    rows = [{"inputs_pretokenized": "first"}, {"text": "second"},
            {"inputs_pretokenized": "third wins", "text": "not this"}]
    body = "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n   \n" + json.dumps(rows[2]) + "\n"
    assert read_texts(_write(tmp_path / "c.jsonl", body)) == ["first", "second", "third wins"]


def test_jsonl_accepts_str_path_and_keeps_text_verbatim(tmp_path):
    path = _write(tmp_path / "c.jsonl", json.dumps({"text": "  a\n\nb  "}) + "\n")
    assert read_texts(str(path)) == ["  a\n\nb  "]


def test_txt_without_a_single_blank_line_between_words_is_one_text(tmp_path):
    """Three newlines are no paragraph break (the text before them ends with one): one text, verbatim."""
    body = "para one\nstill one\n\n\npara two\n"
    assert read_texts(_write(tmp_path / "c.txt", body)) == [body]


def test_bad_json_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "c.jsonl", '{"text": "ok"}\n\n{"text": broken\n')
    with pytest.raises(QCError, match=r"c\.jsonl, line 3: not valid JSON.*inputs_pretokenized"):
        read_texts(path)


def test_missing_key_names_line_and_expected_keys(tmp_path):
    path = _write(tmp_path / "c.jsonl", '{"text": "ok"}\n{"prompt": "x"}\n')
    with pytest.raises(QCError, match=r"line 2: no 'inputs_pretokenized' or 'text' key"):
        read_texts(path)


def test_non_object_line_is_reported_as_missing_key(tmp_path):
    path = _write(tmp_path / "c.jsonl", '["text"]\n')
    with pytest.raises(QCError, match="line 1: no 'inputs_pretokenized'"):
        read_texts(path)


def test_non_string_text_is_rejected(tmp_path):
    path = _write(tmp_path / "c.jsonl", '{"text": 5}\n')
    with pytest.raises(QCError, match="line 1: 'text' is a int: expected a string"):
        read_texts(path)


@pytest.mark.parametrize("name, body", [("c.jsonl", "\n  \n"), ("c.jsonl", '{"text": ""}\n'),
                                        ("c.txt", " \n\n"), ("c.txt", "")])
def test_empty_set_is_an_error(tmp_path, name, body):
    with pytest.raises(QCError, match=rf"calibration set .*{name} is empty: expected"):
        read_texts(_write(tmp_path / name, body))


def test_missing_file(tmp_path):
    with pytest.raises(QCError, match="nope.jsonl not found"):
        read_texts(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name", ["c.csv", "c.json", "c"])
def test_wrong_extension_names_accepted_ones(tmp_path, name):
    with pytest.raises(QCError, match=r"expected one of \.jsonl, \.txt"):
        read_texts(_write(tmp_path / name, '{"text": "x"}\n'))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(QCError, match="not UTF-8"):
        read_texts(path)


def _read_texts_whole(path: Path) -> list[str]:
    """read_texts of a `.jsonl` as it was until stop 29 (the whole file decoded, then its splitlines() parsed): the
    reference for the line-at-a-time reader's texts and errors."""
    from qcompiler.calib_data import _text_of_line
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QCError(f"calibration set {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    texts = [_text_of_line(path, n, line) for n, line in enumerate(content.splitlines(), start=1) if line.strip()]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise QCError(f"calibration set {path} is empty: expected one JSON object per line with the text under "
                      "'inputs_pretokenized' or 'text'")
    return texts


def _outcome(read, path):
    try:
        return read(path)
    except QCError as exc:
        return f"QCError: {exc}"


def test_jsonl_read_a_line_at_a_time_gives_the_whole_file_reads_texts_and_errors(tmp_path):
    """The line-at-a-time reader returns what decoding the whole file and parsing its splitlines() returned, texts
    or the very error message, on files mixing every line break str.splitlines() knows (\r\n, \r, \x85, \u2028,
    \x0c, \x1e), blank and white-space lines and texts, a BOM, bad JSON, missing keys, non-string texts, bytes that
    are not UTF-8 (bad or cut sequences, before or after a bad line, one cut by the end of the file) and no
    final newline."""
    import random
    good = [json.dumps({"text": "alpha"}), json.dumps({"inputs_pretokenized": "b\u00e9ta \u4e2d"}),
            json.dumps({"text": " \n "}), json.dumps({"text": "x\u2028y"}, ensure_ascii=False), "  ", ""]
    bad = ['{"text": broken', '{"prompt": "x"}', '{"text": 5}', '["text"]', "\ufeff" + json.dumps({"text": "bom"})]
    breaks = ["\n", "\r\n", "\r", "\x85", "\u2028", "\x0c", "\x1e"]
    raw_bad = [b"\xff", b"\xe2\x82", b"\xf0\x9f\x98", b"\xc3"]
    rng = random.Random(0)
    path = tmp_path / "c.jsonl"
    for case in range(400):
        parts = []
        for _ in range(rng.randint(0, 6)):
            kind = rng.random()
            line = (rng.choice(bad) if kind < 0.1 else rng.choice(good)).encode("utf-8")
            if rng.random() < 0.05:
                line = line[:3] + rng.choice(raw_bad) + line[3:]
            parts.append(line + (rng.choice(breaks) if rng.random() < 0.3 else "\n").encode("utf-8"))
        body = b"".join(parts)
        if body and rng.random() < 0.3:
            body = body.rstrip(b"\n")
        if rng.random() < 0.05:  # a sequence cut by the end of the file: "unexpected end of data"
            body += rng.choice(raw_bad[1:])
        path.write_bytes(body)
        assert _outcome(read_texts, path) == _outcome(_read_texts_whole, path), (case, body)


def test_jsonl_reader_holds_the_texts_not_the_file(tmp_path):
    """Peak Python memory of reading a 4 MB `.jsonl` (tracemalloc): the texts it returns (about the file's size
    here) and one line, under 1.5x the file. Decoding the whole file and listing its lines held its bytes, its
    text, its lines and the texts: measured 3.9x."""
    import tracemalloc
    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "calibration text " * 60}) + "\n"
    path.write_text(line * (4_000_000 // len(line)), encoding="utf-8")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        texts = read_texts(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(texts) == 4_000_000 // len(line) and texts[0] == "calibration text " * 60
    assert peak < 1.5 * size, f"read_texts peaked at {peak / size:.2f}x the file"


@pytest.mark.parametrize("name, rows", [("wiki_calib.jsonl", 64), ("wiki_eval.jsonl", 64), ("boolq.jsonl", 50),
                                        ("teacher_qualification.jsonl", 44), ("qwen_calib_prompt.jsonl", 80),
                                        ("llama_calib_prompt.jsonl", 48)])
def test_real_calibration_files(name, rows):
    path = SHARED_CALIB / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    texts = read_texts(path)
    assert len(texts) == rows
    assert all(isinstance(t, str) and t.strip() for t in texts)


# ---------------------------------------------------------------------------------------- make_windows

class CharTokenizer:
    """Stand-in tokenizer: one id per character; records how it was called."""

    def __init__(self):
        self.calls = []

    def __call__(self, text, **kwargs):
        self.calls.append((text, kwargs))
        return {"input_ids": [ord(c) for c in text]}


def test_windows_are_consecutive_slices_of_the_joined_text():
    tok = CharTokenizer()
    windows = make_windows(tok, ["abcdefg", "hij"], seq_len=4, max_windows=None)
    joined = [ord(c) for c in "abcdefg\n\nhij"]  # 12 ids -> 3 full windows
    assert windows.dtype == torch.long and windows.shape == (3, 4)
    assert windows.flatten().tolist() == joined
    assert len(tok.calls) == 1 and tok.calls[0][1]["add_special_tokens"] is False


def test_partial_last_window_dropped_and_max_windows_keeps_the_first():
    tok = CharTokenizer()
    assert make_windows(tok, ["x" * 10], seq_len=3, max_windows=None).shape == (3, 3)
    first_two = make_windows(tok, ["abcdefghij"], seq_len=3, max_windows=2)
    assert first_two.tolist() == [[97, 98, 99], [100, 101, 102]]
    assert make_windows(tok, ["abcdefghij"], seq_len=3, max_windows=99).shape == (3, 3)


def test_short_text_gives_one_window_of_all_tokens():
    windows = make_windows(CharTokenizer(), ["abc"], seq_len=8, max_windows=4)
    assert windows.tolist() == [[97, 98, 99]]


def test_fewer_than_two_tokens_is_an_error():
    with pytest.raises(QCError, match="need at least 2"):
        make_windows(CharTokenizer(), ["a"], seq_len=8, max_windows=None)


@pytest.mark.parametrize("seq_len, max_windows", [(0, None), (4, 0), (-1, 2)])
def test_bad_window_arguments(seq_len, max_windows):
    with pytest.raises(QCError, match="must be a positive integer"):
        make_windows(CharTokenizer(), ["abcdefgh"], seq_len=seq_len, max_windows=max_windows)


@pytest.fixture(scope="module")
def real_tokenizer(smollm2):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2["llama"], trust_remote_code=False)


def _sample_texts():
    if (SHARED_CALIB / "boolq.jsonl").is_file():
        return read_texts(SHARED_CALIB / "boolq.jsonl")
    return [f"Paragraph {i}: the river carries gravel and salmon return every autumn." for i in range(200)]


def test_real_tokenizer_windows(real_tokenizer):
    texts = _sample_texts()
    ids = real_tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    seq_len = 128
    windows = make_windows(real_tokenizer, texts, seq_len=seq_len, max_windows=None)
    assert windows.shape == (len(ids) // seq_len, seq_len)
    assert windows[0].tolist() == ids[:seq_len]
    assert windows[-1].tolist() == ids[(len(windows) - 1) * seq_len: len(windows) * seq_len]
    limited = make_windows(real_tokenizer, texts, seq_len=seq_len, max_windows=3)
    assert torch.equal(limited, windows[:3])
    assert torch.equal(make_windows(real_tokenizer, texts, seq_len, None), windows)  # deterministic


def test_real_tokenizer_short_text(real_tokenizer):
    windows = make_windows(real_tokenizer, ["Hello there,", "world."], seq_len=512, max_windows=None)
    expected = real_tokenizer("Hello there,\n\nworld.", add_special_tokens=False)["input_ids"]
    assert windows.tolist() == [expected]
    assert real_tokenizer.bos_token_id not in expected


def test_long_text_does_not_warn(real_tokenizer, monkeypatch):
    # transformers' logger does not propagate to the root logger (caplog): listen on it directly.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    monkeypatch.setattr(real_tokenizer, "model_max_length", 16)
    monkeypatch.setattr(real_tokenizer, "deprecation_warnings", {})
    try:
        make_windows(real_tokenizer, ["word " * 200], seq_len=32, max_windows=None)
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "longer than the specified maximum" in r.getMessage()]


# ------------------------------------------------------------------------------ sample_windows_from_model

BOS, EOS, EXTRA_EOS, VOCAB = 1, 2, 5, 128


@pytest.fixture()
def tiny_model():
    """Tiny random Llama whose head strongly prefers the EOS ids: sampling must suppress them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # One thread: a model this small gains nothing from more, and on a busy machine OpenMP's
    # spinning threads made these tests 20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    head = torch.nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[[EOS, EXTRA_EOS]] = 8.0  # without suppression nearly every token would be an EOS
    model.lm_head = head
    model.generation_config.eos_token_id = EXTRA_EOS  # differs from the tokenizer's: both must be suppressed
    yield model
    torch.set_num_threads(threads)


TOKENIZER = SimpleNamespace(bos_token_id=BOS, eos_token_id=EOS)


def test_sampling_shape_start_token_and_no_eos(tiny_model):
    out = sample_windows_from_model(tiny_model, TOKENIZER, n=10, seq_len=33, seed=0, batch_size=4)
    assert out.dtype == torch.long and out.shape == (10, 33)
    assert (out[:, 0] == BOS).all()
    assert not torch.isin(out, torch.tensor([EOS, EXTRA_EOS])).any()
    assert ((out >= 0) & (out < VOCAB)).all()


def test_sampling_is_deterministic_per_seed(tiny_model):
    a = sample_windows_from_model(tiny_model, TOKENIZER, n=6, seq_len=16, seed=7, batch_size=4)
    b = sample_windows_from_model(tiny_model, TOKENIZER, n=6, seq_len=16, seed=7, batch_size=4)
    c = sample_windows_from_model(tiny_model, TOKENIZER, n=6, seq_len=16, seed=8, batch_size=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampling_ignores_checkpoint_generation_config_and_restores_state(tiny_model):
    # generate() fills unset options from the model's generation_config: none of these may leak in.
    tiny_model.generation_config.top_k = 1
    tiny_model.generation_config.do_sample = False
    tiny_model.generation_config.sequence_bias = {(7,): 100.0}  # every token would be 7
    saved = tiny_model.generation_config
    tiny_model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    out = sample_windows_from_model(tiny_model, TOKENIZER, n=8, seq_len=12, seed=0, batch_size=8)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert len({tuple(row) for row in out.tolist()}) > 1
    assert (out == 7).float().mean() < 0.2
    assert tiny_model.generation_config is saved and tiny_model.training


def test_sampling_without_bos_draws_seeded_start_tokens(tiny_model):
    tok = SimpleNamespace(bos_token_id=None, eos_token_id=EOS)
    a = sample_windows_from_model(tiny_model, tok, n=12, seq_len=4, seed=3)
    b = sample_windows_from_model(tiny_model, tok, n=12, seq_len=4, seed=3)
    assert torch.equal(a, b)
    assert len(set(a[:, 0].tolist())) > 1
    assert not torch.isin(a, torch.tensor([EOS, EXTRA_EOS])).any()


def test_sampling_progress_bar_respects_knob(tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("QC_NO_PROGRESS", "1")
    sample_windows_from_model(tiny_model, TOKENIZER, n=2, seq_len=4)
    assert "sampling calibration text" not in capsys.readouterr().err
    monkeypatch.delenv("QC_NO_PROGRESS")
    sample_windows_from_model(tiny_model, TOKENIZER, n=2, seq_len=4)
    assert "sampling calibration text" in capsys.readouterr().err


def test_sampling_rejects_one_token_windows(tiny_model):
    with pytest.raises(QCError, match="seq_len must be an integer >= 2"):
        sample_windows_from_model(tiny_model, TOKENIZER, n=2, seq_len=1)


def test_sampling_rejects_non_finite_weights(tiny_model):
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(QCError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' contains NaN or Inf"):
        sample_windows_from_model(tiny_model, TOKENIZER, n=2, seq_len=4)


# ------------------------------------------------------------------ make_windows: tokenizing only a prefix

_PIECES = ["word", " word", " Word", "Ünïcode", " 中文", "e\u0301", "123456", " 42", "'s", "'ll", "...", "!", " ,",
           "\n", "\n\n", " \n", "\t", "  ", " ", "<|endoftext|>", "-", "(x)"]


def _fuzz_texts(seed: int, docs: int = 40) -> list[str]:
    """Documents of random pieces: starting and ending with spaces, newlines, digits, marks, apostrophes,
    special-token text, so document starts of every kind occur (and merges across whitespace once trained)."""
    import random
    rnd = random.Random(seed)
    return ["".join(rnd.choice(_PIECES) for _ in range(rnd.randint(1, 60))) for _ in range(docs)]


def _trained(pre_tokenizer, normalizer=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["\n\n".join(_fuzz_texts(s)) for s in range(20)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _tokenizers():
    from tokenizers import Regex, normalizers, pre_tokenizers
    from qcompiler.calib_data import _SPLIT_PATTERNS
    yield "gpt2-regex", _trained(pre_tokenizers.ByteLevel(add_prefix_space=False))
    for pattern in _SPLIT_PATTERNS:  # Qwen2 / Llama-3 layout: Split, then ByteLevel without its regex
        yield "split", _trained(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), normalizers.NFC())


class _CountingTokenizer:
    """Wraps a tokenizer, counting the characters it is asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.chars = tok, 0

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_max_windows_tokenizes_a_prefix_with_the_same_ids():
    """With max_windows, make_windows tokenizes only up to a document start that gives enough ids, and its windows
    are the first windows of the whole text's (exact ids), for GPT-2's regex and the Qwen2 / Llama-3 Split layout,
    on documents that start and end with every kind of character (which a prefix boundary must not cut)."""
    from qcompiler.calib_data import _document_start_layout
    for name, tok in _tokenizers():
        assert _document_start_layout(tok) == "byte_level", name
        for seed in range(6):
            _assert_prefix_ids_and_windows(tok, _fuzz_texts(100 + seed), (name, seed))



def test_txt_is_read_as_paragraphs_that_join_back_to_the_file(tmp_path):
    """A .txt splits at a blank line between two non-space characters only, so the joined paragraphs are the file."""
    from qcompiler.calib_data import JOINER
    body = "one\n\ntwo  \n\n\nthree\n\n four\n\nfive\n"
    texts = read_texts(_write(tmp_path / "c.txt", body))
    assert texts == ["one", "two  \n\n\nthree\n\n four", "five\n"] and JOINER.join(texts) == body


def test_txt_with_max_windows_tokenizes_a_prefix_with_the_same_windows(tmp_path):
    """A .txt was one text, tokenized whole whatever the windows asked for: a 20 MB file cut into 64 x 512 windows
    took 18 s and 3 GB (its .jsonl twin: 1.3 s, 0.3 GB). Its paragraphs are now documents make_windows can stop at;
    the windows are the whole file's."""
    tok = next(t for name, t in _tokenizers() if name == "split")
    body = "\n\n".join(f"Paragraph {i}: the river carries gravel, and salmon return every autumn." for i in range(400))
    path = _write(tmp_path / "big.txt", body)
    whole = make_windows(tok, [body], 16, None)
    counted = _CountingTokenizer(tok)
    got = make_windows(counted, read_texts(path), 16, 2)
    assert torch.equal(got, whole[:2])
    assert counted.chars < len(body) / 20, counted.chars

def _assert_prefix_ids_and_windows(tok, texts: list, case) -> list:
    """`_token_ids` with `need` gives a prefix of the whole text's ids, of at least `need` ids, for every need
    (the contract), and `make_windows` with max_windows the whole text's first windows; with one window it
    tokenizes under a quarter of the text. Returns the whole text's ids."""
    from qcompiler.calib_data import _token_ids
    all_ids = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    for need in range(2, len(all_ids), 19):
        ids = _token_ids(tok, texts, need)
        assert len(ids) >= need and ids == all_ids[:len(ids)], (case, need)
    whole = make_windows(tok, texts, 16, None)
    for max_windows in (1, 2, 5, 10 ** 6):
        counted = _CountingTokenizer(tok)
        got = make_windows(counted, texts, 16, max_windows)
        assert torch.equal(got, whole[:max_windows]), (case, max_windows)
        if max_windows == 1:
            assert counted.chars < len("\n\n".join(texts)) / 4, (case, counted.chars)
    return all_ids


def _sentencepiece_layout(normalizer, pre_tokenizer, train_split, newline_in_vocab=True):
    """A tiny BPE in SentencePiece's tokenizer.json layout (Llama-2: Prepend + Replace normalizer, no pre-tokenizer;
    Mistral / Gemma: Metaspace), byte fallback (a 30-character alphabet, so 'Ü', '中' ... fall back to <0xNN>), fused
    unknowns. Trained with `train_split` (a pre-tokenizer used only for training: it decides which merges hold a
    newline), then given the layout's own normalizer and pre-tokenizer; newline_in_vocab=False drops "\n" (and every
    token with it) as Llama-2's vocabulary has none (its newline is <0x0A>)."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizer, train_split
    trainer = trainers.BpeTrainer(vocab_size=400, limit_alphabet=30, special_tokens=["<unk>", "<|endoftext|>"])
    tok.train_from_iterator(["\n\n".join(_fuzz_texts(s)) for s in range(20)], trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = {t: i for t, i in trained["vocab"].items() if newline_in_vocab or "\n" not in t}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    merges = [m for m in merges if newline_in_vocab or "\n" not in "".join(m)]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab) + 1000)
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    out = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    out.add_special_tokens(["<|endoftext|>"])
    out.normalizer, out.pre_tokenizer = normalizer, pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=out, eos_token="<|endoftext|>", unk_token="<unk>")


def _sentencepiece_tokenizers():
    from tokenizers import Regex, normalizers, pre_tokenizers
    llama2 = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    no_newline = pre_tokenizers.Split(Regex("\n+"), behavior="removed")
    newline_runs = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")  # merges "\n" + "\n", none "\n" + x
    yield "llama2", _sentencepiece_layout(llama2, None, no_newline, newline_in_vocab=False)
    yield "llama2-nfc-newlines", _sentencepiece_layout(normalizers.Sequence([normalizers.NFC(), llama2]), None,
                                                       newline_runs)
    yield "metaspace-first", _sentencepiece_layout(None, pre_tokenizers.Metaspace(prepend_scheme="first", split=False),
                                                   newline_runs)
    yield "metaspace-always-split", _sentencepiece_layout(
        None, pre_tokenizers.Metaspace(prepend_scheme="always", split=True), no_newline, newline_in_vocab=False)


def test_max_windows_tokenizes_a_prefix_with_the_same_ids_in_sentencepiece_layouts():
    """SentencePiece's tokenizer.json layouts (BPE over the whole text or Metaspace pieces, byte fallback, "▁"
    prepended to the text): the prefix stops at a document start too, with the whole text's first ids for every
    need, and max_windows=1 reads under a quarter of the text (it read all of it, as a tokenizer without the
    layout still does); also through qcompiler's FastTokenizer (offsets from its backend's encode_batch)."""
    from qcompiler.calib_data import _document_start_layout, _token_ids
    from qcompiler.fast_tokenizer import FastTokenizer
    for name, tok in _sentencepiece_tokenizers():
        assert _document_start_layout(tok) == "sentencepiece", name
        fallbacks = 0
        for seed in range(4):
            all_ids = _assert_prefix_ids_and_windows(tok, _fuzz_texts(100 + seed), (name, seed))
            fallbacks += sum(t.startswith("<0x") for t in tok.convert_ids_to_tokens(all_ids))
        assert fallbacks > 0, name  # byte fallback exercised
        fast = FastTokenizer(tok.backend_tokenizer, {"eos_token": "<|endoftext|>"}, None)  # as `qcompile eval` loads
        texts = _fuzz_texts(100)
        all_ids = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
        ids = _token_ids(fast, texts, 16)
        assert 16 <= len(ids) < len(all_ids) / 4 and ids == all_ids[:len(ids)], name


def test_sentencepiece_layout_refused_when_a_merge_crosses_a_newline():
    """The layout's conditions that read the model: trained with no newline split, the BPE learns merges of "\n"
    with the letters after it (a token across a document start): refused; "\n" neither in the vocabulary nor
    byte-fallen back (it would be the unknown token, fused with an unknown first character): refused; another
    normalizer: refused."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from qcompiler.calib_data import _document_start_layout
    llama2 = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    across = _sentencepiece_layout(llama2, None, None)
    merges = json.loads(across.backend_tokenizer.to_str())["model"]["merges"]
    assert any(("\n" in (m.split(" ")[0] if isinstance(m, str) else m[0])) for m in merges)
    assert _document_start_layout(across) is None
    ok = _sentencepiece_layout(llama2, None, pre_tokenizers.Split(Regex("\n+"), behavior="removed"),
                               newline_in_vocab=False)
    state = json.loads(ok.backend_tokenizer.to_str())

    def layout():
        return _document_start_layout(PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state))))
    state["model"]["byte_fallback"] = False
    assert layout() is None
    state["model"]["byte_fallback"] = True
    assert layout() == "sentencepiece"
    state["normalizer"] = {"type": "Lowercase"}  # not one of the layout's normalizers
    assert layout() is None


def test_max_windows_reads_less_of_a_real_file(real_tokenizer, smollm2):
    """SmolLM2's tokenizer, as transformers builds it and as `qcompile eval` loads it (fast_tokenizer): the first
    windows of the whole text, from under a quarter of the text (it read all of it)."""
    from qcompiler.fast_tokenizer import load_fast_tokenizer
    texts = _sample_texts()
    whole = make_windows(real_tokenizer, texts, 128, None)
    for tok in (real_tokenizer, load_fast_tokenizer(Path(smollm2["llama"]))):
        for max_windows in (1, 2):
            counted = _CountingTokenizer(tok)
            assert torch.equal(make_windows(counted, texts, 128, max_windows), whole[:max_windows])
            assert counted.chars < len("\n\n".join(texts)) / 4, type(tok).__name__


def test_other_tokenizers_tokenize_the_whole_text_once():
    """A tokenizer the prefix argument does not cover (here no `backend_tokenizer`; also other regexes,
    normalizers, models) tokenizes the whole joined text, as without max_windows."""
    from tokenizers import pre_tokenizers
    from qcompiler.calib_data import _document_start_layout
    tok = CharTokenizer()
    make_windows(tok, ["abcdefgh", "ijklmnop", "qrstuvwx"], seq_len=2, max_windows=1)
    assert [c[0] for c in tok.calls] == ["abcdefgh\n\nijklmnop\n\nqrstuvwx"]
    assert _document_start_layout(_trained(pre_tokenizers.Whitespace())) is None
    assert _document_start_layout(_trained(pre_tokenizers.ByteLevel(add_prefix_space=True))) is None


def test_jsonl_record_with_max_windows_tokenizes_a_prefix_with_the_same_windows(tmp_path):
    """One huge .jsonl record (50 MB of text in one line) was tokenized whole for a few windows: its paragraphs are
    documents make_windows can stop at, as a .txt's are; the windows are the whole record's."""
    tok = next(t for name, t in _tokenizers() if name == "split")
    body = "\n\n".join(f"Paragraph {i}: the river carries gravel, and salmon return every autumn." for i in range(400))
    path = _write(tmp_path / "big.jsonl", json.dumps({"text": body}) + "\n")
    assert read_texts(path) == [body]                       # read_texts still returns the record as it is
    whole = make_windows(tok, [body], 16, None)
    counted = _CountingTokenizer(tok)
    got = make_windows(counted, read_texts(path), 16, 2)
    assert torch.equal(got, whole[:2])
    assert counted.chars < len(body) / 20, counted.chars
