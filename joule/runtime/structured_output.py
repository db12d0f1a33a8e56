"""Constrained decoding: which tokens may come next so that the output matches a JSON schema, regex, choice
list or grammar (``StructuredOutputsParams``).

llguidance does the matching (the library vLLM and llama.cpp use too): one ``LLMatcher`` per sampled sequence
says which tokens keep the text inside the grammar, as a bitmask over the vocabulary, and is advanced by every
token sampled. The sampler sets the logits of the others to -inf before drawing (``apply_token_masks``).
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np
import torch

from joule.sampling_params import StructuredOutputsParams


# JSON on one line, as ``json.dumps`` writes it: a small model left free to add whitespace can fill its whole
# output with newlines. A schema's own ``"x-guidance"`` options override this.
JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class TokenConstraint:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, executor=None) -> None:
        self._matcher = matcher
        self.executor = executor  # llguidance's pool, shared by the compiler's constraints

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token. A token the mask allowed never fails; a forced one (the grammar left no
        way on, e.g. EOS banned by ``min_tokens``) leaves the matcher in its error state, which allows only EOS."""
        self._matcher.consume_token(token_id)

    @property
    def matcher(self):
        return self._matcher


class GrammarCompiler:
    """Compiles ``StructuredOutputsParams`` for one tokenizer; its token table (~0.3 s for 49k tokens) is built
    on first use, so engines that never constrain pay nothing."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._tokenizer = None
        self._executor = None

    def _llguidance_tokenizer(self):
        if self._tokenizer is None:
            import llguidance

            self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                     eos_token=self._eos_token_ids or None)
        return self._tokenizer

    def constraint(self, spec: StructuredOutputsParams) -> TokenConstraint:
        """A fresh matcher at the grammar's start; ValueError (naming ``structured_outputs``) when it is invalid."""
        from llguidance import LLMatcher

        grammar = grammar_text(spec)
        matcher = LLMatcher(self._llguidance_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs {spec.kind} is invalid: {_first_line(matcher.get_error())}")
        if self._executor is None:  # llguidance's thread pool: many sequences' masks at once
            from llguidance import LLExecutor

            self._executor = LLExecutor()
        return TokenConstraint(matcher, self._executor)


def grammar_text(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar for ``spec``; ValueError naming ``structured_outputs`` for text it cannot read."""
    from llguidance import LLMatcher, grammar_from

    kind = spec.kind
    try:
        if kind == "json":
            schema = spec.json if isinstance(spec.json, dict) else json.loads(spec.json)
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            return grammar_from("choice", json.dumps(spec.choice))
        return grammar_from("grammar", spec.grammar)  # Lark, or GBNF as llama.cpp writes it
    except ValueError as error:  # json.JSONDecodeError is one
        raise ValueError(f"structured_outputs {kind} is invalid: {_first_line(str(error))}") from None


def apply_token_masks(logits: torch.Tensor, constraints: Sequence[TokenConstraint | None]) -> None:
    """In place: -inf for every token a row's grammar does not allow next (rows without a constraint untouched)."""
    rows = [row for row, constraint in enumerate(constraints) if constraint is not None]
    if not rows:
        return
    executor = constraints[rows[0]].executor
    vocab_size = logits.shape[1]
    words = (vocab_size + 31) // 32
    bitmask = np.full((len(rows), words), -1, dtype=np.int32)
    matchers = [(constraints[row].matcher, position) for position, row in enumerate(rows)]
    if executor is not None and len(matchers) > 1:
        executor.unsafe_compute_mask_ptr(matchers, bitmask.ctypes.data, words * 4, len(rows))
    else:
        for matcher, position in matchers:
            matcher.unsafe_compute_mask_ptr(bitmask[position].ctypes.data, words * 4)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    allowed = torch.from_numpy(bits.astype(bool)).to(logits.device, non_blocking=True)
    index = torch.tensor(rows, dtype=torch.int64).to(logits.device)
    logits[index] = logits[index].masked_fill(~allowed, -math.inf)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"
