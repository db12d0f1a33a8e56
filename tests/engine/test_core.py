"""EngineCore behaviour: prefix-cache reuse, stop conditions, n > 1 siblings, early finish, step stats.

Runs go through ``CheckedEngine`` (tests/helpers/fake_executor.py), so every step is also checked for the
scheduling properties and the simulated KV must hold each request's own prefix.
"""

from __future__ import annotations

import pytest
from helpers import fake_executor as helpers
from hypothesis import given, settings
from hypothesis import strategies as st

from joule.engine.request import RequestStatus

CheckedEngine, RequestSpec = helpers.CheckedEngine, helpers.RequestSpec
EOS = helpers.EOS_TOKEN_ID


def roomy_engine(**overrides) -> CheckedEngine:
    args = dict(num_blocks=64, block_size=4, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64)
    args.update(overrides)
    return CheckedEngine(**args)


# -- prefix caching -----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(block_size=st.integers(1, 4), extra_tokens=st.integers(1, 14), enable_prefix_caching=st.booleans())
def test_identical_prompt_after_finish_reuses_all_full_blocks(block_size, extra_tokens, enable_prefix_caching):
    prompt = [(3 * i) % 7 + 2 for i in range(block_size + extra_tokens)]  # longer than one block
    engine = roomy_engine(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    first = engine.add(RequestSpec("first", prompt, max_tokens=3, with_eos=False))
    engine.run()
    second = engine.add(RequestSpec("second", prompt, max_tokens=3, with_eos=False))
    engine.run()
    assert first.num_cached_tokens == 0
    if enable_prefix_caching:
        # Every full block that still leaves a token to compute; never the whole prompt.
        assert second.num_cached_tokens == (len(prompt) - 1) // block_size * block_size
        assert 0 < second.num_cached_tokens <= len(prompt) - 1
        assert engine.block_manager.prefix_cache_hits >= second.num_cached_tokens
    else:
        assert second.num_cached_tokens == 0
        assert engine.block_manager.prefix_cache_hits == 0
    # The simulated KV was checked at every step; the outputs must not depend on the hit either.
    assert engine.results() == helpers.reference_results(
        [RequestSpec("first", prompt, 3, with_eos=False), RequestSpec("second", prompt, 3, with_eos=False)]
    )


def test_different_cache_salt_gets_no_hit():
    engine = roomy_engine(block_size=2)
    engine.add(RequestSpec("alice", [2, 3, 4, 5, 6], max_tokens=2, cache_salt="alice"))
    engine.run()
    bob = engine.add(RequestSpec("bob", [2, 3, 4, 5, 6], max_tokens=2, cache_salt="bob"))
    again = engine.add(RequestSpec("alice-again", [2, 3, 4, 5, 6], max_tokens=2, cache_salt="alice"))
    engine.run()
    assert bob.num_cached_tokens == 0
    assert again.num_cached_tokens == 4


# -- stop conditions ------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(max_tokens=st.integers(1, 12), data=st.data())
def test_min_tokens_holds_off_an_eager_eos(max_tokens, data):
    """The model wants EOS every step; it may only stop once min_tokens tokens came out."""
    min_tokens = data.draw(st.integers(0, max_tokens))
    engine = roomy_engine(always_eos=True)
    request = engine.add(RequestSpec("eager", [2, 3, 4], max_tokens=max_tokens, min_tokens=min_tokens))
    engine.run()
    outputs = request.output_token_ids
    if min_tokens < max_tokens:
        assert len(outputs) == min_tokens + 1
        assert request.finish_reason == "stop" and request.stop_reason is None
        assert outputs[-1] == EOS
    else:
        assert len(outputs) == max_tokens and request.finish_reason == "length"
    assert EOS not in outputs[:min_tokens]


def test_ignore_eos_runs_to_max_tokens():
    engine = roomy_engine(always_eos=True)
    request = engine.add(RequestSpec("stubborn", [2, 3], max_tokens=5, ignore_eos=True))
    engine.run()
    assert request.output_token_ids == [EOS] * 5
    assert request.finish_reason == "length" and request.stop_reason is None


def scripted(tokens_by_request: dict[str, list[int]]):
    """A sampler that replays a fixed token list per request (ignoring min_tokens bans on purpose)."""
    return lambda request, digest: tokens_by_request[request.request_id][request.num_output_tokens]


def test_stop_token_id_ends_the_request_and_sets_stop_reason():
    engine = roomy_engine(sampler=scripted({"r": [10, 11, 7, 12, 13]}))
    request = engine.add(RequestSpec("r", [2, 3], max_tokens=5, stop_token_ids=(7, 9)))
    engine.run()
    assert request.output_token_ids == [10, 11, 7]
    assert request.finish_reason == "stop" and request.stop_reason == 7


def test_eos_stop_has_no_stop_reason():
    engine = roomy_engine(sampler=scripted({"r": [10, EOS, 12]}))
    request = engine.add(RequestSpec("r", [2, 3], max_tokens=3, stop_token_ids=(7,)))
    engine.run()
    assert request.output_token_ids == [10, EOS]
    assert request.finish_reason == "stop" and request.stop_reason is None


def test_scheduler_ignores_stop_tokens_before_min_tokens_even_if_sampled():
    """Defence in depth: a stop token the sampler failed to ban does not end the request early."""
    engine = roomy_engine(sampler=scripted({"r": [7, 7, 7, 7, 7]}))
    request = engine.add(RequestSpec("r", [2, 3], max_tokens=5, min_tokens=2, stop_token_ids=(7,)))
    engine.run()
    assert request.output_token_ids == [7, 7, 7]
    assert request.stop_reason == 7


def test_max_model_len_caps_generation():
    engine = roomy_engine(max_model_len=6)
    request = engine.add(RequestSpec("r", [2, 3, 4, 5], max_tokens=10, with_eos=False))
    engine.run()
    assert len(request.output_token_ids) == 2 and request.finish_reason == "length"


# -- n > 1 siblings --------------------------------------------------------------------------


def add_siblings(engine: CheckedEngine, prompt, count: int) -> list:
    return [
        engine.add(RequestSpec(f"{index}_req", prompt, max_tokens=4, with_eos=False, group_id="req"))
        for index in range(count)
    ]


def test_siblings_wait_for_the_first_prompt_then_reuse_its_blocks():
    prompt = list(range(2, 12))  # 10 tokens, 2 full blocks of 4 reusable
    engine = roomy_engine(max_num_batched_tokens=3)  # the prompt takes four chunked steps
    first, *others = add_siblings(engine, prompt, 3)
    while first.num_computed_tokens < len(prompt):
        assert all(sibling.status is RequestStatus.WAITING for sibling in others)
        engine.step()
    engine.run()
    assert first.num_cached_tokens == 0
    assert [sibling.num_cached_tokens for sibling in others] == [8, 8]
    assert {sibling.finish_reason for sibling in [first, *others]} == {"length"}


def test_siblings_do_not_wait_without_prefix_caching():
    prompt = list(range(2, 12))
    engine = roomy_engine(enable_prefix_caching=False)
    siblings = add_siblings(engine, prompt, 3)
    engine.step()
    assert all(sibling.status is RequestStatus.RUNNING for sibling in siblings)
    engine.run()
    assert all(sibling.num_cached_tokens == 0 for sibling in siblings)


def test_siblings_sample_independently():
    engine = roomy_engine()
    siblings = add_siblings(engine, [2, 3, 4, 5, 6], 3)
    engine.run()
    assert len({tuple(sibling.output_token_ids) for sibling in siblings}) > 1


# -- early finish, abort, stats --------------------------------------------------------------


def test_finish_request_for_a_stop_string_frees_blocks_and_records_the_string():
    engine = roomy_engine(block_size=2)
    request = engine.add(RequestSpec("r", [2, 3, 4, 5, 6], max_tokens=10, with_eos=False))
    other = engine.add(RequestSpec("other", [6, 5, 4], max_tokens=3, with_eos=False))
    engine.step()
    engine.step()
    held = len(request.block_ids)
    free_before = engine.block_manager.num_free_blocks
    engine.core.finish_request("r", stop_reason="###")
    assert request.status is RequestStatus.FINISHED_STOPPED
    assert request.finish_reason == "stop" and request.stop_reason == "###"
    assert engine.block_manager.num_free_blocks == free_before + held
    engine.core.finish_request("r", stop_reason="again")  # finished requests are left alone
    assert request.stop_reason == "###"
    engine.run()
    assert other.finish_reason == "length"


def test_abort_returns_the_request_and_unknown_ids_return_none():
    engine = roomy_engine()
    request = engine.add(RequestSpec("r", [2, 3, 4], max_tokens=8, with_eos=False))
    engine.step()
    assert engine.abort("r")
    assert engine.core.abort_request("never-added") is None
    assert not engine.core.has_unfinished_requests()
    assert request.output_token_ids and len(request.output_token_ids) < 8


def test_step_stats_split_prefill_and_decode_tokens():
    engine = roomy_engine(max_num_batched_tokens=16)
    engine.add(RequestSpec("decoder", [2], max_tokens=8, with_eos=False))
    engine.step()
    assert engine.core.last_step.num_decode_tokens == 1  # a one-token prompt is planned like a decode
    engine.add(RequestSpec("prompt", [3] * 6, max_tokens=2, with_eos=False))
    engine.step()
    stats = engine.core.last_step
    assert (stats.num_sequences, stats.num_decode_tokens, stats.num_prefill_tokens) == (2, 1, 6)
    assert stats.elapsed_seconds > 0 and stats.preempted_request_ids == []
    engine.run()
    assert engine.core.step() == [] and engine.core.last_step.num_sequences == 0


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_preempted_request_is_recomputed_to_the_same_outputs(enable_prefix_caching):
    specs = [RequestSpec(f"r{i}", [2 + i, 3, 4, 5], max_tokens=8, with_eos=False) for i in range(3)]
    engine = CheckedEngine(
        num_blocks=6, block_size=2, max_num_batched_tokens=32, max_num_seqs=3, max_model_len=12,
        enable_prefix_caching=enable_prefix_caching,
    )
    for spec in specs:
        engine.add(spec)
    results = engine.run()
    assert engine.stats.num_preemptions > 0
    assert results == helpers.reference_results(specs)
