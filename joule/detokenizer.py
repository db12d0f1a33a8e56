"""Incremental detokenization with stop strings, following vLLM's streaming semantics.

Decoding the whole output after every token costs O(length) per token, and decoding only the new
token is wrong: byte-level BPE splits characters across tokens, and SentencePiece decoders drop or
add spaces depending on the neighbouring tokens. So, like vLLM, we decode a small window: the tokens
already turned into text (the *prefix*) plus the unread ones, and emit only what the window adds
beyond the prefix's text. The window starts in the prompt so the first output tokens decode in
context (e.g. keep their leading space).

Stop strings may straddle tokens. They are searched for only in new text plus the last
``len(stop) - 1`` characters before it, and while the end of the text could still be the beginning
of a stop string it is held back from the streamed deltas (the full ``text`` always has it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from joule.tokenizer import Tokenizer

# How many prompt tokens give decoding context to the first output tokens.
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class DetokenizerUpdate:
    """What one :meth:`IncrementalDetokenizer.push` produced.

    ``text_delta`` is new text safe to stream; ``stop_string`` is the stop string that ended the
    output during this push, or ``None``.
    """

    text_delta: str
    stop_string: str | None = None


_NO_TEXT = DetokenizerUpdate("")


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text, one push at a time, for one request.

    ``text`` is the output so far (cut at a stop string), ``token_ids`` the ids pushed (up to the
    one that completed a stop string) and ``stop_string`` the stop string that ended it. For
    byte-level tokenizers ``text`` equals ``tokenizer.decode(token_ids)`` once characters are
    complete; SentencePiece output keeps the leading space the prompt context gives it.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
        stream_holdback: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        if any(not isinstance(item, str) or not item for item in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        self.include_stop_str_in_output = include_stop_str_in_output
        self.token_ids: list[int] = []
        self.stop_string: str | None = None
        self._longest_stop = max((len(item) for item in self.stop), default=0)
        # Streamed text that could still turn out to be the start of a (discarded) stop string
        # must wait; with include_stop_str_in_output nothing before a stop is ever discarded.
        self._holds_back = stream_holdback and bool(self.stop) and not include_stop_str_in_output
        # Decoding window: ids[:_read] are already text (their text is _prefix_text), ids[_read:] are not.
        self._window = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_text = self._decode(self._window)
        if self._prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: decoding in its context would mix prompt bytes
            # into the output, so decode the output on its own.
            self._window, self._prefix_text = [], ""
        self._read = len(self._window)
        # Output text as chunks (joined lazily), the part not yet streamed, and the last characters
        # of the text that a stop string starting there could span.
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        self._unsent = ""
        self._tail = ""

    @property
    def text(self) -> str:
        """All output text so far (truncated at a stop string), including held-back characters."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache]
        return self._text_cache

    @property
    def finished(self) -> bool:
        """True once a stop string ended the output."""
        return self.stop_string is not None

    def push(self, new_token_ids: Iterable[int], stop_terminated: bool = False) -> DetokenizerUpdate:
        """Add generated ids; returns the text they complete and the stop string, if one appeared.

        Tokens after the one that completes a stop string are ignored. ``stop_terminated`` says the
        last id is an EOS/stop token: its text is left out unless ``include_stop_str_in_output``.
        """
        if self.finished:
            raise RuntimeError(f"detokenizer already stopped at stop string {self.stop_string!r}")
        if not self.stop and not stop_terminated and type(new_token_ids) is list and len(new_token_ids) == 1:
            # The common case, a token a step with no stop strings: nothing to search for (what the general
            # path below does, without its loop and stop-string checks per token).
            token_id = new_token_ids[0]
            self.token_ids.append(token_id)
            self._window.append(token_id)
            piece = self._read_window()
            if not piece:
                return _NO_TEXT
            self._add_text(piece)
            return DetokenizerUpdate(self._take_sendable())
        new_ids = list(new_token_ids)
        last_index = len(new_ids) - 1
        for index, token_id in enumerate(new_ids):
            self.token_ids.append(token_id)
            if stop_terminated and index == last_index and not self.include_stop_str_in_output:
                break
            self._window.append(token_id)
            piece = self._read_window()
            if piece and self._append(piece):
                break
        return DetokenizerUpdate(self._take_sendable(), self.stop_string)

    def flush(self) -> str:
        """Text still held back; call when the request ends for a reason other than a stop string.

        Ids that decode to an incomplete character are decoded anyway (with U+FFFD), so the final
        ``text`` equals ``tokenizer.decode(token_ids)``.
        """
        if not self.finished and self._read < len(self._window):
            full = self._decode(self._window)
            piece = full[len(self._prefix_text) :]
            self._prefix_text, self._read = full, len(self._window)
            if piece:
                self._append(piece)
        sent, self._unsent = self._unsent, ""
        return sent

    # -- internals -----------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _read_window(self) -> str:
        """Text the unread window tokens add, or "" while they end inside a UTF-8 character."""
        full = self._decode(self._window)
        if len(full) <= len(self._prefix_text) or full.endswith(_REPLACEMENT_CHAR):
            return ""
        piece = full[len(self._prefix_text) :]
        # The newly read tokens become the prefix for the next step; older ones are dropped.
        self._window = window = self._window[self._read :]
        self._read = len(window)
        # Mostly a single token (one a step): its text on its own is remembered by the tokenizer.
        self._prefix_text = (self.tokenizer.decode_one(window[0], self.skip_special_tokens) if len(window) == 1
                             else self._decode(window))
        return piece

    def _append(self, piece: str) -> bool:
        """Add decoded text and look for a stop string in it; returns True when one was found."""
        if not self.stop:
            self._add_text(piece)
            return False
        region = self._tail + piece
        found = self._find_stop(region)
        if found is None:
            self._add_text(piece)
            self._tail = region[-(self._longest_stop - 1) :] if self._longest_stop > 1 else ""
            return False
        position, stop_string = found
        end = position + len(stop_string) if self.include_stop_str_in_output else position
        keep = end - len(self._tail)  # characters of ``piece`` to keep; negative cuts into old text
        if keep >= 0:
            self._add_text(piece[:keep])
        else:
            self._remove_text(-keep)
        self.stop_string = stop_string
        return True

    def _find_stop(self, region: str) -> tuple[int, str] | None:
        """Earliest stop string in ``region``; the text before it cannot hold one (it was searched)."""
        best: tuple[int, str] | None = None
        for stop_string in self.stop:
            position = region.find(stop_string)
            if position != -1 and (best is None or position < best[0]):
                best = (position, stop_string)
        return best

    def _add_text(self, piece: str) -> None:
        if piece:
            self._chunks.append(piece)
            self._text_cache = None
            self._unsent += piece

    def _remove_text(self, count: int) -> None:
        text = self.text[:-count]
        self._chunks, self._text_cache = [text], text
        # With holdback the removed characters were never streamed; without it they may have been.
        self._unsent = self._unsent[: max(len(self._unsent) - count, 0)]

    def _take_sendable(self) -> str:
        """Pop the streamable part of the unsent text, keeping back a possible stop-string start."""
        held = 0 if self.finished or not self._holds_back else self._stop_prefix_length()
        cut = len(self._unsent) - held
        if cut <= 0:
            return ""
        sendable, self._unsent = self._unsent[:cut], self._unsent[cut:]
        return sendable

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the text that is a proper prefix of some stop string."""
        tail = self._tail
        for length in range(min(len(tail), self._longest_stop - 1), 0, -1):
            suffix = tail[-length:]
            if any(len(stop_string) > length and stop_string.startswith(suffix) for stop_string in self.stop):
                return length
        return 0
