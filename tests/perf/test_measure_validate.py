"""Measuring the real engine for calibration and validation, on a tiny dummy-weight model (CPU, seconds)."""

from __future__ import annotations

import json
import statistics

import pytest

from joule.perf.arrivals import TimedRequest
from joule.perf.hardware import get_hardware
from joule.perf.measure import (
    Scenario,
    _serving_like,
    attention_backend_name,
    build_engine,
    run_scenario,
)
from joule.perf.profile import DeviceProfile
from joule.perf.step_model import StepModel
from joule.perf.validate import (
    checks_from_report,
    compare_run,
    recheck,
    summarize_checks,
)

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 211, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama-config")
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA))
    return build_engine(str(directory), "float32", "dummy", "cpu")


def test_foreign_load_is_busy_cpu_minus_our_own_over_wall_time_and_cores(monkeypatch):
    import os

    from joule.perf import measure

    busy = iter([1000, 1000 + 300])  # jiffies: 3 busy CPU-seconds at 100 per second
    own = iter([5.0, 6.0])  # this process used 1 of them
    clock = iter([10.0, 12.0])  # over 2 seconds of wall time
    monkeypatch.setattr(measure.ForeignLoad, "_busy_jiffies", staticmethod(lambda: next(busy)))
    monkeypatch.setattr(measure.ForeignLoad, "_own_seconds", staticmethod(lambda: next(own)))
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(os, "sysconf", lambda name: 100)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with measure.ForeignLoad() as load:
        pass
    assert load.share == pytest.approx(2.0 / (2.0 * 2))


def test_scenario_arrivals_merge_late_prompts_and_waves():
    scenario = Scenario("s", (10, 10), 3, late_prompts=(7,), late_after_steps=2, waves=((2, (5,)), (4, (9,))))
    assert scenario.arrivals() == {0: (10, 10), 2: (7, 5), 4: (9,)}
    assert _serving_like("t", (20, 30, 40), 3, 4).arrivals() == {0: (20,), 3: (30,), 6: (40,)}
    with pytest.raises(ValueError, match="must be >= 0"):
        Scenario("bad", (1,), 1, waves=((-1, (4,)),)).arrivals()


def test_staggered_arrivals_make_mixed_steps_and_changing_decode_batches(engine):
    from joule.perf.calibrate import chunk_graphs_of

    assert attention_backend_name(engine) == "portable"
    assert chunk_graphs_of(engine) == (0, 4)  # no CUDA graphs on a CPU
    samples = run_scenario(engine, _serving_like("staggered", (20, 30, 12), 2, 4))
    shapes = [[(s.num_new_tokens, s.context_length) for s in sample.shape.sequences] for sample in samples]
    assert shapes[0] == [(20, 0)]
    assert shapes[1] == [(1, 20)]
    assert sorted(shapes[2]) == [(1, 21), (30, 0)]  # the second prompt joins a running decode
    assert sorted(shapes[3]) == [(1, 22), (1, 30)]
    assert sum(len(shape) for shape in shapes) == 3 * 4  # 1 prefill step + 3 decode steps per request
    assert all(sample.seconds >= sample.executor_seconds > 0 for sample in samples)


def test_a_lookahead_scenario_keeps_only_the_queued_decode_steps_and_restores_the_setting(engine):
    assert engine.core.decode_lookahead is False
    samples = run_scenario(engine, Scenario("lookahead decode 2", (12, 9), 6, lookahead=True))
    assert engine.core.decode_lookahead is False
    assert samples and all(sample.shape.queued and sample.shape.is_decode_only for sample in samples)
    assert not any(sample.shape.after_idle for sample in samples)
    assert all(len(sample.shape.sequences) == 2 for sample in samples)


