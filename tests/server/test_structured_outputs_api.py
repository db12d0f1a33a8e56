"""Structured outputs through the API: OpenAI's response_format, vLLM's structured_outputs and guided_* fields,
streamed or not; the tiny random model's text always matches."""

from __future__ import annotations

import json
import re

import httpx

MOOD = {
    "type": "object",
    "properties": {"mood": {"enum": ["happy", "sad"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["mood", "score"],
    "additionalProperties": False,
}


def _check_mood(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"mood", "score"} and value["mood"] in ("happy", "sad") and 0 <= value["score"] <= 9


def test_chat_response_format_json_schema_streamed_or_not(client):
    response_format = {"type": "json_schema", "json_schema": {"name": "mood", "schema": MOOD, "strict": True}}
    messages = [{"role": "user", "content": "How do you feel?"}]
    result = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0.9,
                                            seed=3, response_format=response_format)
    _check_mood(result.choices[0].message.content)
    assert result.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0.9,
                                            seed=3, response_format=response_format, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == result.choices[0].message.content


def test_completion_guided_fields_and_structured_outputs(client):
    choice = client.completions.create(model="tiny", prompt="Pick one:", max_tokens=10, temperature=1.0, seed=1,
                                       extra_body={"guided_choice": ["alpha", "beta", "gamma"]})
    assert choice.choices[0].text in ("alpha", "beta", "gamma")
    regex = client.completions.create(model="tiny", prompt="Code:", max_tokens=10, n=2, temperature=1.0, seed=2,
                                      extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", item.text) for item in regex.choices)
    schema = client.completions.create(model="tiny", prompt="JSON:", max_tokens=40, temperature=0.0,
                                       extra_body={"guided_json": json.dumps(MOOD)})
    _check_mood(schema.choices[0].text)


def test_response_format_text_is_plain_generation(live_server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0.0}
    plain = httpx.post(live_server.api_url + "/chat/completions", json=body, timeout=60.0).json()
    text = httpx.post(live_server.api_url + "/chat/completions", timeout=60.0,
                      json={**body, "response_format": {"type": "text"}}).json()
    assert text["choices"][0]["message"] == plain["choices"][0]["message"]
