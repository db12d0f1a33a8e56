"""The ledger: hand-computed step and idle shares, and conservation over random runs through EngineCore."""

from __future__ import annotations

import random

import pytest
from helpers import fake_executor
from hypothesis import given, settings
from hypothesis import strategies as st

from joule.energy import AttributionWeights, EnergyLedger, FakeEnergyMeter
from joule.engine.core import EngineCore
from joule.engine.kv_blocks import KVBlockManager
from joule.engine.plan import ScheduledSequence, StepPlan
from joule.engine.request import Request
from joule.engine.scheduler_config import SchedulerConfig
from joule.sampling_params import SamplingParams


def make_request(request_id: str, arrival_time: float = 0.0, prompt_len: int = 4) -> Request:
    return Request(request_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=4), max_tokens=4,
                   arrival_time=arrival_time)


def sequence(request: Request, start: int, num_tokens: int) -> ScheduledSequence:
    return ScheduledSequence(request, [5] * num_tokens, start, block_ids=[], samples=False)


class SteppedClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_weight_formula_matches_hand_computation():
    weights = AttributionWeights(context_per_token_work=10.0)
    # Prompt chunk of 4 tokens from position 0 attends to 1+2+3+4 = 10 keys: 4 + 10/10.
    assert weights.sequence_weight(0, 4) == pytest.approx(5.0)
    # Decode at position 9 attends to 10 keys: 1 + 10/10.
    assert weights.sequence_weight(9, 1) == pytest.approx(2.0)
    # Second chunk of 3 tokens from position 4: 5+6+7 = 18 keys.
    assert weights.sequence_weight(4, 3) == pytest.approx(3 + 1.8)
    assert AttributionWeights.for_hidden_size(2048).context_per_token_work == 6 * 2048
    with pytest.raises(ValueError, match="positive"):
        AttributionWeights(0.0)


def test_step_energy_is_split_in_proportion_to_work():
    meter, clock = FakeEnergyMeter(), SteppedClock()
    ledger = EnergyLedger(meter, AttributionWeights(context_per_token_work=10.0), clock=clock)
    prefill, decode, chunk = make_request("prefill"), make_request("decode"), make_request("chunk", prompt_len=8)
    ledger.step_began(0.0, [prefill, decode, chunk])
    meter.add(9.8)  # weights 5 + 2 + 4.8 = 11.8 -> 9.8 J * w / 11.8
    plan = StepPlan([sequence(prefill, 0, 4), sequence(decode, 9, 1), sequence(chunk, 4, 3)])
    assert ledger.step_ended(plan, 1.0) == pytest.approx(9.8)
    assert ledger.joules_of("prefill") == pytest.approx(9.8 * 5 / 11.8)
    assert ledger.joules_of("decode") == pytest.approx(9.8 * 2 / 11.8)
    assert ledger.joules_of("chunk") == pytest.approx(9.8 * 4.8 / 11.8)
    totals = ledger.totals()
    assert totals.step_joules == pytest.approx(9.8) and totals.idle_joules == 0.0
    assert totals.attributed_joules == pytest.approx(9.8) and totals.imbalance_joules == pytest.approx(0.0)


def test_idle_energy_is_shared_by_time_present_and_the_empty_stretch_is_unattributed():
    meter, clock = FakeEnergyMeter(), SteppedClock(0.0)
    ledger = EnergyLedger(meter, clock=clock)
    # Gap [0, 10] at a constant 1 W: nobody until t=2, "a" from 2, "b" from 6.
    meter.add(10.0)
    ledger.step_began(10.0, [make_request("a", 2.0), make_request("b", 6.0)])
    # [0, 2): 2 J unattributed; [2, 6): 4 J to a; [6, 10]: 4 J shared -> a 6, b 2.
    assert ledger.totals().unattributed_joules == pytest.approx(2.0)
    assert ledger.joules_of("a") == pytest.approx(6.0)
    assert ledger.joules_of("b") == pytest.approx(2.0)
    # An empty step is idle time of the requests present at its start: 3 J -> 1.5 each.
    meter.add(3.0)
    ledger.step_ended(StepPlan(), 11.0)
    assert ledger.joules_of("a") == pytest.approx(7.5) and ledger.joules_of("b") == pytest.approx(3.5)
    # A gap with nobody present is unattributed; released requests keep their joules in the total.
    assert ledger.release("a") == pytest.approx(7.5) and ledger.joules_of("a") == 0.0
    meter.add(4.0)
    ledger.step_began(12.0, [])
    totals = ledger.totals()
    assert totals.unattributed_joules == pytest.approx(6.0)
    assert totals.attributed_joules == pytest.approx(11.0)
    assert totals.metered_joules == pytest.approx(17.0) and totals.idle_joules == pytest.approx(17.0)


