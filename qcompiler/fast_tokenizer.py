"""A folder's tokenizer read straight from tokenizer.json (the `tokenizers` library + jinja2), without
transformers: `qcompile run` / `qcompile eval` start without importing transformers' model stack.

Contract: `load_fast_tokenizer(folder)` returns a `FastTokenizer` only when transformers'
`AutoTokenizer.from_pretrained(folder)` (transformers 5.x) would build a `TokenizersBackend` that holds
the same `tokenizers.Tokenizer` and the same special tokens and chat template; otherwise None and the
caller loads AutoTokenizer (loading.load_tokenizer). What "would build" means is decided from the folder's
files alone (`fast_path_refusal`, each condition from transformers' code, named below):
- tokenizer_config.json's `tokenizer_class` is TokenizersBackend or PreTrainedTokenizerFast, and
  config.json's `model_type` is one AutoTokenizer routes to TokenizersBackend for that class
  (FAST_MODEL_TYPES; transformers/models/auto/tokenization_auto.py `AutoTokenizer.from_pretrained`: qwen2 is
  in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS and gets Qwen2Tokenizer, so it is not here);
- the folder has tokenizer.json and none of the legacy / alternative files AutoTokenizer would also read
  (special_tokens_map.json, added_tokens.json, vocab / merges / sentencepiece files, extra chat templates);
- tokenizer_config.json holds only the keys in CONFIG_KEYS, special tokens as plain strings, each one an
  added token of tokenizer.json flagged special and not normalized (TokenizersBackend.__init__ adds the
  missing ones: then ids would differ), no extra special tokens, `split_special_tokens` false,
  `clean_up_tokenization_spaces` false (tokenization_utils_tokenizers.py `_decode`);
- tokenizer.json's vocabulary (added tokens included) is at most 100000 tokens (larger ones go through
  `TokenizersBackend._patch_mistral_regex`).
The backend then equals `Tokenizer.from_file(tokenizer.json)` with `encode_special_tokens = False` and,
when tokenizer.json has no post-processor, the `TemplateProcessing` of
`TokenizersBackend.update_post_processor` with add_bos/add_eos false (transformers pops those keys when a
tokenizer.json exists). The chat template is chat_template.jinja, else tokenizer_config.json's
`chat_template` (tokenization_utils_base.py `from_pretrained`: the file wins), rendered in the
environment of transformers/utils/chat_template_utils.py `_cached_compile_jinja_template` (sandboxed,
trim_blocks, lstrip_blocks, loopcontrols, `generation` blocks, tojson / raise_exception / strftime_now /
dict / namespace) with `messages`, `tools=None`, `documents=None`, `add_generation_prompt` and the named
special tokens, then encoded without special tokens (`apply_chat_template`).
Tested token for token against AutoTokenizer (tests/test_fast_tokenizer.py): SmolLM2's tokenizer, the
test checkpoints' tokenizers of every architecture, a compiled OUT, chat templates with tools / namespace /
generation blocks; refusals for each condition.
Nothing here runs code from the folder: tokenizer.json is JSON, the template runs in jinja2's sandbox.
"""
from __future__ import annotations

import json
from pathlib import Path

#: model_type -> AutoTokenizer builds TokenizersBackend for tokenizer_class TokenizersBackend /
#: PreTrainedTokenizerFast (checked against transformers by tests/test_fast_tokenizer.py)
FAST_MODEL_TYPES = ("llama", "qwen3", "qwen3_moe", "qwen2_moe")
FAST_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
#: named special tokens (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES, in that order)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
#: tokenizer_config.json keys whose effect is reproduced here (or that have none on encode / decode / chat)
CONFIG_KEYS = frozenset(SPECIAL_TOKENS) | {
    "tokenizer_class", "backend", "model_max_length", "is_local", "local_files_only", "chat_template",
    "clean_up_tokenization_spaces", "split_special_tokens", "add_bos_token", "add_eos_token",
    "model_input_names", "padding_side", "truncation_side", "extra_special_tokens", "additional_special_tokens",
}
#: files AutoTokenizer would read besides tokenizer.json / tokenizer_config.json / chat_template.jinja
OTHER_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
               "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "tekken.json", "chat_template.json",
               "additional_chat_templates")