def test_compare_run_medians_over_repeats_and_saved_steps_can_be_rechecked(engine):
    from joule.bench.workload import fixed_length_workload

    prompts = fixed_length_workload(6, 16, 4, engine.model_config.vocab_size, seed=0)
    requests = [TimedRequest(f"r{i}", 0.01 * i, request) for i, request in enumerate(prompts)]
    profile = DeviceProfile.from_hardware(get_hardware("CPU-2core"), "float32")
    comparison = compare_run(engine, profile, requests, repeats=2, quiet_wait_s=0.0)
    # Two clean runs, or up to two more when other processes loaded the machine (then the clean ones).
    assert 2 <= len(comparison["runs"]) <= 4
    runs = [run for run in comparison["runs"] if run["used"]]
    assert runs and all(run["foreign_cpu_share"] >= 0 for run in comparison["runs"])
    assert comparison["tpot_s_p50"]["measured"] == pytest.approx(statistics.median(r["tpot_s_p50"] for r in runs))
    assert comparison["output_throughput"]["simulated"] > 0
    checks = checks_from_report(comparison["run_steps"])
    assert len(checks) == sum(run["steps"] for run in runs)
    slower = StepModel(engine.model_config, DeviceProfile.from_hardware(get_hardware("CPU-2core"), "float32"))
    slower.profile.step_overhead_s += 0.5
    again = recheck(checks, slower)
    assert [c.measured_s for c in again] == [c.measured_s for c in checks]
    assert all(b.predicted_s == pytest.approx(a.predicted_s + 0.5) for a, b in zip(checks, again))
    assert summarize_checks(again, keep_steps=False).keys() >= {"median_abs_error", "by_kind"}


def test_compare_run_with_the_lookahead_records_each_collected_steps_own_shape(engine, monkeypatch):
    """The offline/serving comparison can run the engine as it runs by default on a GPU (decode lookahead):
    the recording executor keeps each launched step's shape until it is collected, every token arrives, the
    simulator runs the same continuations, and the engine's own setting is restored afterwards."""
    from joule.bench.workload import fixed_length_workload
    from joule.perf import validate

    prompts = fixed_length_workload(4, 12, 6, engine.model_config.vocab_size, seed=1)
    requests = [TimedRequest(f"l{i}", 0.0, request) for i, request in enumerate(prompts)]
    profile = DeviceProfile.from_hardware(get_hardware("CPU-2core"), "float32")
    executor = engine.core.executor
    continuations, simulated_settings = [], []
    launch = executor.launch
    monkeypatch.setattr(executor, "launch", lambda plan, previous=None: (
        continuations.append(previous is not None), launch(plan, previous))[1])
    simulate = validate.simulate_like_engine
    monkeypatch.setattr(validate, "simulate_like_engine", lambda engine, profile, requests, streamed: (
        simulated_settings.append(engine.core.decode_lookahead), simulate(engine, profile, requests, streamed))[1])
    comparison = compare_run(engine, profile, requests, repeats=1, warmup=False, quiet_wait_s=0.0,
                             decode_lookahead=True)
    assert any(continuations) and simulated_settings == [True]
    assert engine.core.decode_lookahead is False  # back to build_engine's setting
    used = [run for run in comparison["runs"] if run["used"]]  # one, or more when the machine was busy
    checks = checks_from_report(comparison["run_steps"])
    assert len(checks) == sum(run["steps"] for run in used) and all(check.shape.sequences for check in checks)
    decodes = sum(s.num_new_tokens == 1 for check in checks for s in check.shape.sequences)
    assert decodes == 4 * 5 * len(used)  # every decode step recorded with its own plan's shape
    # Steps launched behind another are marked, so their checks predict max(host, device), as the simulator does.
    queued = [check for check in checks if check.queued]
    assert queued and len(queued) < len(checks) and all(check.shape.queued for check in queued)
    assert all(check.shape.is_decode_only for check in queued)


def test_cpu_steps_are_the_median_of_clean_runs_or_the_fastest_when_none_is_clean(monkeypatch):
    from types import SimpleNamespace

    from joule.perf import measure
    from joule.perf.step_model import BatchShape

    def fake_runs(times_by_seed, shares_by_seed):
        seeds = iter(shares_by_seed)

        class FakeLoad:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.share = next(seeds)

        def fake_run(engine, scenario, seed=0):
            if scenario.name == "warm-up":
                return []
            seconds = times_by_seed[seed]
            return [measure.StepSample(scenario.name, BatchShape.decode(2, 5), seconds, seconds)]

        monkeypatch.setattr(measure, "ForeignLoad", FakeLoad)
        monkeypatch.setattr(measure, "run_scenario", fake_run)
        monkeypatch.setattr(measure, "wait_for_quiet", lambda *args: 0.0)

    cpu = SimpleNamespace(device=SimpleNamespace(type="cpu"))
    scenario = [Scenario("s", (5, 5), 2)]
    fake_runs([0.30, 0.10, 0.12, 0.11, 0.5], [0.0, 0.5, 0.0, 0.0])  # the second run was contended
    assert [s.seconds for s in measure.measure_steps(cpu, scenario, repeats=3)] == [pytest.approx(0.12)]
    fake_runs([0.30, 0.20, 0.25, 0.22], [0.6, 0.6, 0.6, 0.6])  # never clean: the fastest of the 2 x 2 runs
    assert [s.seconds for s in measure.measure_steps(cpu, scenario, repeats=2)] == [pytest.approx(0.20)]