@pytest.mark.parametrize("seed", range(6))
def test_engine_core_run_conserves_metered_energy(seed):
    """Random arrivals, lengths and scripted joules per read through EngineCore and a fake executor."""
    helpers = fake_executor
    rng = random.Random(seed)
    clock = SteppedClock(100.0)

    def script(meter: FakeEnergyMeter) -> None:  # each read finds the counter a random amount further on
        meter.add(rng.uniform(0.01, 5.0))

    meter = FakeEnergyMeter(joules=1234.0, on_read=script)
    ledger = EnergyLedger(meter, AttributionWeights(context_per_token_work=rng.uniform(4, 64)), clock=clock)
    ledger_zero = meter.joules  # the ledger read the meter once when it started
    block_size = 4
    core = EngineCore(
        SchedulerConfig(max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(8, 48), max_model_len=64),
        KVBlockManager(rng.randint(12, 40), block_size, enable_prefix_caching=True),
        helpers.SimulatedExecutor(block_size), clock=clock, step_observer=ledger,
    )
    specs = [helpers.RequestSpec(f"r{i}", [rng.randint(1, 31) for _ in range(rng.randint(1, 30))],
                                 max_tokens=rng.randint(1, 12)) for i in range(rng.randint(3, 12))]
    pending, admitted, aborted = list(specs), [], set()
    steps = 0
    while pending or core.has_unfinished_requests():
        clock.now += rng.uniform(0.0, 0.5)
        if pending and rng.random() < 0.4:
            request = pending.pop(0).build()
            request.arrival_time = clock.now - rng.uniform(0.0, 0.3)
            core.add_request(request)
            admitted.append(request.request_id)
        if admitted and rng.random() < 0.03:
            victim = rng.choice(admitted)
            if core.abort_request(victim) is not None:
                aborted.add(victim)
        if core.has_unfinished_requests():
            core.step()
            assert core.last_step.energy_joules is not None
        else:
            clock.now += 1.0  # no request exists: this stretch must come out unattributed
        steps += 1
        assert steps < 5000
    core.step()  # a last empty step closes the books
    totals = ledger.totals()
    per_request = sum(ledger.joules_of(request_id) for request_id in admitted)
    assert totals.metered_joules == pytest.approx(meter.joules - ledger_zero)
    assert totals.unattributed_joules > 0  # the stretches with no request and the start
    assert per_request == pytest.approx(totals.attributed_joules)
    assert abs(per_request + totals.unattributed_joules - totals.metered_joules) <= 0.01 * totals.metered_joules
    assert totals.step_joules + totals.idle_joules == pytest.approx(totals.metered_joules)
    finished = [request_id for request_id in admitted if request_id not in aborted]
    assert all(ledger.joules_of(request_id) > 0 for request_id in finished)


@settings(max_examples=200, deadline=None)
@given(
    gap=st.floats(0.0, 100.0),
    joules=st.floats(0.0, 1e4),
    arrivals=st.lists(st.floats(-50.0, 150.0), max_size=12),
)
def test_idle_gap_conserves_and_never_charges_beyond_presence(gap, joules, arrivals):
    meter = FakeEnergyMeter()
    ledger = EnergyLedger(meter, clock=lambda: 0.0)
    requests = [make_request(f"r{i}", arrival) for i, arrival in enumerate(arrivals)]
    meter.add(joules)
    ledger.step_began(gap, requests)
    totals = ledger.totals()
    charged = [ledger.joules_of(request.request_id) for request in requests]
    assert sum(charged) + totals.unattributed_joules == pytest.approx(joules, rel=1e-9, abs=1e-9)
    assert all(share >= 0 for share in charged)
    if gap > 1e-6:  # shorter gaps are instants, split equally among those present
        for request, share in zip(requests, charged):  # at most the full power over its time present
            present = gap - min(max(request.arrival_time, 0.0), gap)
            assert share <= joules * present / gap + 1e-9 * max(1.0, joules)