MAX_VOCAB = 100000


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def fast_path_refusal(folder: Path) -> str | None:
    """Why `folder`'s tokenizer must be loaded by transformers (None: FastTokenizer builds the same one)."""
    folder = Path(folder)
    cfg, tok_cfg = _json(folder / "config.json"), _json(folder / "tokenizer_config.json")
    if not isinstance(tok_cfg, dict) or not (folder / "tokenizer.json").is_file():
        return "no tokenizer.json / tokenizer_config.json"
    if tok_cfg.get("tokenizer_class") not in FAST_CLASSES:
        return f"tokenizer_class {tok_cfg.get('tokenizer_class')!r}"
    if not isinstance(cfg, dict) or cfg.get("model_type") not in FAST_MODEL_TYPES:
        return f"model_type {cfg.get('model_type') if isinstance(cfg, dict) else None!r}"
    other = [n for n in OTHER_FILES if (folder / n).exists()]
    if other:
        return f"{other[0]} present"
    extra = sorted(set(tok_cfg) - CONFIG_KEYS)
    if extra:
        return f"tokenizer_config.json key {extra[0]!r}"
    if tok_cfg.get("split_special_tokens") or tok_cfg.get("clean_up_tokenization_spaces"):
        return "split_special_tokens / clean_up_tokenization_spaces set"
    if tok_cfg.get("extra_special_tokens") or tok_cfg.get("additional_special_tokens"):
        return "extra special tokens"
    if not all(isinstance(tok_cfg.get(k), (str, type(None))) for k in SPECIAL_TOKENS):
        return "a special token that is not a plain string"
    if not isinstance(tok_cfg.get("chat_template"), (str, type(None))):
        return "several chat templates"
    return None


class FastTokenizer:
    """The subset of transformers' tokenizer API qcompiler uses (calibration, eval, run): `tok(text,
    add_special_tokens=...)["input_ids"]`, `apply_chat_template`, `decode`, `convert_ids_to_tokens`,
    `len(tok)`, `<name>_token` / `<name>_token_id`, `chat_template`, `backend_tokenizer` (the
    `tokenizers.Tokenizer`, as transformers names it: calib_data reads its normalizer / pre-tokenizer)."""

    def __init__(self, backend, special: dict, chat_template: str | None):
        self._tokenizer = backend
        self._special = special                 # {"bos_token": "<|im_start|>", ...} (set ones only)
        self.chat_template = chat_template
        for name in SPECIAL_TOKENS:
            token = special.get(name)
            setattr(self, name, token)
            setattr(self, f"{name}_id", None if token is None else backend.token_to_id(token))

    @property
    def backend_tokenizer(self):
        return self._tokenizer

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return dict(self._special)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True, **_ignored) -> dict:
        """{"input_ids": [...]} of one text (transformers' `_encode_plus` without padding / truncation)."""
        if not isinstance(text, str):
            raise TypeError(f"FastTokenizer encodes one str, got {type(text).__name__}")
        return {"input_ids": self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = False, **_ignored):
        """The rendered chat (tokenize=False) or its ids (without special tokens; a dict with return_dict)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation.")
        if not all(isinstance(m, dict) and set(m) <= {"role", "content"} and
                   all(isinstance(v, str) for v in m.values()) for m in conversation):
            raise ValueError("FastTokenizer renders messages of str 'role' / 'content' only")
        messages = [dict(m) for m in conversation]
        text = _compile(self.chat_template).render(messages=messages, tools=None, documents=None,
                                                   add_generation_prompt=add_generation_prompt, **self._special)
        if not tokenize:
            return text
        ids = self(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids} if return_dict else ids


def load_fast_tokenizer(folder: Path) -> FastTokenizer | None:
    """`folder`'s tokenizer without transformers, or None when transformers must build it (module docstring).
    Unreadable files are None too: the transformers path reports them."""
    folder = Path(folder)
    if fast_path_refusal(folder) is not None:
        return None
    from tokenizers import Tokenizer, processors
    try:
        # from_str, not from_file: the tokenizers library cannot open a path that is not valid UTF-8
        backend = Tokenizer.from_str((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except Exception:  # the tokenizers library raises its own exception type for a damaged file
        return None
    if backend.get_vocab_size() > MAX_VOCAB:  # with added tokens, as TokenizersBackend.__init__ counts
        return None
    tok_cfg = _json(folder / "tokenizer_config.json")
    special = {k: tok_cfg[k] for k in SPECIAL_TOKENS if tok_cfg.get(k) is not None}
    added = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    for token in special.values():
        a = added.get(token)
        if a is None or not a.special or a.normalized:
            return None  # TokenizersBackend would add or re-flag it
    backend.encode_special_tokens = False
    if backend.post_processor is None:  # TokenizersBackend.update_post_processor, add_bos/add_eos false
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    template_file = folder / "chat_template.jinja"
    try:
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else tok_cfg.get("chat_template")
    except (OSError, UnicodeDecodeError):
        return None
    return FastTokenizer(backend, special, template)


_TEMPLATES: dict = {}


def _compile(source: str):
    """`source` compiled as transformers compiles chat templates (module docstring), cached per source."""
    if source in _TEMPLATES:
        return _TEMPLATES[source]
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: the body as is (transformers tracks its span only when
        asked for assistant masks)."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
