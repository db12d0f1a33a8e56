"""Tool calls in chat completions, as vLLM serves them.

``tool_choice`` named or ``"required"``: the output is constrained (structured outputs) to the named function's
arguments, or to a JSON list of ``{"name", "parameters"}`` objects, so the calls always parse. ``"auto"``: the
model decides, and its text is read by the parser named with ``--tool-call-parser``: ``hermes`` (Qwen 2.5 / 3,
Hermes: ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``) or ``llama3_json`` (Llama 3.1+: the whole
reply is ``{"name": ..., "parameters": ...}``, calls separated by ``;``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from joule.sampling_params import StructuredOutputsParams
from joule.server.reasoning import partial_suffix

TOOL_CALL_PARSERS = ("hermes", "llama3_json")


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's ``function.arguments``
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"chatcmpl-tool-{uuid.uuid4().hex}"


def check_tools(tools: list[dict]) -> dict[str, dict]:
    """Function name -> its parameters schema; ValueError (starting ``tools``) for a malformed list."""
    functions = {}
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise ValueError(f"tools[{index}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{index}].function.name must be a non-empty string")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise ValueError(f"tools[{index}].function.parameters must be a JSON schema object")
        functions[name] = parameters
    return functions


def chosen_function(tool_choice, functions: dict[str, dict]) -> str | None:
    """The function a named ``tool_choice`` forces, or None; ValueError (starting ``tool_choice``) if unknown."""
    if not isinstance(tool_choice, dict):
        return None
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
        raise ValueError('tool_choice must be "none", "auto", "required" or '
                         '{"type": "function", "function": {"name": ...}}')
    if name not in functions:
        raise ValueError(f"tool_choice names function {name!r}, which is not among tools: {sorted(functions)}")
    return name


def required_constraint(functions: dict[str, dict], parallel: bool = True) -> StructuredOutputsParams:
    """At least one call (exactly one unless ``parallel``), each to one of ``functions`` with arguments matching
    its schema (vLLM's shape)."""
    call = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
             "required": ["name", "parameters"], "additionalProperties": False}
            for name, schema in functions.items()]
    calls = {"type": "array", "minItems": 1, "items": {"anyOf": call}}
    if not parallel:
        calls["maxItems"] = 1
    return StructuredOutputsParams(json=calls)


def calls_from_required(text: str) -> list[ParsedToolCall]:
    """The calls of a reply constrained by ``required_constraint``; of one cut short (``max_tokens``), those
    complete before the cut."""
    decoder, calls = json.JSONDecoder(), []
    position = text.find("[") + 1
    while 0 < position < len(text):
        while position < len(text) and text[position] in " ,\n":
            position += 1
        try:
            item, position = decoder.raw_decode(text, position)
        except ValueError:
            break
        if isinstance(item, dict) and isinstance(item.get("name"), str) and "parameters" in item:
            calls.append(ParsedToolCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False)))
    return calls


class HermesParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks; the text around them is content."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        if self.OPEN not in text:
            return text, []
        calls = []
        for body in self._BLOCK.findall(text):
            call = _call_from_json(body, "arguments")
            if call is None:
                return text, []  # not a well-formed call: the reply is plain text
            calls.append(call)
        content = text[: text.index(self.OPEN)].strip()
        return (content or None), calls

    def content_end(self, text: str) -> int:
        """How much of ``text`` is surely content: all of it before a (possible start of a) ``<tool_call>``, less
        trailing whitespace (a call's content is sent stripped)."""
        return len(text[: _before_marker(text, self.OPEN)].rstrip())


