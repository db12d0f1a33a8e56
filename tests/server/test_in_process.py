"""In-process app tests: a failing engine step, the catch-all handler, abort on disconnect, shutdown."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from joule.llm_engine import LLMEngine
from joule.sampling_params import RequestOutputKind, SamplingParams
from joule.server.app import ServerConfig, build_app
from joule.server.async_engine import AsyncEngine
from joule.server.errors import install_error_handlers


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine.from_kwargs(model=str(tiny_model_dir), max_model_len=256, kv_cache_memory_bytes=8 * 2**20,
                                 dtype="float32")


def test_a_failing_step_fails_its_requests_with_500_and_the_server_keeps_serving(engine, monkeypatch):
    app = build_app(engine, ServerConfig(served_model_names=["tiny"]))
    real_step = engine.step
    calls = {"count": 0}

    def flaky_step():
        calls["count"] += 1
        if calls["count"] == 2:
            raise RuntimeError("simulated device fault at /secret/path.py")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
    body = {"prompt": "hello", "max_tokens": 5, "ignore_eos": True}
    with TestClient(app) as http:
        failed = http.post("/v1/completions", json=body)
        assert failed.status_code == 500
        error = failed.json()["error"]
        assert error["type"] == "server_error" and "RuntimeError" in error["message"]
        assert "/secret/path.py" not in failed.text and "Traceback" not in failed.text
        assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
        ok = http.post("/v1/completions", json=body)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
        assert http.get("/health").status_code == 200
        metrics = http.get("/metrics").text
        assert 'joule:request_success_total{finished_reason="error",model_name="tiny"} 1.0' in metrics


def test_failure_mid_stream_ends_the_stream_with_an_error_event(engine, monkeypatch):
    app = build_app(engine, ServerConfig(served_model_names=["tiny"]))
    real_step = engine.step
    calls = {"count": 0}

    def flaky_step():
        calls["count"] += 1
        if calls["count"] == 4:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
    body = {"prompt": "hello", "max_tokens": 10, "ignore_eos": True, "stream": True}
    with TestClient(app) as http:
        lines = [line for line in http.post("/v1/completions", json=body).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2] and "Traceback" not in lines[-2]


def test_unexpected_exceptions_become_a_generic_500():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/explode")
    async def explode():
        raise KeyError("internal detail")

    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.get("/explode")
    assert response.status_code == 500
    assert response.json() == {"error": {"message": "internal server error", "type": "server_error",
                                         "param": None, "code": None}}


def test_closing_a_stream_aborts_its_requests_and_frees_blocks(engine):
    async def scenario():
        async_engine = AsyncEngine(engine)
        async_engine.start()
        try:
            params = SamplingParams(max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            stream = await async_engine.submit([[1, 2, 3], [4, 5, 6]], params, "req")
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 3:
                    break
            stream.abort()
            for _ in range(100):
                await asyncio.sleep(0.02)
                if async_engine.stats.num_used_blocks == 0 and async_engine.stats.num_running == 0:
                    break
            assert async_engine.stats.num_used_blocks == 0 and async_engine.stats.num_running == 0
            bad = SamplingParams(max_tokens=5, output_kind=RequestOutputKind.DELTA)
            with pytest.raises(ValueError, match="max_model_len"):
                await async_engine.submit([[1] * 300], bad, "too-long")
        finally:
            async_engine.shutdown()

    asyncio.run(scenario())


def test_shutdown_fails_requests_still_in_flight(engine):
    async def scenario():
        async_engine = AsyncEngine(engine)
        async_engine.start()
        params = SamplingParams(max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        stream = await async_engine.submit([[1, 2, 3]], params, "late")
        await asyncio.to_thread(async_engine.shutdown)
        with pytest.raises(Exception, match="shutting down"):
            async for _ in stream:
                pass
        assert engine.block_manager.num_used_blocks == 0

    asyncio.run(scenario())



def _samples(metrics_text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            reason = sample.labels.get("finished_reason")
            values[sample.name + (f"[{reason}]" if reason else "")] = sample.value
    return values


def test_metrics_count_exactly_what_was_served_per_app(engine):
    first, second = (build_app(engine, ServerConfig(served_model_names=["tiny"])) for _ in range(2))
    with TestClient(first) as http:
        prompt_len = len(http.post("/tokenize", json={"prompt": "count me"}).json()["tokens"])
        body = {"prompt": "count me", "max_tokens": 5, "ignore_eos": True}
        assert http.post("/v1/completions", json=body).status_code == 200
        values = _samples(http.get("/metrics").text)
        assert http.post("/v1/completions", json={**body, "n": 2}).status_code == 200
        after_n2 = _samples(http.get("/metrics").text)
    assert after_n2["joule:generation_tokens_total"] == 15
    assert after_n2["joule:request_success_total[length]"] == 3  # one per sample
    assert values["joule:generation_tokens_total"] == 5
    assert values["joule:prompt_tokens_total"] == prompt_len
    assert values["joule:time_to_first_token_seconds_count"] == 1
    assert values["joule:inter_token_latency_seconds_count"] == 4
    assert values["joule:e2e_request_latency_seconds_count"] == 1
    assert values["joule:request_queue_time_seconds_count"] == 1
    for name in ("prefill", "decode", "inference"):
        assert values[f"joule:request_{name}_time_seconds_count"] == 1
    assert values["joule:request_decode_time_seconds_sum"] <= values["joule:request_inference_time_seconds_sum"]
    assert values["joule:request_prompt_tokens_sum"] == prompt_len
    assert values["joule:request_generation_tokens_sum"] == 5
    assert values["joule:request_time_per_output_token_seconds_count"] == 1
    assert 0 < values["joule:request_time_per_output_token_seconds_sum"] <= (
        values["joule:e2e_request_latency_seconds_sum"] / 4)
    # n=2: one more request, 10 tokens in all (5 a sample), one TPOT: its samples' later tokens, 4 each.
    assert after_n2["joule:request_generation_tokens_sum"] == 15
    assert after_n2["joule:request_time_per_output_token_seconds_count"] == 2
    assert after_n2["joule:request_success_total[length]"] == 3
    assert values["joule:request_success_total[length]"] == 1
    assert values["joule:num_requests_running"] == 0 and values["joule:kv_cache_blocks_used"] == 0
    assert values["joule:kv_cache_blocks_total"] == engine.block_manager.num_blocks
    with TestClient(second) as http:  # a second app has its own registry, untouched by the first
        assert _samples(http.get("/metrics").text)["joule:generation_tokens_total"] == 0


def test_concurrent_requests_share_engine_steps(engine, monkeypatch):
    batch_sizes = []
    real_step = engine.step

    def recording_step():
        batch_sizes.append(engine.core.scheduler.num_running + engine.core.scheduler.num_waiting)
        return real_step()

    monkeypatch.setattr(engine, "step", recording_step)

    async def scenario():
        async_engine = AsyncEngine(engine)
        async_engine.start()
        try:
            params = SamplingParams(max_tokens=20, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

            async def one(index: int) -> int:
                stream = await async_engine.submit([[10 + index, 20, 30]], params, f"c{index}")
                return sum([len(out.outputs[0].token_ids) async for _, out in stream])

            return await asyncio.gather(*(one(index) for index in range(8)))
        finally:
            async_engine.shutdown()

    assert asyncio.run(scenario()) == [20] * 8
    assert max(batch_sizes) == 8
    assert len(batch_sizes) < 8 * 20 / 2  # far fewer steps than running them one by one


def test_the_request_log_has_one_line_of_ordered_timings_per_request(engine, tmp_path):
    import json

    log_path = tmp_path / "logs" / "requests.jsonl"
    app = build_app(engine, ServerConfig(served_model_names=["tiny"], request_log=str(log_path)))
    with TestClient(app) as http:
        for user in ("alice", "bob"):
            body = {"prompt": "hello " * 40, "max_tokens": 4, "ignore_eos": True, "user": user,
                    "stream": user == "bob"}
            assert http.post("/v1/completions", json=body).status_code == 200
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(r["tenant"], r["generated_tokens"], r["finish_reason"]) for r in records] == [
        ("alice", 4, "length"), ("bob", 4, "length")]
    # The same prompt again: bob's whole blocks come from the prefix cache (what --replay-log rebuilds).
    block_size = engine.block_manager.block_size
    assert records[0]["cached_tokens"] == 0
    assert 0 < records[1]["cached_tokens"] < records[1]["prompt_tokens"]
    assert records[1]["cached_tokens"] % block_size == 0
    for record in records:
        times = [record[key] for key in ("arrival", "first_scheduled", "first_token", "first_token_handed_over",
                                         "finished")]
        assert times == sorted(times) and record["prompt_tokens"] > 0 and record["energy_joules"] > 0


def test_the_step_log_has_every_step_the_engine_ran(engine, tmp_path):
    from joule.perf.step_log import read_step_log

    log_path = tmp_path / "steps.jsonl.gz"
    executor = engine.core.executor
    app = build_app(engine, ServerConfig(served_model_names=["tiny"], step_log=str(log_path)))
    with TestClient(app) as http:
        body = {"prompt": [5, 6, 7, 8, 9, 10, 11], "max_tokens": 4, "ignore_eos": True}
        assert http.post("/v1/completions", json=body).status_code == 200
    assert engine.core.executor is executor  # the recorder's wrapper is gone with the loop
    from joule.perf.measure import RecordingExecutor

    wrapped = RecordingExecutor(executor)
    assert wrapped.kv_cache is executor.kv_cache  # while it is on, the engine's executor reads through it
    steps = read_step_log(log_path)
    assert [step.kind for step in steps] == ["prefill", "decode", "decode", "decode"]
    assert [step.sequences for step in steps] == [[[7, 0, 1, 0]], [[1, 7, 1, 0]], [[1, 8, 1, 0]], [[1, 9, 1, 1]]]
    assert steps[0].after_idle and not any(step.after_idle for step in steps[1:])
    assert all(step.measured_s > 0 and step.predicted_s == 0 and step.scenario == "server" for step in steps)
