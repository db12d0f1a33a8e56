"""Chat templates rendered as transformers renders them: a sandboxed Jinja environment with its extensions and
globals, and the message normalisation it applies before rendering.

Kept apart from ``joule.tokenizer`` (which owns encoding and the template files) so each file holds one role.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Message fields that carry reasoning; transformers fills the first two from whichever is set.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Appended to a final message the model should continue, to find where the template's own text begins.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationTag(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` (assistant-mask markers) and renders the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _TemplateDict:
    """``dict(...)`` for templates without exposing the ``dict`` type itself to the sandbox."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A Jinja namespace that refuses underscore attributes, which could reach Python internals."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def make_chat_template_environment() -> ImmutableSandboxedEnvironment:
    """The sandboxed Jinja environment chat templates expect (same options and helpers as transformers)."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_TemplateNamespace,
    )
    return environment


def to_plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types so the sandbox never sees arbitrary objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {to_plain(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [to_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(to_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: to_plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return to_plain(value.model_dump())
    raise TypeError(f"chat template inputs must be JSON-like data, got {type(value).__name__}")


def _join_text_parts(content: Any) -> Any:
    """Content given as OpenAI-style parts becomes one string (text parts joined by newlines, as vLLM does)."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        text = part if isinstance(part, str) else part.get("text") if isinstance(part, Mapping) else None
        if not isinstance(text, str) or (isinstance(part, Mapping) and part.get("type", "text") != "text"):
            raise ValueError(f"only text content parts are supported in chat messages, got {part!r}")
        texts.append(text)
    return "\n".join(texts)


def normalize_messages(conversation: Any) -> list[dict]:
    if hasattr(conversation, "messages"):
        conversation = conversation.messages
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise TypeError("messages must be a list of message dicts")
    if not conversation:
        raise ValueError("cannot apply a chat template to an empty conversation")
    messages = []
    for raw in conversation:
        message = to_plain(raw)
        if not isinstance(message, dict):
            raise TypeError(f"each chat message must be a dict, got {raw!r}")
        # OpenAI-style clients send null fields; templates handle a missing key but not a None.
        message = {key: value for key, value in message.items() if value is not None}
        if "content" in message:
            message["content"] = _join_text_parts(message["content"])
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        messages.append(message)
    return messages


def cut_at_continue_tag(rendered: str, final_text: str) -> str:
    """Drop what the template wrote after the final message so the model continues it."""
    tag = CONTINUE_TAG.strip()
    if final_text.strip() not in rendered or tag not in rendered:
        raise ValueError("continue_final_message is set but the chat template dropped the final message text")
    location = rendered.rindex(tag)
    if rendered[location : location + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return rendered[:location]
    return rendered[:location].rstrip()
