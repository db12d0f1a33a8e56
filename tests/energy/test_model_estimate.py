"""The performance model's energy estimate: idle power over wall time plus each step's work above it."""

from __future__ import annotations

import pytest

from joule.energy import EnergyLedger
from joule.energy.meter import ESTIMATED, CpuTimeEnergyEstimate, select_energy_meter
from joule.energy.model_estimate import StepModelEnergyEstimate
from joule.engine.plan import ScheduledSequence, StepPlan
from joule.engine.request import Request
from joule.model.config import ModelConfig
from joule.perf.batch_shape import BatchShape
from joule.perf.profile import DeviceProfile
from joule.perf.step_model import StepModel
from joule.sampling_params import SamplingParams


def small_config() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=1000, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def round_profile(**overrides) -> DeviceProfile:
    values = dict(hardware="CPU-2core", dtype="float32", gemm_flops=1e11, gemm_m_half=0.0, attention_flops=1e11,
                  memory_bandwidth=1e10, idle_watts=10.0, max_watts=40.0, energy_per_flop=1e-10,
                  energy_per_byte=1e-9, gemm_curve=[[1.0, 1e11], [1024.0, 1e11]])
    values.update(overrides)
    return DeviceProfile(**values)


def decode_plan(num_sequences: int, context: int) -> StepPlan:
    sequences = []
    for index in range(num_sequences):
        request = Request(f"r{index}", [5] * context, SamplingParams(max_tokens=8), max_tokens=8)
        sequences.append(ScheduledSequence(request, [5], context, [index], samples=True))
    return StepPlan(sequences)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_counter_is_idle_power_over_wall_time_plus_each_steps_work_capped_at_max_power():
    clock = Clock()
    model = StepModel(small_config(), round_profile())
    meter = StepModelEnergyEstimate(model, wall_clock=clock)
    assert meter.source == ESTIMATED and meter.name == "perf-model-estimate (CPU-2core, float32, calibrated profile)"
    clock.now += 2.0
    assert meter.read_joules() == pytest.approx(20.0)  # idle: 10 W x 2 s
    plan = decode_plan(4, 50)
    counts, _ = model.class_seconds(BatchShape.from_plan(plan))
    work = sum(1e-10 * count.flops + 1e-9 * count.bytes for count in counts.values())
    meter.observe_step(plan, 1.0)  # a slow step: its work is well under (40 - 10) W x 1 s
    assert meter.read_joules() == pytest.approx(20.0 + work)
    meter.observe_step(plan, 1e-9)  # an impossibly fast one: capped at 30 W over its time
    assert meter.read_joules() == pytest.approx(20.0 + work + 30.0 * 1e-9)
    catalog = StepModelEnergyEstimate(StepModel(small_config(), round_profile(gemm_curve=[])), wall_clock=clock)
    assert catalog.name.endswith("catalog defaults)")


def test_the_ledger_shows_the_meter_each_step_and_conserves_its_joules():
    clock = Clock()
    meter = StepModelEnergyEstimate(StepModel(small_config(), round_profile()), wall_clock=clock)
    ledger = EnergyLedger(meter, clock=clock)
    plan = decode_plan(3, 20)
    for _ in range(5):
        clock.now += 0.5  # idle before the step
        ledger.step_began(clock.now, [sequence.request for sequence in plan.sequences])
        clock.now += 0.25
        ledger.step_ended(plan, clock.now)
    totals = ledger.totals()
    busy = StepModel(small_config(), round_profile()).busy_joules(BatchShape.from_plan(plan), 0.25)
    assert busy > 0
    assert totals.metered_joules == pytest.approx(10.0 * 3.75 + 5 * busy)
    assert abs(totals.imbalance_joules) < 1e-9 * totals.metered_joules
    assert sum(ledger.joules_of(s.request.request_id) for s in plan.sequences) == pytest.approx(
        totals.attributed_joules)


def test_a_cpu_without_rapl_is_estimated_by_the_performance_model_when_the_model_is_known(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    meter = select_energy_meter("cpu", powercap_root=tmp_path, model_config=small_config(), dtype="float32")
    assert isinstance(meter, StepModelEnergyEstimate)
    # The shipped calibrated profile of this machine kind.
    assert meter.name == "perf-model-estimate (CPU-2core, float32, calibrated profile)"
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert select_energy_meter("cpu", powercap_root=tmp_path, model_config=small_config(),
                               dtype="float32").name == "perf-model-estimate (CPU, float32, catalog defaults)"
    assert isinstance(select_energy_meter("cpu", powercap_root=tmp_path), CpuTimeEnergyEstimate)


def test_an_engine_without_a_hardware_meter_reports_the_models_estimate(monkeypatch, tmp_path):
    """The engine hands its model config and dtype to the meter selection; outputs carry the estimate."""
    from helpers.tiny_models import build_tiny_checkpoint

    from joule.energy import meter as meter_module
    from joule.llm_engine import LLMEngine

    monkeypatch.setattr(meter_module.RaplEnergyMeter, "zone_paths", staticmethod(lambda root: []))
    build_tiny_checkpoint("llama-gqa4-tied", tmp_path)
    engine = LLMEngine.from_kwargs(model=str(tmp_path), max_model_len=64, kv_cache_memory_bytes=1 << 20,
                                   dtype="float32", block_size=4)
    assert isinstance(engine.energy_meter, StepModelEnergyEstimate)
    engine.add_request("a", {"prompt_token_ids": [7, 8, 9]}, SamplingParams(max_tokens=4, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    final = outputs[-1]
    assert final.metrics.energy_source == ESTIMATED and final.metrics.energy_joules > 0
    totals = engine.energy_ledger.totals()
    assert abs(totals.imbalance_joules) <= 1e-9 * max(totals.metered_joules, 1.0)
