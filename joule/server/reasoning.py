"""Reasoning models' thinking apart from their answer, as vLLM's ``--reasoning-parser`` does: the text inside
``<think>...</think>`` goes to ``reasoning_content``, the rest to ``content``.

``qwen3``: a reply that opens with ``<think>`` thinks until ``</think>``; one that does not (``enable_thinking``
off) is all answer. ``deepseek_r1``: the chat template opens the tag, so a reply thinks from its first token until
``</think>`` (and, cut short before it, is all thinking).
"""

from __future__ import annotations

from dataclasses import dataclass

REASONING_PARSERS = ("deepseek_r1", "qwen3")
START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningSpans:
    """Where a reply's thinking and answer lie so far: ``text[reasoning_start:reasoning_end]`` is surely thinking,
    ``text[content_start:]`` answer (None: no answer has begun, or it is not yet known whether one has)."""

    reasoning_start: int
    reasoning_end: int
    content_start: int | None


class ThinkTagParser:
    def __init__(self, opened_by_template: bool) -> None:
        self.opened_by_template = opened_by_template

    def spans(self, text: str, finished: bool) -> ReasoningSpans:
        leading = len(text) - len(text.lstrip())
        body = text[leading:]
        if body.startswith(START):
            start = leading + len(START)
        elif self.opened_by_template:
            start = 0
        elif not finished and START.startswith(body):  # "<thi" may still become "<think>"
            return ReasoningSpans(0, 0, None)
        else:
            return ReasoningSpans(0, 0, 0)  # no thinking: all answer
        end = text.find(END, start)
        if end >= 0:
            return ReasoningSpans(start, end, end + len(END))
        held = 0 if finished else partial_suffix(text, END)
        return ReasoningSpans(start, max(start, len(text) - held), None)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, answer) of a whole reply, each stripped, None when empty."""
        spans = self.spans(text, finished=True)
        reasoning = text[spans.reasoning_start:spans.reasoning_end].strip() or None
        content = text[spans.content_start:].strip() if spans.content_start is not None else ""
        return reasoning, content or None


def make_reasoning_parser(name: str) -> ThinkTagParser:
    if name not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, got {name!r}.")
    return ThinkTagParser(opened_by_template=name == "deepseek_r1")


def partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return keep
    return 0
