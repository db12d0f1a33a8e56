"""Past-Future admission: predicted output lengths, predicted peak KV, fewer preemptions, no deadlock."""

from __future__ import annotations

import random

import pytest
from helpers import fake_executor as helpers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from joule.engine.admission import (
    OutputLengthPredictor,
    PredictedPeakAdmission,
    make_admission_policy,
    peak_kv_blocks,
)
from joule.engine.request import Request
from joule.engine.scheduler_config import SchedulerConfig
from joule.sampling_params import SamplingParams

CheckedEngine, RequestSpec, reference_results = helpers.CheckedEngine, helpers.RequestSpec, helpers.reference_results


def _request(prompt_len: int, max_tokens: int, generated: int = 0) -> Request:
    request = Request("r", [2] * prompt_len, SamplingParams(max_tokens=max_tokens), max_tokens)
    request.output_token_ids = [3] * generated
    return request


def test_prediction_is_max_tokens_until_there_is_history():
    predictor = OutputLengthPredictor(max_model_len=1000, min_history=4)
    for length in (10, 20, 30):
        predictor.record(length)
    assert predictor.predict_output_tokens(_request(5, max_tokens=500)) == 500


def test_prediction_is_a_high_quantile_of_longer_history_capped_by_max_tokens():
    predictor = OutputLengthPredictor(max_model_len=1000, quantile=0.9, min_history=4)
    for length in range(1, 101):  # 1..100
        predictor.record(length)
    assert predictor.predict_output_tokens(_request(5, max_tokens=500)) == 91
    assert predictor.predict_output_tokens(_request(5, max_tokens=50)) == 50  # capped
    assert predictor.predict_output_tokens(_request(5, max_tokens=500, generated=80)) == 99  # 81..100, 90%
    # Outlived every recorded request: back to the cap. max_model_len caps too.
    assert predictor.predict_output_tokens(_request(5, max_tokens=500, generated=100)) == 500
    assert predictor.predict_output_tokens(_request(950, max_tokens=500, generated=100)) == 101


def test_history_forgets_the_oldest_lengths():
    predictor = OutputLengthPredictor(max_model_len=1000, history_size=4, quantile=1.0, min_history=1)
    for length in (500, 5, 6, 7, 8):
        predictor.record(length)
    assert predictor.num_recorded == 4
    assert predictor.predict_output_tokens(_request(1, max_tokens=900)) == 8


def _simulated_peak(holdings, block_size) -> int:
    """Step the requests one token at a time and count blocks exactly."""
    peak, step = 0, 0
    while True:
        present = [tokens + step for tokens, steps_left in holdings if steps_left >= step]
        if not present:
            return peak
        peak = max(peak, sum(-(-tokens // block_size) for tokens in present))
        step += 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 60), st.integers(0, 40)), min_size=1, max_size=8), st.integers(1, 8))
def test_peak_bound_is_at_least_the_exact_peak_and_less_than_a_block_per_request_above(holdings, block_size):
    bound = peak_kv_blocks(holdings, block_size)
    exact = _simulated_peak(holdings, block_size)
    assert exact <= bound + 1e-9
    # ceil(x/b) <= (x+b-1)/b < ceil(x/b) + 1, so the bound never overshoots the exact sum at its own peak time
    # by a whole block per request.
    assert bound < exact + len(holdings)


def _overcommitting_specs(count: int = 12) -> list[RequestSpec]:
    rng = random.Random(5)
    return [RequestSpec(f"r{i}", [rng.randint(2, 30) for _ in range(6)], max_tokens=40, with_eos=False)
            for i in range(count)]


def _run(admission: str, specs: list[RequestSpec]) -> CheckedEngine:
    # 48 blocks of 4 = 192 tokens; twelve requests of 6 + 40 tokens need 552 at their peak.
    engine = CheckedEngine(num_blocks=48, block_size=4, max_num_batched_tokens=64, max_num_seqs=16,
                           max_model_len=64, enable_prefix_caching=False, admission=admission)
    for spec in specs:
        engine.add(spec)
    engine.run()  # checks every request finished and every block is free
    return engine


def test_predicted_admission_preempts_less_than_greedy_and_outputs_do_not_change():
    specs = _overcommitting_specs()
    greedy, predicted = _run("greedy", specs), _run("predicted", specs)
    assert greedy.stats.num_preemptions > 0
    assert predicted.stats.num_preemptions < greedy.stats.num_preemptions
    assert predicted.stats.num_preemptions == 0  # max_tokens is the exact length here: nothing is mispredicted
    assert predicted.results() == greedy.results() == reference_results(specs)


def test_predicted_admission_uses_the_history_once_it_has_some():
    """Requests stop early (EOS) far below max_tokens: once that is learnt, more run at once."""
    specs = [RequestSpec(f"r{i}", [2 + i % 20, 3, 4, 5], max_tokens=60) for i in range(60)]
    engine = CheckedEngine(num_blocks=40, block_size=4, max_num_batched_tokens=64, max_num_seqs=32,
                           max_model_len=64, admission="predicted",
                           sampler=lambda request, digest: 0 if request.num_output_tokens >= 3 else 9)
    running_counts = []
    for spec in specs:
        engine.add(spec)
    engine.run(on_step=lambda e: running_counts.append(len(e.scheduler.running)))
    admission = engine.scheduler.admission
    assert admission.predictor.num_recorded == 60
    # Before history: 4 + 60 tokens = 16 blocks each, so at most 2 at a time; after: many more.
    assert max(running_counts[:3]) <= 2 < max(running_counts)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 16)), min_size=1, max_size=10),
    extra_blocks=st.integers(0, 10),
    policy=st.sampled_from(["fcfs", "deadline", "priority", "fair"]),
    chunked=st.booleans(),
)
def test_predicted_admission_never_deadlocks(lengths, extra_blocks, policy, chunked):
    specs = [RequestSpec(f"r{i}", [2 + i % 4] * prompt, max_tokens, with_eos=i % 2 == 0)
             for i, (prompt, max_tokens) in enumerate(lengths)]
    longest = max(len(spec.prompt) + spec.max_tokens for spec in specs)
    engine = CheckedEngine(num_blocks=-(-longest // 2) + extra_blocks, block_size=2, max_num_seqs=4,
                           max_num_batched_tokens=longest if not chunked else 8, max_model_len=longest,
                           admission="predicted", policy=policy, enable_chunked_prefill=chunked)
    for spec in specs:
        engine.add(spec)
    assert engine.run(max_steps=5_000) == reference_results(specs)


def test_unknown_admission_policy_names_the_choices():
    with pytest.raises(ValueError, match="greedy"):
        SchedulerConfig(admission="optimistic")
    with pytest.raises(ValueError, match="predicted"):
        make_admission_policy("optimistic", 8, 4, 64)
    with pytest.raises(ValueError, match="quantile"):
        OutputLengthPredictor(max_model_len=10, quantile=0.0)
    assert PredictedPeakAdmission(8, 4, 64).may_admit(_request(30, 40), running=[])  # alone always fits
