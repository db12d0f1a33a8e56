"""The prefill-first baseline (enable_chunked_prefill=False): whole prompts or decodes, never both.

``CheckedEngine`` checks every step: a step is either newly admitted whole prompts only or
every running decode only, and outputs equal those of a run with room for everything.
"""

from __future__ import annotations

import pytest
from helpers import fake_executor as helpers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from joule.config import EngineConfig
from joule.engine.scheduler_config import SchedulerConfig

CheckedEngine, RequestSpec, reference_results = helpers.CheckedEngine, helpers.RequestSpec, helpers.reference_results


@st.composite
def prefill_first_workloads(draw):
    shared_prefix = draw(st.lists(st.integers(2, 5), max_size=6))
    specs = []
    for index in range(draw(st.integers(1, 7))):
        prefix = shared_prefix if draw(st.booleans()) else []
        prompt = prefix + draw(st.lists(st.integers(2, 5), min_size=0 if prefix else 1, max_size=10))
        specs.append(RequestSpec(f"req-{index}", prompt, max_tokens=draw(st.integers(1, 10)),
                                 ignore_eos=draw(st.booleans()), with_eos=draw(st.booleans())))
    block_size = draw(st.integers(1, 4))
    longest = max(len(spec.prompt) + spec.max_tokens for spec in specs)
    blocks_for_longest = -(-longest // block_size)
    engine_args = dict(
        num_blocks=draw(st.integers(blocks_for_longest, blocks_for_longest + 8)),
        block_size=block_size,
        max_num_batched_tokens=draw(st.integers(longest, 2 * longest)),
        max_num_seqs=draw(st.integers(1, 6)),
        max_model_len=longest,
        enable_prefix_caching=draw(st.booleans()),
        enable_chunked_prefill=False,
        admission=draw(st.sampled_from(["greedy", "predicted"])),
    )
    return specs, engine_args


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefill_first_workloads())
def test_prefill_first_never_mixes_and_gives_the_same_outputs(workload):
    specs, engine_args = workload
    engine = CheckedEngine(**engine_args)
    for spec in specs:
        engine.add(spec)
    assert engine.run() == reference_results(specs)  # run() also checks every block is free at the end
    assert engine.stats.num_chunked_prefills == 0


def test_a_new_prompt_stalls_the_running_decodes_for_one_step():
    engine = CheckedEngine(num_blocks=64, block_size=4, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64,
                           enable_chunked_prefill=False)
    decoders = [engine.add(RequestSpec(f"d{i}", prompt=[2, 3], max_tokens=30, with_eos=False)) for i in range(3)]
    engine.step()  # one step prefills all three prompts
    assert engine.plans[-1] == [(f"d{i}", 2, 0) for i in range(3)]
    engine.step()
    assert [n for _, n, _ in engine.plans[-1]] == [1, 1, 1]
    outputs_before = [d.num_output_tokens for d in decoders]
    engine.add(RequestSpec("long", prompt=[3] * 40, max_tokens=2, with_eos=False))
    engine.step()
    assert engine.plans[-1] == [("long", 40, 0)]  # the whole prompt, alone
    assert [d.num_output_tokens for d in decoders] == outputs_before  # decodes stalled
    engine.step()
    assert sorted(engine.plans[-1]) == sorted([(f"d{i}", 1, 2 + outputs_before[i] - 1) for i in range(3)]
                                              + [("long", 1, 40)])


def test_prompts_that_do_not_fit_the_rest_of_the_budget_wait_for_the_next_step():
    engine = CheckedEngine(num_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=16,
                           enable_chunked_prefill=False)
    for name, token in (("a", 2), ("b", 3)):
        engine.add(RequestSpec(name, prompt=[token] * 10, max_tokens=3, with_eos=False))
    engine.step()
    assert engine.plans[-1] == [("a", 10, 0)]
    engine.step()
    assert engine.plans[-1] == [("b", 10, 0)]  # a's decode waits while b is admitted
    engine.run()
    assert engine.stats.num_chunked_prefills == 0


def test_budget_below_max_model_len_is_rejected_at_config_time():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=16, max_model_len=32, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=16, max_model_len=32, enable_chunked_prefill=False)
    SchedulerConfig(max_num_batched_tokens=16, max_model_len=32)  # chunked prefill copes with it
    with pytest.raises(ValueError, match="enable_chunked_prefill"):
        EngineConfig(enable_chunked_prefill="no")
