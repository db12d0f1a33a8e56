"""The deadline policy: earliest-deadline-first admission, latest-deadline victims, TPOT-driven chunk size."""

from __future__ import annotations

from helpers import fake_executor as helpers

from joule.engine.core import EngineCore
from joule.engine.kv_blocks import KVBlockManager
from joule.engine.plan import StepResult
from joule.engine.request import RequestSLO, SampledToken
from joule.engine.scheduler_config import SchedulerConfig
from joule.engine.step_time import StepTimeCoefficients, StepTimeEstimator

CheckedEngine, RequestSpec, reference_results = helpers.CheckedEngine, helpers.RequestSpec, helpers.reference_results

# A step costs 10 ms + 1 ms per prompt token + 2 ms per decode token.
KNOWN = StepTimeCoefficients(fixed_seconds=0.010, per_prefill_token=0.001, per_decode_token=0.002)


def _spec(name, prompt, max_tokens=4, arrival=0.0, ttft=None, tpot=None):
    slo = RequestSLO(ttft_seconds=ttft, tpot_seconds=tpot) if (ttft or tpot) else None
    return RequestSpec(name, prompt, max_tokens, with_eos=False, arrival_time=arrival, slo=slo)


def test_admission_is_earliest_deadline_first_and_requests_without_ttft_come_last():
    engine = CheckedEngine(num_blocks=64, block_size=4, max_num_batched_tokens=64, max_num_seqs=1, max_model_len=32,
                           policy="deadline")
    engine.add(_spec("loose", [2, 3], arrival=0.0, ttft=10.0))  # deadline 10
    engine.add(_spec("no-slo-early", [3, 4], arrival=0.0))
    engine.add(_spec("tight", [4, 5], arrival=1.0, ttft=2.0))  # deadline 3
    engine.add(_spec("tpot-only", [5, 2], arrival=0.5, tpot=0.1))  # no TTFT: ranks with the no-SLO ones
    engine.add(_spec("middle", [2, 4], arrival=2.0, ttft=5.0))  # deadline 7
    engine.run()
    assert engine.stats.finished_order == ["tight", "middle", "loose", "no-slo-early", "tpot-only"]


def test_the_running_request_with_the_latest_deadline_is_preempted():
    """Two requests that cannot both grow: the one without an SLO yields although it was admitted first."""
    engine = CheckedEngine(num_blocks=5, block_size=2, max_num_batched_tokens=16, max_num_seqs=2, max_model_len=9,
                           enable_prefix_caching=False, policy="deadline")
    relaxed = engine.add(_spec("relaxed", [2, 3, 4], max_tokens=6, arrival=0.0))
    urgent = engine.add(_spec("urgent", [5, 4, 3], max_tokens=6, arrival=1.0, ttft=1.0))
    first_victim = None
    while engine.core.has_unfinished_requests():
        engine.step()
        if engine.core.last_step.preempted_request_ids and first_victim is None:
            first_victim = engine.core.last_step.preempted_request_ids[0]
    assert first_victim == "relaxed"
    assert urgent.num_preemptions == 0 and relaxed.num_preemptions >= 1
    assert engine.results() == reference_results([_spec("relaxed", [2, 3, 4], 6), _spec("urgent", [5, 4, 3], 6)])


def _decoding_engine(tpot: float | None, num_decoders: int = 4) -> tuple[CheckedEngine, list]:
    engine = CheckedEngine(num_blocks=256, block_size=4, max_num_batched_tokens=256, max_num_seqs=16,
                           max_model_len=256, policy="deadline")
    engine.scheduler.step_time = StepTimeEstimator(min_observations=10**9, prior=KNOWN)  # keep the known costs
    decoders = [engine.add(_spec(f"d{i}", [2 + i], max_tokens=50, tpot=tpot)) for i in range(num_decoders)]
    engine.step()  # prefills the one-token prompts; they decode from now on
    engine.add(_spec("long", [3] * 200, max_tokens=2))
    return engine, decoders


def test_prompt_chunks_are_cut_to_keep_the_tightest_running_tpot():
    # 4 decodes: 10 + 4 x 2 = 18 ms; a 50 ms TPOT leaves 32 ms = 32 prompt tokens per step.
    engine, decoders = _decoding_engine(tpot=0.050)
    for step in range(3):
        engine.step()
        chunk = {name: tokens for name, tokens, _ in engine.plans[-1]}
        assert all(chunk[d.request_id] == 1 for d in decoders)  # no decode is ever cut
        assert chunk["long"] == 32
        assert KNOWN.predict(chunk["long"], len(decoders)) <= 0.050 + 1e-12


def test_without_tpot_slos_the_whole_budget_is_used():
    engine, _ = _decoding_engine(tpot=None)
    engine.step()
    chunk = {name: tokens for name, tokens, _ in engine.plans[-1]}
    assert chunk["long"] == 200  # 4 decodes + 200 prompt tokens fit the budget of 256


def test_an_unreachable_tpot_still_lets_prompts_progress_by_one_block():
    engine, decoders = _decoding_engine(tpot=0.001)  # below even a decode-only step
    engine.step()
    chunk = {name: tokens for name, tokens, _ in engine.plans[-1]}
    assert chunk["long"] == engine.block_manager.block_size
    assert all(chunk[d.request_id] == 1 for d in decoders)
    engine.run()  # and everything finishes


class LinearCostExecutor:
    """Reports each step's duration from known coefficients, as a real device would measure it."""

    def execute(self, plan):
        sampled = {s.request_id: SampledToken(7) for s in plan.sequences if s.samples}
        return StepResult(sampled=sampled, elapsed_seconds=KNOWN.predict(plan.num_prefill_tokens,
                                                                         plan.num_decode_tokens))


def test_engine_core_teaches_the_estimator_the_executor_step_times():
    from joule.engine.request import Request
    from joule.sampling_params import SamplingParams

    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=40, max_model_len=128, policy="deadline")
    core = EngineCore(config, KVBlockManager(128, 4), LinearCostExecutor(), clock=lambda: 0.0)
    for index in range(6):  # prompts of different lengths, chunked against decodes: varied steps
        prompt = [2 + index] * (7 + 13 * index)
        core.add_request(Request(f"r{index}", prompt, SamplingParams(max_tokens=12, ignore_eos=True), 12,
                                 slo=RequestSLO(tpot_seconds=0.2)))
    while core.has_unfinished_requests():
        core.step()
    fitted = core.scheduler.step_time.coefficients()
    assert fitted is not None
    assert abs(fitted.fixed_seconds - KNOWN.fixed_seconds) < 1e-6
    assert abs(fitted.per_prefill_token - KNOWN.per_prefill_token) < 1e-7
    assert abs(fitted.per_decode_token - KNOWN.per_decode_token) < 1e-7
    assert not core.scheduler.running and core.block_manager.num_free_blocks == core.block_manager.num_blocks
