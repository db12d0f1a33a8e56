"""Energy through the real LLMEngine on a tiny model: every output carries joules, and they add up."""

from __future__ import annotations

import random

import pytest
from helpers.tiny_models import build_tiny_checkpoint

from joule.energy import ESTIMATED, MEASURED, FakeEnergyMeter
from joule.llm_engine import LLMEngine
from joule.sampling_params import RequestOutputKind, SamplingParams

ENGINE_ARGS = dict(max_model_len=128, kv_cache_memory_bytes=2 * 2**20, dtype="float32", block_size=4)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("energy-tiny-llama")
    build_tiny_checkpoint("llama-gqa4-tied", directory)
    return str(directory)


@pytest.mark.parametrize("lookahead", [False, True])
def test_random_run_conserves_energy_and_every_output_carries_it(tiny_model, lookahead):
    """With ``lookahead`` the requests are greedy, so continuation steps run (and compute one dropped token
    for a request that stops): their energy must still be conserved."""
    rng = random.Random(7)

    def script(meter: FakeEnergyMeter) -> None:
        meter.add(rng.uniform(0.05, 2.0))

    meter = FakeEnergyMeter(on_read=script)
    engine = LLMEngine.from_kwargs(model=tiny_model, energy_meter=meter, max_num_batched_tokens=24, max_num_seqs=4,
                                   decode_lookahead=lookahead, **ENGINE_ARGS)
    ledger_zero = meter.joules
    continuations = []
    launch = engine.core.executor.launch
    engine.core.executor.launch = lambda plan, previous=None: (
        continuations.append(plan) if previous is not None else None) or launch(plan, previous)
    kinds = list(RequestOutputKind)
    pending = [
        (f"req{i}", [rng.randint(3, 200) for _ in range(rng.randint(1, 40))],
         SamplingParams(max_tokens=rng.randint(1, 10), ignore_eos=True, n=rng.choice([1, 1, 2]),
                        output_kind=rng.choice(kinds), seed=i, temperature=0.0 if lookahead else 1.0))
        for i in range(10)
    ]
    final_energy: dict[str, float] = {}
    aborted_energy = 0.0
    num_outputs = 0
    while pending or engine.has_unfinished_requests():
        if pending and rng.random() < 0.5:
            request_id, prompt, params = pending.pop(0)
            engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
        if engine.has_unfinished_requests() and rng.random() < 0.02:
            victim = next(iter(engine._states))
            children = [sample.request.request_id for sample in engine._states[victim].samples]
            aborted_energy += sum(engine.energy_ledger.joules_of(child) for child in children)
            engine.abort_request(victim)
        for output in engine.step():
            num_outputs += 1
            assert output.metrics.energy_source == MEASURED
            assert output.metrics.energy_joules is not None and output.metrics.energy_joules > 0
            if output.finished:
                final_energy[output.request_id] = output.metrics.energy_joules
    engine.step()  # an empty step closes the books
    totals = engine.energy_ledger.totals()
    assert num_outputs >= len(final_energy) > 0
    assert totals.metered_joules == pytest.approx(meter.joules - ledger_zero)
    assert sum(final_energy.values()) + aborted_energy == pytest.approx(totals.attributed_joules)
    accounted = sum(final_energy.values()) + aborted_energy + totals.unattributed_joules
    assert abs(accounted - totals.metered_joules) <= 0.01 * totals.metered_joules
    assert totals.step_joules > totals.unattributed_joules  # steps are where the energy goes
    assert bool(continuations) == lookahead


def test_step_shares_in_the_real_engine_match_the_weight_formula(tiny_model):
    """Two requests prefilled together then decoded together; 1 J per step, nothing between steps."""

    def one_joule_per_step(meter: FakeEnergyMeter) -> None:
        if meter.num_reads and meter.num_reads % 2 == 0:  # reads: start, then (step began, step ended)...
            meter.add(1.0)

    meter = FakeEnergyMeter(on_read=one_joule_per_step)
    engine = LLMEngine.from_kwargs(model=tiny_model, energy_meter=meter, **ENGINE_ARGS)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    engine.add_request("short", {"prompt_token_ids": [5] * 4}, params)
    engine.add_request("long", {"prompt_token_ids": [6] * 32}, params)
    energy = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            energy[output.request_id] = output.metrics.energy_joules
    weight = engine.energy_ledger.weights.sequence_weight
    steps = [(weight(0, 4), weight(0, 32)), (weight(4, 1), weight(32, 1)), (weight(5, 1), weight(33, 1))]
    assert energy["short"] == pytest.approx(sum(short / (short + long) for short, long in steps))
    assert energy["long"] == pytest.approx(sum(long / (short + long) for short, long in steps))
    assert energy["short"] + energy["long"] == pytest.approx(3.0)
    assert energy["long"] > 1.5 * energy["short"]


def test_default_meter_on_cpu_is_an_estimate_and_every_output_has_joules(tiny_model):
    engine = LLMEngine.from_kwargs(model=tiny_model, **ENGINE_ARGS)
    assert engine.energy_meter.source in (ESTIMATED, MEASURED)  # measured only where RAPL is readable
    engine.add_request("a", {"prompt_token_ids": [7, 8, 9]}, SamplingParams(max_tokens=4, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs and all(o.metrics.energy_joules > 0 for o in outputs)
    assert all(o.metrics.energy_source == engine.energy_meter.source for o in outputs)
