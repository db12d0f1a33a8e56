"""Thinking apart from the answer: the <think> parsers, and replies split whole or while they stream."""

from __future__ import annotations

import json

import pytest

from joule.server.chat_replies import ReplySplitter
from joule.server.reasoning import make_reasoning_parser
from joule.server.tool_calls import tool_mode

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("name, text, expected", [
    ("qwen3", "<think>\nAdd them.\n</think>\n\nIt is 4.", ("Add them.", "It is 4.")),
    ("qwen3", "It is 4.", (None, "It is 4.")),
    ("qwen3", "<think>cut short", ("cut short", None)),
    ("deepseek_r1", "Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("deepseek_r1", "<think>Add them.</think>It is 4.", ("Add them.", "It is 4.")),
    ("deepseek_r1", "still thinking", ("still thinking", None)),
])
def test_whole_replies_split(name, text, expected):
    assert make_reasoning_parser(name).split(text) == expected


def _stream(splitter: ReplySplitter, text: str, piece: int = 3):
    """Feed ``text`` a few characters at a time; the parts each step sends, joined."""
    thinking, answer, calls = "", "", []
    for end in range(piece, len(text) + piece, piece):
        parts = splitter.advance(0, text[:end], finished=end >= len(text))
        thinking += parts.reasoning or ""
        answer += parts.content or ""
        calls += parts.calls or []
    return thinking, answer, calls


@pytest.mark.parametrize("piece", [1, 2, 5])
def test_streamed_parts_join_to_the_whole_split(piece):
    text = "<think>\nLet me see: 2 + 2.\n</think>\n\nIt is 4, surely."
    thinking, answer, _ = _stream(ReplySplitter(make_reasoning_parser("qwen3"), None, 1), text, piece)
    assert thinking.strip() == "Let me see: 2 + 2." and "<" not in thinking
    assert answer == "It is 4, surely."


def test_thinking_then_a_tool_call_streamed():
    tools = tool_mode([WEATHER], "auto", "hermes")
    text = ('<think>Need the weather.</think>\n\nChecking. <tool_call>{"name": "get_weather", '
            '"arguments": {"city": "Oslo"}}</tool_call>')
    splitter = ReplySplitter(make_reasoning_parser("qwen3"), tools, 1)
    thinking, answer, calls = _stream(splitter, text)
    assert thinking == "Need the weather." and answer == "Checking."
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("get_weather", {"city": "Oslo"})]
    whole = ReplySplitter(make_reasoning_parser("qwen3"), tools, 1).whole(text)
    assert (whole.reasoning, whole.content, whole.calls[0].name) == ("Need the weather.", "Checking.", "get_weather")


def test_unknown_reasoning_parser_is_refused():
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        make_reasoning_parser("o1")
