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
            async for _, output in stream:
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

