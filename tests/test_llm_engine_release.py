"""A dropped engine is collected with everything it holds: users build several in one process (notebooks,
benchmarks), and on a GPU whatever keeps one alive keeps its weights and KV cache in use (docs/benchmarks.md (u))."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
from helpers.tiny_models import build_tiny_checkpoint

from joule import LLM, SamplingParams
from joule.energy.sampled import BackgroundSampledMeter
from joule.llm_engine import LLMEngine

ENGINE_ARGS = dict(max_model_len=128, kv_cache_memory_bytes=2 * 2**20, dtype="float32", block_size=4)


class CountingMeter:
    name = "counting"
    source = "measured"

    def __init__(self):
        self.joules = 0.0

    def read_joules(self) -> float:
        self.joules += 1.0
        return self.joules


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("release-tiny-llama")
    build_tiny_checkpoint("llama-gqa4-tied", directory)
    return str(directory)


def references_to(engine: LLMEngine) -> dict[str, weakref.ref]:
    executor = engine.core.executor
    return {"engine": weakref.ref(engine), "executor": weakref.ref(executor), "model": weakref.ref(executor.model),
            "scheduler": weakref.ref(engine.core.scheduler)}


def still_alive(references: dict[str, weakref.ref]) -> list[str]:
    gc.collect()
    return [name for name, reference in references.items() if reference() is not None]


@pytest.mark.parametrize("lookahead", [False, True])
def test_engine_with_a_sampling_meter_thread_is_collected_after_a_run(tiny_model, lookahead):
    threads_before = set(threading.enumerate())
    engine = LLMEngine.from_kwargs(model=tiny_model, decode_lookahead=lookahead,
                                   energy_meter=BackgroundSampledMeter(CountingMeter(), interval_seconds=0.005),
                                   **ENGINE_ARGS)
    threads = [thread for thread in set(threading.enumerate()) - threads_before
               if thread.name == "joule-energy-sampler"]
    assert threads  # the meter's own, started with the engine
    for index in range(3):
        engine.add_request(str(index), {"prompt_token_ids": list(range(5, 12 + 9 * index))},
                           SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    engine.abort_request("2")
    while engine.has_unfinished_requests():
        engine.step()
    references = references_to(engine)
    del engine
    assert still_alive(references) == []
    for thread in threads:
        thread.join(timeout=2.0)
    assert not any(thread.is_alive() for thread in threads)


def test_llm_is_collected_after_generate(tiny_model):
    llm = LLM(model=tiny_model, **ENGINE_ARGS)
    outputs = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 2, SamplingParams(max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
    assert [len(output.outputs[0].token_ids) for output in outputs] == [4, 4]
    references = references_to(llm.llm_engine) | {"llm": weakref.ref(llm)}
    del llm, outputs
    assert still_alive(references) == []
