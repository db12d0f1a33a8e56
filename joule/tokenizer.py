"""Tokenizer loading, encoding/decoding and chat templates, compatible with Hugging Face files.

Joule serves a vLLM-compatible API, so prompts must tokenize to exactly the ids that
``transformers.AutoTokenizer`` gives for the same directory, and chat templates must render to the
identical string. We wrap the Rust ``tokenizers`` backend directly (fast, no transformers import at
serving time) and reproduce the few places where transformers adds behaviour: which tokens count
as special, and how the Jinja chat template is rendered (the environment: ``joule.chat_template``).

BOS/EOS: when ``tokenizer.json`` exists, transformers (v5) ignores ``add_bos_token`` and
``add_eos_token`` in ``tokenizer_config.json``; the file's post-processor alone decides. So do we.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jinja2
import tokenizers

from joule.chat_template import (
    CONTINUE_TAG,
    cut_at_continue_tag,
    make_chat_template_environment,
    normalize_messages,
    to_plain,
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
_MAX_COMPILED_TEMPLATES = 32
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# The named special tokens transformers exposes to chat templates, in its order.
NAMED_SPECIAL_TOKENS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)


class MissingChatTemplateError(ValueError):
    """The model ships no chat template, so chat requests cannot be turned into a prompt."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _token_content(value: Any) -> str | None:
    """A special token given as a string or as a serialized ``AddedToken`` dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token must be a string or a dict with 'content', got {value!r}")


def _added_token(value: Any) -> tokenizers.AddedToken:
    """An ``AddedToken`` for a configured special token; plain strings are special and unnormalized."""
    if isinstance(value, str):
        return tokenizers.AddedToken(value, special=True, normalized=False)
    options = {key: value[key] for key in ("lstrip", "rstrip", "single_word", "normalized") if key in value}
    return tokenizers.AddedToken(value["content"], special=True, **options)


def _chat_templates(directory: Path, config: Mapping) -> dict[str, str]:
    """Named chat templates; template files take precedence over the config, as in transformers."""
    from_files: dict[str, str] = {}
    default_file = directory / CHAT_TEMPLATE_FILE
    if default_file.is_file():
        from_files["default"] = default_file.read_text(encoding="utf-8")
    extra_dir = directory / CHAT_TEMPLATE_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            from_files[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if from_files:
        return from_files
    template = config.get("chat_template")
    if template is None:
        return {}
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, list):
        return {entry["name"]: entry["template"] for entry in template}
    raise ValueError(f"chat_template in {directory / TOKENIZER_CONFIG_FILE} must be a string or a list")


def _eos_ids(value: Any) -> list[int]:
    if value is None or isinstance(value, int):
        return [] if value is None else [value]
    if isinstance(value, list) and all(isinstance(item, int) for item in value):
        return list(value)
    raise ValueError(f"eos_token_id in {GENERATION_CONFIG_FILE} must be an int or a list of ints, got {value!r}")


# transformers' optional space clean-up for WordPiece-style output (" ." -> ".").
_CLEAN_UP_REPLACEMENTS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    """A Hugging Face fast tokenizer plus the config that changes how it behaves.

    Build with :meth:`from_pretrained`; results match ``transformers.AutoTokenizer`` for the same files.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        generation_eos_token_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
    ) -> None:
        self.backend = backend
        self.special_tokens = {name: (special_tokens or {}).get(name) for name in NAMED_SPECIAL_TOKENS}
        self.chat_templates = dict(chat_templates or {})
        self.name_or_path = name_or_path
        self._generation_eos_ids = tuple(generation_eos_token_ids)
        # transformers skips this clean-up for BPE models because it corrupts their output.
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        self._environment = make_chat_template_environment()
        self._compiled: dict[str, jinja2.Template] = {}
        self._single_token_text: dict[bool, dict[int, str]] = {False: {}, True: {}}  # decode_one's cache

    def __getstate__(self) -> dict:
        # The compiled chat templates and their sandbox do not pickle; a copy builds its own (the
        # server's engine process hands its tokenizer to the API process this way).
        state = dict(self.__dict__)
        del state["_environment"], state["_compiled"], state["_single_token_text"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._environment = make_chat_template_environment()
        self._compiled = {}
        self._single_token_text = {False: {}, True: {}}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` with its ``tokenizer_config.json`` and ``generation_config.json``."""
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"tokenizer directory {directory} has no {TOKENIZER_FILE} (expected {tokenizer_file}); "
                "Joule needs a Hugging Face fast-tokenizer file"
            )
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        # transformers only pads/truncates when a call asks for it; a bare encode does neither.
        backend.no_truncation()
        backend.no_padding()
        config = _read_json(directory / TOKENIZER_CONFIG_FILE)
        if "added_tokens_decoder" not in config:
            # Older repos keep special tokens in a separate file.
            config = {**_read_json(directory / SPECIAL_TOKENS_MAP_FILE), **config}
        _add_configured_tokens(backend, config)
        special = {name: _token_content(config.get(name)) for name in NAMED_SPECIAL_TOKENS}
        generation = _read_json(directory / GENERATION_CONFIG_FILE)
        return cls(
            backend,
            special_tokens=special,
            chat_templates=_chat_templates(directory, config),
            generation_eos_token_ids=_eos_ids(generation.get("eos_token_id")),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            name_or_path=str(directory),
        )

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``; ``add_special_tokens`` adds BOS/EOS as the model's config asks."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids``; bytes of an incomplete UTF-8 character come out as U+FFFD."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for before, after in _CLEAN_UP_REPLACEMENTS:
                text = text.replace(before, after)
        return text

    def decode_one(self, token_id: int, skip_special_tokens: bool = False) -> str:
        """``decode([token_id])``, remembered: the incremental detokenizer decodes every output token on its
        own once (as the context of the next), ~1 us a call in the backend (at most one entry per vocabulary id)."""
        cache = self._single_token_text[skip_special_tokens]
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = self.decode([token_id], skip_special_tokens)
        return text

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | None | list[str | None]:
        """Vocabulary strings of ids (byte-level tokens stay in their byte alphabet, e.g. ``Ġ``)."""
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(token_id) for token_id in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(token) for token in tokens]

    # -- vocabulary and special tokens -----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len()`` of a transformers tokenizer)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: the tokenizer's EOS plus generation_config's eos ids."""
        ids = set(self._generation_eos_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        return frozenset(ids)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` drops (all special added tokens)."""
        added = self.backend.get_added_tokens_decoder()
        return sorted(token_id for token_id, token in added.items() if token.special)

    # -- chat templates --------------------------------------------------------------------------
    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template text: a name among the model's templates, a literal template, or the default."""
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if not self.chat_templates:
            raise MissingChatTemplateError(
                f"the model at {self.name_or_path or '<in memory>'} has no chat template "
                "(no chat_template in tokenizer_config.json and no chat_template.jinja); "
                "pass a template explicitly or use the completions API"
            )
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if len(self.chat_templates) == 1:
            return next(iter(self.chat_templates.values()))
        raise MissingChatTemplateError(
            f"the model has several chat templates and none named 'default': {sorted(self.chat_templates)}"
        )

    def apply_chat_template(
        self,
        messages: Any,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: list[dict] | None = None,
        *,
        chat_template: str | None = None,
        documents: list[dict] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation into the prompt string (or its ids, encoded without added BOS/EOS)."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        template = self.get_chat_template(chat_template, tools)
        compiled = self._compiled.get(template)
        if compiled is None:
            if len(self._compiled) >= _MAX_COMPILED_TEMPLATES:  # templates sent with requests must not pile up
                self._compiled.pop(next(iter(self._compiled)))
            compiled = self._compiled[template] = self._environment.from_string(template)
        chat = normalize_messages(messages)
        final_text = None
        if continue_final_message:
            final_text = chat[-1].get("content")
            if not isinstance(final_text, str):
                raise ValueError("continue_final_message needs a final message with text content")
            chat[-1]["content"] = final_text + CONTINUE_TAG
        named = {name: token for name, token in self.special_tokens.items() if token is not None}
        rendered = compiled.render(
            messages=chat,
            tools=to_plain(list(tools)) if tools is not None else None,
            documents=to_plain(documents),
            add_generation_prompt=add_generation_prompt,
            **{**named, **to_plain(kwargs)},
        )
        if final_text is not None:
            rendered = cut_at_continue_tag(rendered, final_text)
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered


def _add_configured_tokens(backend: tokenizers.Tokenizer, config: Mapping) -> None:
    """Register the config's added and special tokens with the backend, as transformers does on load."""
    present = {(token.content, token.special) for token in backend.get_added_tokens_decoder().values()}
    decoder = config.get("added_tokens_decoder") or {}
    missing = []
    for _, entry in sorted(decoder.items(), key=lambda item: int(item[0])):
        if (entry["content"], bool(entry.get("special", False))) not in present:
            options = {key: entry[key] for key in ("lstrip", "rstrip", "single_word", "normalized", "special")
                       if key in entry}
            missing.append(tokenizers.AddedToken(entry["content"], **options))
    if missing:
        backend.add_tokens(missing)
    named = [config[name] for name in NAMED_SPECIAL_TOKENS if config.get(name) is not None]
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
    if isinstance(extra, Mapping):  # model-specific named tokens, e.g. {"image_token": "<image>"}
        extra = list(extra.values())
    special = [_added_token(value) for value in [*named, *extra]]
    present = {(token.content, token.special) for token in backend.get_added_tokens_decoder().values()}
    special = [token for token in special if (token.content, True) not in present]
    if special:
        backend.add_special_tokens(special)
