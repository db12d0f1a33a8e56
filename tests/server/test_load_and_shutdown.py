"""Under load with clients walking away, nothing leaks; SIGTERM drains and exits 0."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.live_server import start_server


def engine_gauges(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics").text
    wanted = {"joule:num_requests_running", "joule:num_requests_waiting", "joule:kv_cache_blocks_used"}
    return {family.name: family.samples[0].value for family in text_string_to_metric_families(text)
            if family.name in wanted}


async def _one_stream(http: httpx.AsyncClient, rng: random.Random, index: int) -> dict:
    max_tokens = rng.randint(4, 40)
    disconnect_after = rng.randint(0, max_tokens // 2) if rng.random() < 0.2 else None
    if index % 2:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Tell story {index}"}]}
    else:
        path, body = "/v1/completions", {"prompt": f"Story number {index}:"}
    body.update(max_tokens=max_tokens, ignore_eos=True, temperature=0.8, seed=index, stream=True,
                stream_options={"include_usage": True})
    events: list[str] = []
    async with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line:
                continue
            events.append(line)
            if disconnect_after is not None and len(events) >= disconnect_after:
                break  # leaving the block closes the connection mid-stream
    return {"disconnected": disconnect_after is not None, "events": events, "max_tokens": max_tokens}


@pytest.mark.slow
def test_200_streams_with_20_percent_disconnects_leak_nothing(live_server, client):
    greedy = dict(model="tiny", prompt="After the storm", max_tokens=10, temperature=0.0,
                  extra_body={"ignore_eos": True})
    before = client.completions.create(**greedy).choices[0].text

    async def run() -> list[dict]:
        rng = random.Random(2024)
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=live_server.base_url, limits=limits, timeout=120.0) as http:
            return await asyncio.gather(*(_one_stream(http, rng, index) for index in range(200)))

    results = asyncio.run(run())
    disconnected = [result for result in results if result["disconnected"]]
    assert 20 <= len(disconnected) <= 60
    for result in results:
        if result["disconnected"]:
            continue
        assert result["events"][-1] == "data: [DONE]"
        usage = json.loads(result["events"][-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == result["max_tokens"]

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        gauges = engine_gauges(live_server.base_url)
        if not any(gauges.values()):
            break
        time.sleep(0.1)
    assert gauges == {"joule:num_requests_running": 0.0, "joule:num_requests_waiting": 0.0,
                      "joule:kv_cache_blocks_used": 0.0}
    metrics = httpx.get(live_server.base_url + "/metrics").text
    assert 'finished_reason="abort"' in metrics
    assert client.completions.create(**greedy).choices[0].text == before


def test_sigterm_lets_in_flight_requests_finish_and_exits_zero(tiny_model_dir, tmp_path):
    server = start_server(tiny_model_dir, tmp_path, "--shutdown-timeout", "20")

    async def stream_while_stopping() -> list[str]:
        body = {"prompt": "Long story", "max_tokens": 150, "ignore_eos": True, "stream": True}
        lines = []
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60.0) as http:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line:
                        lines.append(line)
                    if len(lines) == 2:
                        server.process.send_signal(signal.SIGTERM)
        return lines

    lines = asyncio.run(stream_while_stopping())
    assert server.process.wait(timeout=30) == 0
    assert f"curl {server.base_url}/v1/chat/completions" in server.log()  # the ready-to-paste example
    assert lines[-1] == "data: [DONE]"
    finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines[:-1]]
    assert finishes[-1] == "length"
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.base_url + "/health", timeout=2.0)


def test_sigterm_aborts_what_outlives_the_grace_period_and_exits_zero(tiny_model_dir, tmp_path):
    server = start_server(tiny_model_dir, tmp_path, "--shutdown-timeout", "1", "--max-num-seqs", "2")

    async def many_long_streams() -> list[BaseException | int]:
        body = {"prompt": "Endless", "max_tokens": 400, "ignore_eos": True, "stream": True}

        async def one(http: httpx.AsyncClient) -> int:
            chunks = 0
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    chunks += bool(line)
            return chunks

        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60.0, limits=limits) as http:
            tasks = [asyncio.ensure_future(one(http)) for _ in range(20)]
            await asyncio.sleep(1.0)
            server.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

    started = time.monotonic()
    outcomes = asyncio.run(many_long_streams())
    assert server.process.wait(timeout=30) == 0
    assert time.monotonic() - started < 20
    assert any(isinstance(outcome, BaseException) or outcome < 401 for outcome in outcomes)


def _aborted_count(base_url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics").text):
        if family.name == "joule:request_success":
            return sum(s.value for s in family.samples
                       if s.name.endswith("_total") and s.labels.get("finished_reason") == "abort")
    return 0.0


def test_a_non_streaming_client_that_gives_up_aborts_its_request(live_server):
    aborted_before = _aborted_count(live_server.base_url)
    body = {"prompt": "Patience", "max_tokens": 480, "n": 4, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.base_url + "/v1/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(engine_gauges(live_server.base_url).values()):
        time.sleep(0.05)
    assert not any(engine_gauges(live_server.base_url).values())
    assert _aborted_count(live_server.base_url) == aborted_before + 4
