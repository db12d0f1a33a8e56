"""The start-up heap is frozen for a run of engine steps and handed back after it, and a heap someone else froze
is left alone."""

from __future__ import annotations

import gc

import pytest

from joule.heap import heap_frozen_while_running


@pytest.fixture
def unfrozen_heap():
    if gc.get_freeze_count():
        pytest.skip("the test process's heap is frozen already")
    yield
    gc.unfreeze()


def test_frozen_inside_and_handed_back_after_even_on_error(unfrozen_heap):
    with heap_frozen_while_running():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), heap_frozen_while_running():
        raise RuntimeError("a failed step")
    assert gc.get_freeze_count() == 0


def test_a_heap_frozen_by_someone_else_stays_frozen(unfrozen_heap):
    gc.freeze()
    before = gc.get_freeze_count()
    with heap_frozen_while_running():
        pass
    assert gc.get_freeze_count() == before > 0


def test_llm_generate_runs_with_the_heap_frozen(unfrozen_heap, tmp_path, monkeypatch):
    """LLM.generate's step loop runs inside it (so a full collection walks only the run's own objects)."""
    from helpers.tiny_models import build_tiny_checkpoint

    from joule import LLM, SamplingParams

    build_tiny_checkpoint("llama-gqa4-tied", tmp_path)
    llm = LLM(model=str(tmp_path), device="cpu", dtype="float32", kv_cache_memory_bytes=1 << 20, max_model_len=64)
    counts = []
    step = llm.llm_engine.step
    monkeypatch.setattr(llm.llm_engine, "step", lambda: counts.append(gc.get_freeze_count()) or step())
    outputs = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 3
    assert counts and all(count > 0 for count in counts)
    assert gc.get_freeze_count() == 0
