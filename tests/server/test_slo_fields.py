"""ttft_slo_ms / tpot_slo_ms: accepted on completions and chat, handed to the engine as a RequestSLO."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from joule.engine.request import RequestSLO
from joule.llm_engine import LLMEngine
from joule.server.app import ServerConfig, build_app

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine.from_kwargs(model=str(tiny_model_dir), max_model_len=256, kv_cache_memory_bytes=8 * 2**20,
                                 dtype="float32")


@pytest.fixture
def recorded_slos(engine, monkeypatch):
    """The ``slo`` of every request the engine is given, in order."""
    slos = []
    real_add = engine.add_request

    def recording_add(*args, **kwargs):
        slos.append(kwargs.get("slo"))
        return real_add(*args, **kwargs)

    monkeypatch.setattr(engine, "add_request", recording_add)
    return slos


@pytest.fixture
def http(engine):
    with TestClient(build_app(engine, ServerConfig(served_model_names=["tiny"]))) as client:
        yield client


@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_slo_fields_reach_the_engine_in_seconds(http, recorded_slos, path, body):
    assert http.post(path, json={**body, "ttft_slo_ms": 250, "tpot_slo_ms": 40.5}).status_code == 200
    assert http.post(path, json={**body, "tpot_slo_ms": 20}).status_code == 200
    assert http.post(path, json=body).status_code == 200
    assert recorded_slos == [RequestSLO(ttft_seconds=0.25, tpot_seconds=0.0405),
                             RequestSLO(ttft_seconds=None, tpot_seconds=0.02), None]


def test_every_prompt_of_a_batch_carries_the_slo(http, recorded_slos):
    body = {"prompt": ["a", "b", "c"], "max_tokens": 2, "ttft_slo_ms": 100}
    assert http.post("/v1/completions", json=body).status_code == 200
    assert recorded_slos == [RequestSLO(ttft_seconds=0.1)] * 3


def test_openai_client_sends_slos_as_extra_body(http, recorded_slos):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0, http_client=http)
    client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=2,
                                   extra_body={"ttft_slo_ms": 500, "tpot_slo_ms": 50})
    assert recorded_slos == [RequestSLO(ttft_seconds=0.5, tpot_seconds=0.05)]


@pytest.mark.parametrize("field", ["ttft_slo_ms", "tpot_slo_ms"])
@pytest.mark.parametrize("json_value", ["0", "-5", '"fast"', '"100"', "true", "1e999", "[100]"])
@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_bad_slo_values_are_400_naming_the_field(http, recorded_slos, path, body, field, json_value):
    content = json.dumps(body)[:-1] + f', "{field}": {json_value}}}'  # raw JSON: 1e999 is infinity
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert field in error["message"]
    assert recorded_slos == []  # nothing reached the engine
