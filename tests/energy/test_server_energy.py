"""Energy on the wire: usage.energy_joules, X-Joule-Energy, the streamed trailer and /metrics, on a live server."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server.live_server import start_server
from server.tiny_server_model import build_tiny_chat_model

SOURCES = ("measured", "estimated")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = build_tiny_chat_model(tmp_path_factory.mktemp("energy-chat-model"))
    live = start_server(model_dir, tmp_path_factory.mktemp("energy-server-logs"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60.0) as client:
        yield client


def stream_events(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "The cost of a token", "max_tokens": 6, "ignore_eos": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "ignore_eos": True}),
])
def test_non_streaming_response_has_energy_in_usage_and_header(http, path, body):
    response = http.post(path, json=body)
    assert response.status_code == 200
    usage = response.json()["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["energy_joules"] > 0 and usage["energy_source"] in SOURCES
    assert float(response.headers["X-Joule-Energy"]) == pytest.approx(usage["energy_joules"], rel=1e-5)
    assert response.headers["X-Joule-Energy-Source"] == usage["energy_source"]


def test_multi_prompt_completion_energy_covers_every_prompt(http):
    one = http.post("/v1/completions", json={"prompt": "alpha", "max_tokens": 4, "ignore_eos": True}).json()
    three = http.post("/v1/completions", json={"prompt": ["alpha", "beta", "gamma"], "max_tokens": 4, "n": 2,
                                               "ignore_eos": True, "temperature": 0.5}).json()
    assert len(three["choices"]) == 6 and three["usage"]["completion_tokens"] == 24
    assert three["usage"]["energy_joules"] > 0 and one["usage"]["energy_joules"] > 0


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Stream me", "max_tokens": 5, "ignore_eos": True, "n": 2, "temperature": 0.7}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hey"}], "max_tokens": 5, "ignore_eos": True}),
])
def test_stream_final_chunk_carries_energy_and_usage_chunk_too(http, path, body):
    plain = stream_events(http, path, body)
    assert all("energy_joules" not in chunk for chunk in plain[:-1])
    assert plain[-1]["energy_joules"] > 0 and plain[-1]["energy_source"] in SOURCES
    assert plain[-1]["choices"][0]["finish_reason"] == "length"

    with_usage = stream_events(http, path, {**body, "stream_options": {"include_usage": True}})
    final_content, usage_chunk = with_usage[-2], with_usage[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["energy_joules"] > 0
    assert usage_chunk["usage"]["energy_joules"] == pytest.approx(final_content["energy_joules"])
    assert usage_chunk["usage"]["energy_source"] == final_content["energy_source"]


def test_openai_client_sees_energy_in_usage(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60.0)
    result = client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
    assert result.usage.model_extra["energy_joules"] > 0
    assert result.usage.model_extra["energy_source"] in SOURCES


def test_metrics_report_joules_per_token_and_power(http):
    http.post("/v1/completions", json={"prompt": "metrics please", "max_tokens": 8, "ignore_eos": True})
    families = {family.name: family for family in text_string_to_metric_families(http.get("/metrics").text)}
    total = [s for s in families["joule:energy_joules"].samples if s.name == "joule:energy_joules_total"]
    assert total and all(s.labels["source"] in SOURCES and s.labels["model_name"] == "tiny" for s in total)
    assert sum(s.value for s in total) > 0
    per_token = families["joule:energy_joules_per_output_token"].samples
    counts = [s for s in per_token if s.name.endswith("_count")]
    sums = [s for s in per_token if s.name.endswith("_sum")]
    assert sum(s.value for s in counts) >= 1 and sum(s.value for s in sums) > 0
    watts = families["joule:average_power_watts"].samples
    assert watts and all(s.value > 0 for s in watts)
