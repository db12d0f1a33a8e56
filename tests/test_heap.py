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


def test_no_full_collection_inside_and_thresholds_restored_after(unfrozen_heap):
    """Thresholds set so low that young collections would start a full one within a few allocations: inside the
    block only young generations are collected, and the caller's thresholds come back after it."""
    previous = gc.get_threshold()
    collected = []

    def on_collection(phase, info):
        if phase == "start":
            collected.append(info["generation"])

    gc.set_threshold(50, 1, 1)
    gc.callbacks.append(on_collection)
    try:
        with heap_frozen_while_running():
            kept = []
            for index in range(20_000):
                node = {"index": index}
                node["self"] = node  # a cycle, so the collector tracks and promotes it
                kept.append(node)
            inside = list(collected)
        thresholds_after = gc.get_threshold()
    finally:
        gc.callbacks.remove(on_collection)
        gc.set_threshold(*previous)
    assert len(kept) == 20_000
    assert inside and 2 not in inside and 1 in inside
    assert thresholds_after == (50, 1, 1)


def test_a_heap_frozen_by_someone_else_stays_frozen_and_still_gets_no_full_collection(unfrozen_heap, monkeypatch):
    gc.freeze()
    before = gc.get_freeze_count()
    thresholds = gc.get_threshold()
    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    with heap_frozen_while_running():
        inside = gc.get_threshold()
    assert calls == []  # neither frozen again nor handed back: it was not ours
    # Frozen objects still leave the permanent generation when freed (a thread left by an earlier test may free a
    # few while this runs: 693,013 -> 693,011 once), so the count stays, give or take those.
    assert before > 0 and gc.get_freeze_count() > before * 0.99
    assert inside[:2] == thresholds[:2] and inside[2] > 1_000_000
    assert gc.get_threshold() == thresholds


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