class Llama3JsonParser:
    """A reply that is one or more ``{"name": ..., "parameters": {...}}`` objects separated by ``;``."""

    PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        body = text.strip().removeprefix(self.PYTHON_TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        for part in _split_top_level(body, ";"):
            call = _call_from_json(part, "parameters") or _call_from_json(part, "arguments")
            if call is None:
                return text, []
            calls.append(call)
        return None, calls

    def content_end(self, text: str) -> int:
        """Nothing streams as content once the reply opens like a call."""
        stripped = text.lstrip()
        if not stripped or stripped[0] == "{" or self.PYTHON_TAG.startswith(stripped[: len(self.PYTHON_TAG)]):
            return 0
        return len(text)


def make_parser(name: str):
    if name == "hermes":
        return HermesParser()
    if name == "llama3_json":
        return Llama3JsonParser()
    raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, got {name!r}.")


def arguments_for_template(tool_calls: list[dict]) -> list[dict]:
    """Assistant tool calls as chat templates read them: ``arguments`` a dict, not JSON text (as vLLM does)."""
    result = []
    for call in tool_calls:
        call = json.loads(json.dumps(call))  # a copy, plain JSON types only
        function = call.get("function")
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"])
            except ValueError:
                pass  # a template may still print the text as it came
        result.append(call)
    return result


def _call_from_json(text: str, arguments_key: str) -> ParsedToolCall | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or arguments_key not in value:
        return None
    arguments = value[arguments_key]
    return ParsedToolCall(value["name"], arguments if isinstance(arguments, str)
                          else json.dumps(arguments, ensure_ascii=False))


def _before_marker(text: str, marker: str) -> int:
    index = text.find(marker)
    if index >= 0:
        return index
    return len(text) - partial_suffix(text, marker)  # a marker may be arriving token by token


def _split_top_level(text: str, separator: str) -> list[str]:
    """``text`` cut at ``separator`` outside JSON strings, objects and arrays."""
    parts, depth, in_string, escaped, start = [], 0, False, False, 0
    for index, char in enumerate(text):
        if in_string:
            escaped, in_string = (not escaped and char == "\\"), in_string and (escaped or char != '"')
            continue
        if char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == separator and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


@dataclass
class ToolMode:
    """How one request's reply becomes tool calls: ``named`` (one forced function), ``required`` (at least one
    call) or ``auto`` (a parser reads the model's own format)."""

    kind: str
    constraint: StructuredOutputsParams | None = None
    function: str | None = None
    parser: HermesParser | Llama3JsonParser | None = None
    parallel: bool = True  # False: a parsed reply keeps its first call only

    def split(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """The reply's content (None when it is all calls) and its calls."""
        if self.kind == "named":
            return None, [ParsedToolCall(self.function, text)]
        if self.kind == "required":
            calls = calls_from_required(text)
            return (None, calls) if calls else (text, [])
        content, calls = self.parser.parse(text)
        return content, calls if self.parallel else calls[:1]

    def content_end(self, text: str) -> int:
        """How much of a reply still being generated can stream as content."""
        return self.parser.content_end(text) if self.kind == "auto" else 0


def tool_mode(tools: list[dict] | None, tool_choice, parser_name: str | None,
              parallel: bool = True) -> ToolMode | None:
    """None when the request asks for no tool calls; ValueError starting with the field at fault otherwise."""
    if not tools or tool_choice == "none":
        if isinstance(tool_choice, (dict, str)) and tool_choice not in ("none", "auto") and not tools:
            raise ValueError("tool_choice needs tools")
        return None
    functions = check_tools(tools)
    named = chosen_function(tool_choice, functions)
    if named is not None:
        return ToolMode("named", StructuredOutputsParams(json=functions[named]), function=named)
    if tool_choice == "required":
        return ToolMode("required", required_constraint(functions, parallel))
    if tool_choice not in (None, "auto"):
        raise ValueError(f'tool_choice must be "none", "auto", "required" or a named function, got {tool_choice!r}')
    if parser_name is None:
        raise ValueError('tool_choice "auto" (the default with tools) needs the server started with '
                         "--enable-auto-tool-choice --tool-call-parser NAME (hermes or llama3_json); "
                         'or pass tool_choice "required", "none" or a named function')
    return ToolMode("auto", parser=make_parser(parser_name), parallel=parallel)
