"""Export the tokenizer stored in a GGUF file as Hugging Face tokenizer files.

A GGUF file carries no ``tokenizer.json``: only llama.cpp metadata (tokens, merges, token types,
special ids, the chat template). The rest of Joule loads tokenizers from a Hugging Face-style
directory, so the GGUF converter calls :func:`write_tokenizer_files` to rebuild that directory.

Two llama.cpp tokenizer models are supported:

* ``gpt2``: byte-level BPE. The ``tokenizer.ggml.pre`` flavour says how text is split into words
  before BPE, which must match the split the merges were trained with or ids drift.
* ``llama``: SentencePiece-style BPE with scores, byte fallback (``<0xNN>`` tokens) and the ``▁``
  word-boundary marker.

Anything else raises ``ValueError`` rather than producing a tokenizer that silently gives wrong ids.
"""

from __future__ import annotations

import enum
import json
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# Word-split regexes of the byte-level flavours that do not use plain GPT-2 splitting.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SPIECE_UNDERLINE = "\u2581"


class TokenType(enum.IntEnum):
    """llama.cpp's ``tokenizer.ggml.token_type`` values."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class GGUFTokenizerSpec:
    """The tokenizer metadata of a GGUF file, read once into plain Python values."""

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    extra_eos_ids: list[int]
    add_bos: bool | None
    add_eos: bool | None
    add_space_prefix: bool | None
    chat_templates: dict[str, str] = field(default_factory=dict)

    def token(self, token_id: int | None) -> str | None:
        """The token text for an optional id; ``None`` for a missing or out-of-range id."""
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id]


def _field(reader: gguf.GGUFReader, key: str):
    """The decoded value of a metadata key, or ``None`` when the file lacks it."""
    found = reader.fields.get(key)
    return None if found is None else found.contents()


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


def read_tokenizer_spec(reader: gguf.GGUFReader) -> GGUFTokenizerSpec:
    """Read every tokenizer-related key of a GGUF file."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF file has no tokenizer.ggml.tokens; it does not embed a tokenizer")
    model = _field(reader, "tokenizer.ggml.model")
    token_types = _field(reader, "tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if len(token_types) != len(tokens):
        raise ValueError(
            f"GGUF tokenizer has {len(tokens)} tokens but {len(token_types)} token types; the file is inconsistent"
        )
    templates: dict[str, str] = {}
    default_template = _field(reader, "tokenizer.chat_template")
    if default_template:
        templates["default"] = default_template
    for name in _field(reader, "tokenizer.chat_templates") or []:
        template = _field(reader, f"tokenizer.chat_template.{name}")
        if template:
            templates[name] = template
    extra_eos = [
        int(value)
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if (value := _field(reader, key)) is not None
    ]
    return GGUFTokenizerSpec(
        model=model,
        pre=_field(reader, "tokenizer.ggml.pre"),
        tokens=list(tokens),
        token_types=[int(kind) for kind in token_types],
        scores=_field(reader, "tokenizer.ggml.scores"),
        merges=_field(reader, "tokenizer.ggml.merges"),
        bos_id=_optional_int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_id=_optional_int(_field(reader, "tokenizer.ggml.eos_token_id")),
        unk_id=_optional_int(_field(reader, "tokenizer.ggml.unknown_token_id")),
        pad_id=_optional_int(_field(reader, "tokenizer.ggml.padding_token_id")),
        extra_eos_ids=extra_eos,
        add_bos=_field(reader, "tokenizer.ggml.add_bos_token"),
        add_eos=_field(reader, "tokenizer.ggml.add_eos_token"),
        add_space_prefix=_field(reader, "tokenizer.ggml.add_space_prefix"),
        chat_templates=templates,
    )


def _first_id_vocab(tokens: list[str]) -> dict[str, int]:
    """Token -> id; a duplicated token keeps its first id, as llama.cpp's lookup does."""
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    return vocab


def _split_merges(merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        left, separator, right = merge.partition(" ")
        if not separator:
            raise ValueError(f"GGUF merge {merge!r} is not two tokens separated by a space")
        pairs.append((left, right))
    return pairs


def _byte_level_pre_tokenizer(split_regex: str | None, individual_digits: bool = False):
    steps = []
    if individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split_regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


@dataclass(frozen=True)
class _ByteLevelFlavour:
    """How one ``tokenizer.ggml.pre`` flavour splits and normalizes text before byte-level BPE."""

    pre_tokenizer: Callable[[], object]
    normalizer: Callable[[], object | None] = lambda: None
    ignore_merges: bool = False


_GPT2_FLAVOUR = _ByteLevelFlavour(lambda: _byte_level_pre_tokenizer(None))
_DIGITS_FLAVOUR = _ByteLevelFlavour(lambda: _byte_level_pre_tokenizer(None, individual_digits=True))
_LLAMA3_FLAVOUR = _ByteLevelFlavour(lambda: _byte_level_pre_tokenizer(_LLAMA3_SPLIT), ignore_merges=True)
_QWEN2_FLAVOUR = _ByteLevelFlavour(lambda: _byte_level_pre_tokenizer(_QWEN2_SPLIT), normalizer=normalizers.NFC)

BYTE_LEVEL_FLAVOURS: dict[str | None, _ByteLevelFlavour] = {
    None: _GPT2_FLAVOUR,
    "default": _GPT2_FLAVOUR,
    "gpt-2": _GPT2_FLAVOUR,
    "gpt2": _GPT2_FLAVOUR,
    # SmolLM and StarCoder split every digit on its own, then apply GPT-2 splitting.
    "smollm": _DIGITS_FLAVOUR,
    "starcoder": _DIGITS_FLAVOUR,
    "llama3": _LLAMA3_FLAVOUR,
    "llama-v3": _LLAMA3_FLAVOUR,
    "llama-bpe": _LLAMA3_FLAVOUR,
    "smaug-bpe": _LLAMA3_FLAVOUR,
    "dbrx": _LLAMA3_FLAVOUR,
    "falcon3": _LLAMA3_FLAVOUR,
    "qwen2": _QWEN2_FLAVOUR,
    "deepseek-r1-qwen": _QWEN2_FLAVOUR,
}


def _byte_level_tokenizer(spec: GGUFTokenizerSpec) -> Tokenizer:
    if spec.pre not in BYTE_LEVEL_FLAVOURS:
        known = sorted(name for name in BYTE_LEVEL_FLAVOURS if name)
        raise ValueError(
            f"GGUF byte-level tokenizer has pre-tokenizer flavour {spec.pre!r}, which Joule does not know; "
            f"supported flavours: {known}"
        )
    if not spec.merges:
        raise ValueError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    flavour = BYTE_LEVEL_FLAVOURS[spec.pre]
    bpe = models.BPE(
        vocab=_first_id_vocab(spec.tokens),
        merges=_split_merges(spec.merges),
        ignore_merges=flavour.ignore_merges,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = flavour.normalizer()
    tokenizer.pre_tokenizer = flavour.pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _merges_from_scores(spec: GGUFTokenizerSpec) -> list[tuple[str, str]]:
    """Recover BPE merges from SentencePiece scores: a pair's rank is the score of the piece it makes.

    Older llama GGUF files store no merges; SentencePiece merges the adjacent pair whose
    concatenation scores highest, which is what ranking merges by that score reproduces.
    """
    vocab = _first_id_vocab(spec.tokens)
    scores = spec.scores or [0.0] * len(spec.tokens)
    ranked = []
    for token_id, token in enumerate(spec.tokens):
        if spec.token_types[token_id] != TokenType.NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_tokenizer(spec: GGUFTokenizerSpec) -> Tokenizer:
    add_space_prefix = True if spec.add_space_prefix is None else bool(spec.add_space_prefix)
    merges = _split_merges(spec.merges) if spec.merges else _merges_from_scores(spec)
    bpe = models.BPE(
        vocab=_first_id_vocab(spec.tokens),
        merges=merges,
        unk_token=spec.token(spec.unk_id),
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPIECE_UNDERLINE, prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


_BUILDERS: dict[str, Callable[[GGUFTokenizerSpec], Tokenizer]] = {
    "gpt2": _byte_level_tokenizer,
    "llama": _sentencepiece_tokenizer,
}


def _default_add_bos(spec: GGUFTokenizerSpec) -> bool:
    # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise.
    if spec.add_bos is not None:
        return bool(spec.add_bos)
    return spec.model == "llama"


def _post_processor(spec: GGUFTokenizerSpec, add_bos: bool, add_eos: bool):
    bos, eos = spec.token(spec.bos_id), spec.token(spec.eos_id)
    single, special = ["$A:0"], []
    if add_bos and bos is not None:
        single.insert(0, f"{bos}:0")
        special.append((bos, spec.bos_id))
    if add_eos and eos is not None:
        single.append(f"{eos}:0")
        special.append((eos, spec.eos_id))
    pair = single + [item.replace("$A", "$B").replace(":0", ":1") for item in single]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


def build_tokenizer(spec: GGUFTokenizerSpec) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` a GGUF tokenizer spec describes."""
    builder = _BUILDERS.get(spec.model)
    if builder is None:
        raise ValueError(
            f"GGUF tokenizer model {spec.model!r} is not supported; supported models: {sorted(_BUILDERS)}"
        )
    tokenizer = builder(spec)
    added = []
    for token, kind in zip(spec.tokens, spec.token_types):
        if kind in (TokenType.CONTROL, TokenType.UNKNOWN):
            added.append(AddedToken(token, special=True, normalized=False))
        elif kind == TokenType.USER_DEFINED:
            added.append(AddedToken(token, special=False, normalized=False))
    special_ids = {spec.bos_id, spec.eos_id, spec.unk_id, spec.pad_id} - {None}
    for token_id in sorted(special_ids):
        token = spec.token(token_id)
        if token is not None and spec.token_types[token_id] not in (TokenType.CONTROL, TokenType.UNKNOWN):
            added.append(AddedToken(token, special=True, normalized=False))
    if added:
        tokenizer.add_tokens(added)
    tokenizer.post_processor = _post_processor(spec, _default_add_bos(spec), bool(spec.add_eos))
    return tokenizer


def _added_tokens_decoder(tokenizer: Tokenizer) -> dict[str, dict]:
    return {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }


def tokenizer_config(spec: GGUFTokenizerSpec, tokenizer: Tokenizer) -> dict:
    """The ``tokenizer_config.json`` contents matching :func:`build_tokenizer`'s tokenizer."""
    config: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": _default_add_bos(spec),
        "add_eos_token": bool(spec.add_eos),
        "clean_up_tokenization_spaces": False,
        "bos_token": spec.token(spec.bos_id),
        "eos_token": spec.token(spec.eos_id),
        "unk_token": spec.token(spec.unk_id),
        "pad_token": spec.token(spec.pad_id),
        "added_tokens_decoder": _added_tokens_decoder(tokenizer),
    }
    templates = spec.chat_templates
    if list(templates) == ["default"]:
        config["chat_template"] = templates["default"]
    elif templates:
        config["chat_template"] = [{"name": name, "template": text} for name, text in templates.items()]
    return config


def generation_config(spec: GGUFTokenizerSpec) -> dict:
    """``generation_config.json``: every id that ends generation, not just the tokenizer's EOS."""
    eos_ids = []
    for token_id in [spec.eos_id, *spec.extra_eos_ids]:
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    config: dict = {"bos_token_id": spec.bos_id}
    config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None)
    if spec.pad_id is not None:
        config["pad_token_id"] = spec.pad_id
    return config


def write_tokenizer_files(reader: gguf.GGUFReader, out_dir: pathlib.Path) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` into ``out_dir``.

    ``generation_config.json`` is only rewritten for the bos/eos/pad keys, so a file the model
    converter already wrote keeps its sampling defaults.
    """
    out_dir = pathlib.Path(out_dir)
    spec = read_tokenizer_spec(reader)
    tokenizer = build_tokenizer(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(spec, tokenizer))
    generation_path = out_dir / "generation_config.json"
    existing = json.loads(generation_path.read_text(encoding="utf-8")) if generation_path.exists() else {}
    _write_json(generation_path, {**existing, **generation_config(spec)})


def _write_json(path: pathlib.Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