def test_output_costs_are_measured_on_the_engine_and_leave_it_as_it_was(engine):
    from joule.perf.output_costs import measure_output_costs

    core = engine.core
    before = (core.executor, core.step_observer, core.decode_lookahead, engine.block_manager.num_free_blocks)
    costs = measure_output_costs(engine, max_sequences=48, steps=4, repeats=2)
    assert min(costs.streamed_sequence_s, costs.metered_sequence_s, costs.metered_step_s) >= 0.0
    # An output object per sequence per step is real work: never free.
    assert costs.streamed_sequence_s > 0.0
    assert (core.executor, core.step_observer, core.decode_lookahead,
            engine.block_manager.num_free_blocks) == before
    assert not engine.has_unfinished_requests()


def test_an_offline_run_takes_final_only_outputs_and_its_steps_say_so(engine):
    """As LLM.generate asks: one output per request, token times from its metrics; the recorded steps do not
    stream, and the simulator is told the same."""
    from joule.bench.workload import fixed_length_workload
    from joule.perf.validate import measure_run, simulate_like_engine

    prompts = fixed_length_workload(3, 10, 5, engine.model_config.vocab_size, seed=2)
    requests = [TimedRequest(f"final-{i}", 0.0, request) for i, request in enumerate(prompts)]
    run = measure_run(engine, requests, streamed=False)
    assert run["output_tokens"] == 15 and run["tpot_s"]["p50"] > 0 and run["ttft_s"]["p50"] > 0
    shapes = [shape for shape, _ in run["steps"]]
    assert shapes and not any(s.streams for shape in shapes for s in shape.sequences)
    assert all(shape.metered for shape in shapes)  # the engine's ledger is on
    engine.block_manager.reset_prefix_cache()
    profile = DeviceProfile.from_hardware(get_hardware("CPU-2core"), "float32")
    profile.streamed_sequence_overhead_s = 0.1
    streamed = simulate_like_engine(engine, profile, requests, streamed=True)["makespan_s"]
    final_only = simulate_like_engine(engine, profile, requests, streamed=False)["makespan_s"]
    assert streamed - final_only == pytest.approx(15 * 0.1, rel=1e-6)


def test_energy_windows_are_measured_only_where_the_meter_measures(engine):
    """With a hardware meter (here a fake one drawing 30 W of wall time, under the 2-core kind's 40 W maximum):
    an idle window and one per energy scenario, fitted to ~30 W idle and ~no dynamic energy. With an estimate,
    nothing is measured."""
    import time

    from joule.energy import FakeEnergyMeter
    from joule.perf.calibrate import Measurements, fit_profile, measure_energy
    from joule.perf.energy_fit import measure_energy_windows
    from joule.perf.step_model import StepModel

    measured = Measurements("CPU-2core", "float32", bandwidth=20e9, attention_flops=80e9,
                            gemms=[(rows, 64, 64, 1e-6) for rows in (1, 16, 256)])
    lines = []
    measure_energy(engine, measured, lines.append)
    assert measured.energy_windows == [] and "estimate" in lines[0]

    started = time.perf_counter()

    def draw_thirty_watts(meter):
        meter.joules = 30.0 * (time.perf_counter() - started)

    meter = FakeEnergyMeter(on_read=draw_thirty_watts)
    profile = DeviceProfile.from_hardware(get_hardware("CPU-2core"), "float32")
    scenarios = (Scenario("energy: prefill 1x200", (200,), 1), Scenario("energy: decode 8 @ 40", (40,) * 8, 4))
    windows = measure_energy_windows(engine, StepModel(engine.model_config, profile), scenarios, meter,
                                     window_seconds=0.15, idle_seconds=0.1)
    assert [w.name for w in windows] == ["idle"] + [s.name for s in scenarios]
    assert windows[0].flops == 0 and all(w.flops > 0 and w.bytes > 0 for w in windows[1:])
    assert all(w.joules / w.seconds == pytest.approx(30.0, rel=0.05) for w in windows)
    assert not engine.has_unfinished_requests()
    measured.energy_windows, measured.energy_meter = windows, "fake"
    fitted = fit_profile(engine.model_config, measured)
    assert fitted.idle_watts == pytest.approx(30.0, rel=0.05) and fitted.energy_source.startswith("fitted to fake")


