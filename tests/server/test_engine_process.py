"""The engine loop in its own process: same tokens as in-process, load errors keep their type, a dead
engine process fails its streams instead of hanging them."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from joule.config import EngineConfig
from joule.llm_engine import LLMEngine
from joule.sampling_params import RequestOutputKind, SamplingParams
from joule.server.async_engine import AsyncEngine, EngineStepError, EngineStoppedError
from joule.server.engine_channels import ProcessEngineChannel


def _config(model_dir) -> EngineConfig:
    return EngineConfig(model=str(model_dir), max_model_len=256, kv_cache_memory_bytes=8 * 2**20, dtype="float32")


async def _generate(async_engine: AsyncEngine, prompts: list[list[int]], max_tokens: int) -> dict[int, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    stream = await async_engine.submit(prompts, params, "req")
    tokens: dict[int, list[int]] = {index: [] for index in range(len(prompts))}
    async for index, output in stream:
        tokens[index].extend(output.outputs[0].token_ids)
    return tokens


def test_a_process_engine_gives_the_tokens_of_a_thread_engine_and_stops_in_order(tiny_model_dir, capfd):
    """Stopping in order includes the child's interpreter freeing its heap: one left frozen kept Triton's objects
    alive past shutdown, and nanobind printed "leaked instances" warnings into every server's log."""
    prompts = [[1, 2, 3, 4], [5, 6, 7], [9] * 20]

    async def run(engine) -> tuple[dict[int, list[int]], object]:
        async_engine = AsyncEngine(engine)
        async_engine.start()
        try:
            tokens = await _generate(async_engine, prompts, max_tokens=12)
            with pytest.raises(ValueError, match="max_model_len"):  # a rejection crosses the process boundary
                await async_engine.submit([[1] * 300], SamplingParams(max_tokens=4), "too-long")
            return tokens, async_engine
        finally:
            await asyncio.to_thread(async_engine.shutdown)

    channel = ProcessEngineChannel(_config(tiny_model_dir))
    assert channel.info.max_model_len == 256 and channel.info.tokenizer is not None
    in_process, _ = asyncio.run(run(channel))
    threaded, _ = asyncio.run(run(LLMEngine(_config(tiny_model_dir))))
    assert in_process == threaded and all(len(ids) == 12 for ids in in_process.values())
    assert not channel.is_alive() and channel._process.exitcode == 0
    assert "leaked" not in capfd.readouterr().err


def test_a_model_that_cannot_load_raises_its_own_error_type(tmp_path):
    with pytest.raises(ValueError, match="no-such-model"):  # joule serve reports these as usage errors
        ProcessEngineChannel(EngineConfig(model=str(tmp_path / "no-such-model"), dtype="float32"))


def test_a_dead_engine_process_fails_streams_in_flight_and_stops_accepting(tiny_model_dir):
    async def scenario():
        channel = ProcessEngineChannel(_config(tiny_model_dir))
        async_engine = AsyncEngine(channel)
        async_engine.start()
        params = SamplingParams(max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        stream = await async_engine.submit([[1, 2, 3]], params, "doomed")
        channel._process.kill()
        with pytest.raises(EngineStepError, match="engine process exited"):
            async for _ in stream:
                pass
        assert not async_engine.is_running
        with pytest.raises(EngineStoppedError):
            await async_engine.submit([[1, 2, 3]], params, "after")
        async_engine.shutdown(timeout=5.0)

    asyncio.run(scenario())


def test_a_tokenizer_survives_pickling_with_its_chat_template(tiny_model_dir):
    engine_tokenizer = LLMEngine(_config(tiny_model_dir)).tokenizer
    copy = pickle.loads(pickle.dumps(engine_tokenizer))
    messages = [{"role": "user", "content": "hello there"}]
    assert copy.encode("hello there") == engine_tokenizer.encode("hello there")
    assert copy.apply_chat_template(messages, add_generation_prompt=True) == engine_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True)
