"""Tool calls and reasoning: the parsers on their own, then a server whose model's chat template renders tools
(started with a tool-call parser and a reasoning parser)."""

from __future__ import annotations

import json

import httpx
import pytest

from joule.server.tool_calls import HermesParser, Llama3JsonParser, tool_mode
from server.live_server import start_server
from server.tiny_server_model import build_tiny_chat_model

# A ChatML template that lists the tools and writes calls in the Hermes style (written for these tests).
TOOL_TEMPLATE = """
{%- if tools %}<|im_start|>system
You may call these tools:
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
To call one, reply <tool_call>{"name": ..., "arguments": {...}}</tool_call>.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>tool ({{ message.tool_call_id }})
{{ message.content }}<|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
FORCED_CALL = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "Oslo", "unit": "C"\}\}</tool_call>'


def test_hermes_parser_splits_content_and_calls():
    parser = HermesParser()
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
            '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>')
    content, calls = parser.parse(text)
    assert content == "Let me look."
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [
        ("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "UTC"})]
    assert len({call.id for call in calls}) == 2
    assert parser.parse("no calls here") == ("no calls here", [])
    assert parser.parse("<tool_call>{not json}</tool_call>")[1] == [], "a malformed call is plain text"
    assert parser.content_end("Sure <tool_") == len("Sure"), "a tag arriving token by token is held back"
    assert parser.content_end("Sure <b>") == len("Sure <b>")


def test_required_calls_survive_a_cut_reply():
    from joule.server.tool_calls import calls_from_required

    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {"y": [1, 2]}}, {"name": "c", "para'
    assert [(call.name, json.loads(call.arguments)) for call in calls_from_required(text)] == [
        ("a", {"x": 1}), ("b", {"y": [1, 2]})]
    assert calls_from_required("[]") == [] and calls_from_required("nothing") == []


def test_earlier_calls_reach_templates_with_arguments_as_objects():
    from joule.server.protocol import ChatMessage
    from joule.server.serving_chat import _template_message

    message = ChatMessage(role="assistant", content=None, tool_calls=[{"id": "c1", "type": "function", "function": {
        "name": "get_time", "arguments": '{"zone": "UTC"}'}}])
    entry = _template_message(message)
    assert entry["content"] is None and entry["tool_calls"][0]["function"]["arguments"] == {"zone": "UTC"}
    assert message.tool_calls[0]["function"]["arguments"] == '{"zone": "UTC"}', "the request is not changed"
    reply = _template_message(ChatMessage(role="tool", content="12:00", tool_call_id="c1"))
    assert reply == {"role": "tool", "content": "12:00", "tool_call_id": "c1"}


def test_llama3_json_parser_reads_one_or_several_calls():
    parser = Llama3JsonParser()
    content, calls = parser.parse('{"name": "get_time", "parameters": {"zone": "CET"}}')
    assert content is None and calls[0].name == "get_time" and json.loads(calls[0].arguments) == {"zone": "CET"}
    _, calls = parser.parse('<|python_tag|>{"name": "a", "parameters": {"s": "x;y"}}; {"name": "b", "parameters": {}}')
    assert [call.name for call in calls] == ["a", "b"] and json.loads(calls[0].arguments) == {"s": "x;y"}
    assert parser.parse("Hello there") == ("Hello there", [])
    assert parser.content_end("  {") == 0 and parser.content_end("Hello") == 5


@pytest.mark.parametrize("tools, tool_choice, parser, message", [
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, None, "tool_choice names function 'nope'"),
    ([WEATHER], "auto", None, "--enable-auto-tool-choice"),
    ([WEATHER], None, None, "--enable-auto-tool-choice"),
    ([{"type": "function", "function": {}}], "required", None, "tools[0].function.name"),
    ([WEATHER], "sometimes", "hermes", "tool_choice must be"),
    (None, "required", None, "tool_choice needs tools"),
])
def test_tool_mode_errors_name_the_field(tools, tool_choice, parser, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        tool_mode(tools, tool_choice, parser)


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    directory = build_tiny_chat_model(tmp_path_factory.mktemp("tiny-tool-model"))
    (directory / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    server = start_server(directory, tmp_path_factory.mktemp("tool-server-logs"), "--enable-auto-tool-choice",
                          "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3")
    yield server
    server.stop()


def _chat(server, **body) -> dict:
    response = httpx.post(server.api_url + "/chat/completions", timeout=60.0,
                          json={"model": "tiny", "messages": [{"role": "user", "content": "Weather in Oslo?"}], **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_named_and_required_tool_choice_always_give_valid_calls(tool_server):
    named = _chat(tool_server, tools=[WEATHER, TIME], max_tokens=40, temperature=1.0, seed=2,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"]
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Oslo")

    # A random model may go on listing calls until max_tokens: the complete ones still come back.
    required = _chat(tool_server, tools=[WEATHER, TIME], max_tokens=60, temperature=1.0, seed=0, n=4,
                     tool_choice="required")
    finishes = [choice["finish_reason"] for choice in required["choices"]]
    assert "tool_calls" in finishes and set(finishes) <= {"tool_calls", "length"}
    for choice in required["choices"]:
        assert choice["message"]["tool_calls"] and choice["message"]["content"] is None
        for call in choice["message"]["tool_calls"]:
            arguments = json.loads(call["function"]["arguments"])
            assert (call["function"]["name"], set(arguments)) in (("get_weather", {"city", "unit"}),
                                                                    ("get_time", {"zone"}))


def test_parallel_tool_calls_false_allows_one_call(tool_server):
    single = _chat(tool_server, tools=[WEATHER, TIME], max_tokens=60, temperature=1.0, seed=1, n=4,
                   tool_choice="required", parallel_tool_calls=False)
    assert all(len(choice["message"]["tool_calls"]) == 1 and choice["finish_reason"] == "tool_calls"
               for choice in single["choices"])
    two_calls = FORCED_CALL + r"\n" + FORCED_CALL.replace("Oslo", "Paris")
    auto = _chat(tool_server, tools=[WEATHER], max_tokens=90, temperature=0.0, guided_regex=two_calls,
                 parallel_tool_calls=False)
    assert [json.loads(call["function"]["arguments"])["city"] for call in auto["choices"][0]["message"]["tool_calls"]] \
        == ["Oslo"]


def test_auto_reads_hermes_calls_streamed_or_not(tool_server):
    body = dict(tools=[WEATHER], max_tokens=60, temperature=0.0, guided_regex="Checking\\. " + FORCED_CALL)
    result = _chat(tool_server, **body)["choices"][0]
    assert result["message"]["content"] == "Checking."
    assert result["message"]["tool_calls"][0]["function"] == {
        "name": "get_weather", "arguments": json.dumps({"city": "Oslo", "unit": "C"})}
    assert result["finish_reason"] == "tool_calls"

    from openai import OpenAI

    client = OpenAI(base_url=tool_server.api_url, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                            stream=True, extra_body={"guided_regex": body["guided_regex"]},
                                            tools=[WEATHER], max_tokens=60, temperature=0.0)
    content, calls, finish = "", [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Checking." and finish == "tool_calls"
    assert [(call.function.name, json.loads(call.function.arguments)) for call in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "C"})]
    assert "<tool_call" not in content


def test_tools_and_tool_results_reach_the_chat_template(tool_server):
    plain = _chat(tool_server, max_tokens=1)["usage"]["prompt_tokens"]
    with_tools = _chat(tool_server, max_tokens=1, tools=[WEATHER], tool_choice="none")
    assert with_tools["usage"]["prompt_tokens"] > plain + 30, "the tool list is in the prompt"
    assert "tool_calls" not in with_tools["choices"][0]["message"]
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call-1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"C\"}"}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "-3 C and snowing"},
    ]
    follow_up = _chat(tool_server, messages=history, max_tokens=1, tools=[WEATHER], tool_choice="none")
    assert follow_up["usage"]["prompt_tokens"] > with_tools["usage"]["prompt_tokens"]


def test_auto_tool_choice_without_a_parser_is_a_clear_400(live_server):
    response = httpx.post(live_server.api_url + "/chat/completions", timeout=30.0, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tool_choice" and "--tool-call-parser" in error["message"]


def test_request_chat_template_and_its_kwargs(live_server):
    template = "{% for m in messages %}{{ m.content }}{% endfor %}{% if shout %} LOUDLY LOUDLY LOUDLY{% endif %}"
    quiet = _chat(live_server, max_tokens=1, chat_template=template)["usage"]["prompt_tokens"]
    loud = _chat(live_server, max_tokens=1, chat_template=template, chat_template_kwargs={"shout": True})
    assert loud["usage"]["prompt_tokens"] > quiet
    default = _chat(live_server, max_tokens=1)["usage"]["prompt_tokens"]
    assert default != quiet, "the model's own template wraps the message in its role markers"
    response = httpx.post(live_server.api_url + "/chat/completions", timeout=30.0, json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"messages": []}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "chat_template_kwargs"


def test_serve_chat_template_flag_reads_a_file_or_a_template(tmp_path):
    from joule.server.cli import read_chat_template

    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}")
    assert read_chat_template(str(path)) == "{{ messages[0].content }}"
    assert read_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}").startswith("{%")
    assert read_chat_template(None) is None
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))


def test_reasoning_goes_apart_from_the_answer_streamed_or_not(tool_server):
    forced = "<think>\nThe user greets me\\.\n</think>\n\nHello there\\!"
    reply = _chat(tool_server, max_tokens=40, temperature=0.0, guided_regex=forced)["choices"][0]["message"]
    assert reply["reasoning_content"] == "The user greets me." and reply["content"] == "Hello there!"
    plain = _chat(tool_server, max_tokens=5, temperature=0.0, guided_regex="Hi you")["choices"][0]["message"]
    assert plain["content"] == "Hi you" and "reasoning_content" not in plain, "no <think>: all answer"

    from openai import OpenAI

    client = OpenAI(base_url=tool_server.api_url, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], stream=True,
                                            max_tokens=40, temperature=0.0, extra_body={"guided_regex": forced})
    thinking = answer = ""
    for chunk in stream:
        delta = chunk.choices[0].delta
        thinking += (delta.model_extra or {}).get("reasoning_content") or ""
        answer += delta.content or ""
    assert "</think" not in thinking and thinking.strip() == "The user greets me." and answer == "Hello there!"