def test_runs_compare_energy_with_the_simulator_where_a_hardware_meter_measures_them(engine, monkeypatch):
    import time

    from joule.bench.workload import fixed_length_workload
    from joule.energy import FakeEnergyMeter

    prompts = fixed_length_workload(3, 12, 4, engine.model_config.vocab_size, seed=3)
    requests = [TimedRequest(f"e{i}", 0.0, request) for i, request in enumerate(prompts)]
    profile = DeviceProfile.from_hardware(get_hardware("CPU-2core"), "float32")
    plain = compare_run(engine, profile, requests, repeats=1, warmup=False, quiet_wait_s=0.0)
    assert "energy_j" not in plain  # the engine's own meter is an estimate here
    started = time.perf_counter()
    meter = FakeEnergyMeter(on_read=lambda m: setattr(m, "joules", 20.0 * (time.perf_counter() - started)))
    monkeypatch.setattr(engine, "energy_meter", meter)
    metered = compare_run(engine, profile, requests, repeats=1, warmup=False, quiet_wait_s=0.0)
    row = metered["energy_j"]
    assert row["measured"] == pytest.approx(20.0 * metered["makespan_s"]["measured"], rel=0.2)
    assert row["simulated"] > 0 and row["error"] == pytest.approx(row["simulated"] / row["measured"] - 1)


def test_the_recording_executor_builds_shapes_only_when_read_and_keeps_each_launched_steps_own(monkeypatch):
    """Calibration times ``step()``: building a shape there (~15 % of a 64-row step's host work) would be charged to
    the engine, so the recorder keeps the plan and builds the shape when it is read, after the step."""
    from joule.engine.plan import ScheduledSequence, StepPlan
    from joule.engine.request import Request
    from joule.perf import measure
    from joule.perf.batch_shape import BatchShape
    from joule.sampling_params import RequestOutputKind, SamplingParams

    built = []
    from_plan = BatchShape.from_plan
    monkeypatch.setattr(measure.BatchShape, "from_plan", lambda plan, *args: (built.append(plan), from_plan(plan))[1])

    class Inner:
        def launch(self, plan, previous=None):
            return object()

        def collect(self, launched):
            return "collected"

    def plan_of(prefix: str, sizes: list[int], kind=RequestOutputKind.FINAL_ONLY) -> StepPlan:
        params = SamplingParams(max_tokens=4, output_kind=kind)
        return StepPlan([ScheduledSequence(Request(f"{prefix}{index}", list(range(1, 9)), params, 4), [7] * size, 8,
                                           [0], True) for index, size in enumerate(sizes)])

    recorder = measure.RecordingExecutor(Inner())
    assert recorder.last_shape is None and recorder.last_request_ids == []
    first, second = plan_of("a", [5, 1]), plan_of("b", [1, 1, 1], RequestOutputKind.DELTA)
    launched_first = recorder.launch(first)
    launched_second = recorder.launch(second, previous=launched_first)  # queued behind the first
    assert recorder.collect(launched_first) == "collected" and built == []
    assert recorder.last_shape == from_plan(first) and recorder.last_request_ids == ["a0", "a1"]
    recorder.collect(launched_second)
    shape = recorder.last_shape
    assert shape.queued and [s.num_new_tokens for s in shape.sequences] == [1, 1, 1]
    assert all(s.streams and s.context_length == 8 for s in shape.sequences)
    assert recorder.with_events([], after_idle=False).sequences == shape.sequences
    assert built == [first, second]  # each once, when read
