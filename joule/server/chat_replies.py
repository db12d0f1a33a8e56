"""A chat reply cut into what clients see apart: thinking (``reasoning_content``), answer (``content``) and tool
calls, whole or while it streams.

While a reply streams, text goes out only once it is sure what it is: a ``</think>`` or ``<tool_call>`` that may
be arriving token by token is held back, and a reply's calls go out whole when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from joule.server.reasoning import ReasoningSpans, ThinkTagParser
from joule.server.tool_calls import ParsedToolCall, ToolMode

_ALL_ANSWER = ReasoningSpans(0, 0, 0)


@dataclass
class ReplyParts:
    reasoning: str | None = None
    content: str | None = None
    calls: list[ParsedToolCall] | None = None


class ReplySplitter:
    """Splits the replies of one request (``choices`` of them) with a reasoning parser, a tool mode, or both."""

    def __init__(self, reasoning: ThinkTagParser | None, tools: ToolMode | None, choices: int) -> None:
        self.reasoning, self.tools = reasoning, tools
        self._reasoning_sent = [0] * choices  # per choice: how far into its text thinking went out
        self._content_sent = [0] * choices  # and the answer

    def whole(self, text: str) -> ReplyParts:
        """A finished reply's parts (non-streaming), each stripped, None when empty."""
        reasoning, answer = self.reasoning.split(text) if self.reasoning is not None else (None, text)
        if self.tools is None:
            return ReplyParts(reasoning, answer, None)
        content, calls = self.tools.split(answer or "")
        return ReplyParts(reasoning, content, calls or None)

    def advance(self, choice: int, text: str, finished: bool) -> ReplyParts:
        """What of ``text`` (the reply so far) goes out now; calls only once ``finished``."""
        spans = self.reasoning.spans(text, finished) if self.reasoning is not None else _ALL_ANSWER
        reasoning_from = max(self._reasoning_sent[choice], spans.reasoning_start)
        reasoning = text[reasoning_from:spans.reasoning_end]
        self._reasoning_sent[choice] = max(self._reasoning_sent[choice], spans.reasoning_end)
        if spans.content_start is None:
            return ReplyParts(reasoning or None)
        answer_start = spans.content_start
        if self.reasoning is not None:  # the blank lines after </think> are not part of the answer
            answer_start += len(text[answer_start:]) - len(text[answer_start:].lstrip())
        answer = text[answer_start:]
        calls: list[ParsedToolCall] = []
        if self.tools is None:
            end = len(answer)
        elif not finished:
            end = self.tools.content_end(answer)
        else:
            _, calls = self.tools.split(answer)
            end = self.tools.content_end(answer) if calls else len(answer)
        content_from = max(self._content_sent[choice], answer_start)
        content = text[content_from:answer_start + end]
        self._content_sent[choice] = max(content_from, answer_start + end)
        if calls:
            content = content.rstrip()
        return ReplyParts(reasoning or None, content or None, calls or None)
