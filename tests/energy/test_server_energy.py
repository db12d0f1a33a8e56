"""Energy on the wire: usage.energy_joules, X-Joule-Energy, the streamed trailer and /metrics (on a live server),
and, in process with a scripted meter, /metrics' total against the meter's and the per-tenant energy budget."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from server.live_server import start_server
from server.tiny_server_model import build_tiny_chat_model

from joule.energy.meter import FakeEnergyMeter
from joule.llm_engine import LLMEngine
from joule.sampling_params import RequestOutputKind, SamplingParams
from joule.server.abuse_guard import AbuseGuardConfig
from joule.server.app import ServerConfig, build_app

SOURCES = ("measured", "estimated")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("energy-chat-model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
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


# -- in process, with a scripted meter ------------------------------------------------------------
@pytest.fixture(scope="module")
def metered_engine(model_dir):
    """An engine whose meter counts one joule per read, so every figure is known exactly."""
    meter = FakeEnergyMeter(on_read=lambda fake: fake.add(1.0))
    engine = LLMEngine.from_kwargs(energy_meter=meter, model=str(model_dir), max_model_len=256,
                                   kv_cache_memory_bytes=8 * 2**20, dtype="float32")
    return engine, meter


def metric_values(metrics_text: str, name: str, label: str) -> dict[str, float]:
    return {sample.labels[label]: sample.value for family in text_string_to_metric_families(metrics_text)
            for sample in family.samples if sample.name == name}


def test_metrics_joules_total_is_the_meters_total_including_an_aborted_request(metered_engine):
    engine, meter = metered_engine
    baseline_metered, baseline_unattributed = meter.joules, engine.energy_ledger.totals().unattributed_joules
    roomy_budget = AbuseGuardConfig(tenant_energy_budget=1e9)  # refuses nothing; shows what each tenant was charged
    with TestClient(build_app(engine, ServerConfig(served_model_names=["tiny"], abuse_guard=roomy_budget))) as http:
        finished = [http.post("/v1/completions", json={"prompt": f"finish {i}", "max_tokens": 4, "ignore_eos": True})
                    for i in range(2)]
        finished_joules = sum(response.json()["usage"]["energy_joules"] for response in finished)
        seen_by_aborted = []

        async def abort_after_two_outputs():
            params = SamplingParams(max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            stream = await http.app.state.async_engine.submit([[5, 6, 7, 8]], params, "aborted", tenant="quitter")
            async for _, output in stream:
                seen_by_aborted.append(output.metrics.energy_joules)
                if len(seen_by_aborted) == 2:
                    break
            stream.abort()

        http.portal.call(abort_after_two_outputs)
        for _ in range(200):  # the engine thread publishes the ledger's books after its loop turn
            values = metric_values(http.get("/metrics").text, "joule:energy_joules_total", "source")
            if values.get("measured") == pytest.approx(meter.joules - baseline_metered, abs=1e-9):
                break
            time.sleep(0.05)
        metrics_text = http.get("/metrics").text
        quitter_tokens, quitter_joules = http.app.state.abuse_guard.usage("quitter")
    total = metric_values(metrics_text, "joule:energy_joules_total", "source")
    unattributed = metric_values(metrics_text, "joule:energy_unattributed_joules_total", "source")
    assert set(total) == {"measured"}
    assert total["measured"] == pytest.approx(meter.joules - baseline_metered, abs=1e-9)
    ledger = engine.energy_ledger.totals()
    assert unattributed.get("measured", 0.0) == pytest.approx(ledger.unattributed_joules - baseline_unattributed)
    charged_to_aborted = total["measured"] - unattributed.get("measured", 0.0) - finished_joules
    # the aborted request's joules (at least what its last output showed) are in the total
    assert seen_by_aborted[-1] > 0 and charged_to_aborted >= seen_by_aborted[-1] - 1e-9
    # and its tenant was billed all of them, with its prompt and the tokens generated before the abort
    assert quitter_joules == pytest.approx(charged_to_aborted, rel=1e-9)
    assert quitter_tokens >= 4 + 2
    watts = metric_values(metrics_text, "joule:average_power_watts", "source")
    assert watts["measured"] > 0


def test_tenant_over_its_energy_budget_gets_429(metered_engine):
    engine, _ = metered_engine
    config = ServerConfig(served_model_names=["tiny"], abuse_guard=AbuseGuardConfig(tenant_energy_budget=3.0))
    with TestClient(build_app(engine, config, clock=lambda: 500.0)) as http:
        body = {"prompt": "burn", "max_tokens": 6, "ignore_eos": True}
        first = http.post("/v1/completions", json={**body, "user": "hungry"}).json()
        spent = first["usage"]["energy_joules"]
        assert spent >= 3.0  # two meter reads per step, six steps at least
        assert http.app.state.abuse_guard.usage("hungry") == (first["usage"]["total_tokens"], pytest.approx(spent))
        refused = http.post("/v1/completions", json={**body, "user": "hungry"})
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "60"
        assert refused.json()["error"]["code"] == "tenant_energy_budget"
        assert http.post("/v1/completions", json={**body, "user": "frugal"}).status_code == 200
        rejected = metric_values(http.get("/metrics").text, "joule_requests_rejected_total", "reason")
    assert rejected == {"tenant_energy_budget": 1.0}
