"""Calibration fitting without torch: recover a known profile from synthetic measurements."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from joule.model.config import ModelConfig
from joule.perf.calibrate import (
    Measurements,
    StepSample,
    base_profile,
    fit_profile,
    gemm_curves,
)
from joule.perf import step_fit
from joule.perf.fitting import (
    fit_gemm_curve,
    fit_relative_l1,
    nonnegative_least_squares,
)
from joule.perf.step_model import (
    BatchShape,
    SequenceWork,
    StepModel,
    gemm_count,
    layer_gemm_shapes,
)


def model_config() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=8000, hidden_size=256, intermediate_size=768,
                       num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def test_nonnegative_least_squares_drops_negative_coefficients():
    matrix = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert nonnegative_least_squares(matrix, np.array([2.0, 3.0, 5.0])) == pytest.approx([2.0, 3.0])
    assert nonnegative_least_squares(matrix, np.array([2.0, -3.0, -1.0])) == pytest.approx([0.5, 0.0])


def test_nonnegative_least_squares_is_exact_with_correlated_features():
    # Unconstrained, b = 3 a0 - 1 a1 + 2 a2 with a1 close to a0: the constrained optimum is the
    # least-squares fit on a0 and a2 alone.
    rng = np.random.default_rng(0)
    matrix = rng.random((40, 3))
    matrix[:, 1] = matrix[:, 0] + 0.1 * rng.random(40)
    target = matrix @ np.array([3.0, -1.0, 2.0])
    solution = nonnegative_least_squares(matrix, target)
    assert (solution >= 0).all() and solution[1] == 0.0
    reduced, *_ = np.linalg.lstsq(matrix[:, [0, 2]], target, rcond=None)
    assert solution[[0, 2]] == pytest.approx(reduced)


def test_relative_l1_fit_ignores_a_minority_of_slow_outliers():
    rng = np.random.default_rng(1)
    features = np.column_stack([rng.uniform(0.01, 1.0, 60), np.ones(60)])
    truth = np.array([2.0, 0.05])
    measured = features @ truth
    measured[::5] *= 1.6  # a fifth of the steps slowed by other jobs
    fitted = fit_relative_l1(features, measured, measured)
    assert fitted == pytest.approx(truth, rel=0.02)
    least_squares = nonnegative_least_squares(features / measured[:, None], np.ones(60))
    assert abs(least_squares[0] / truth[0] - 1) > 0.05  # what the L1 fit buys


def test_gemm_curve_fit_recovers_peak_and_half_point():
    rows = np.array([1, 4, 16, 32, 64, 256, 1024, 2048], dtype=float)
    flops = 2.0 * rows * 512 * 512
    nbytes = 4.0 * (512 * 512 + 2 * rows * 512)
    seconds = np.maximum(flops / (250e9 * rows / (rows + 32)), nbytes / 20e9)
    peak, half = fit_gemm_curve(rows, flops, nbytes, seconds, 20e9)
    assert peak == pytest.approx(250e9, rel=0.05)
    assert half == pytest.approx(32, rel=0.15)


def synthetic_measurements(config: ModelConfig, true_model: StepModel) -> Measurements:
    gemms = []
    for rows in (1, 4, 16, 64, 256, 1024):
        for _, k, n in layer_gemm_shapes(config):
            gemms.append((rows, k, n, gemm_count(rows, k, n, 4).flops / (200e9 * rows / (rows + 16))))
        gemms.append((rows, config.hidden_size, config.vocab_size, 2.0 * rows * 256 * 8000 / 50e9))
    shapes = [BatchShape.prefill([n]) for n in (32, 300, 900, 2000)]
    shapes += [BatchShape.prefill([200] * 3), BatchShape.prefill([100] * 8)]
    shapes += [BatchShape.decode(b, c) for b in (1, 4, 16, 48) for c in (30, 400, 1500)]
    shapes += [BatchShape([SequenceWork(1, 100, True)] * b + [SequenceWork(p, 0, True)]) for b in (4, 20) for p in (64, 500)]
    steps = []
    for index, shape in enumerate(shapes):
        seconds = true_model.predict(shape).elapsed_seconds
        if index == 3:
            seconds *= 3.0  # one step slowed by another job: the fit must shrug it off
        steps.append(StepSample("synthetic", shape, seconds, seconds - 0.002))
    return Measurements("CPU-2core", "float32", bandwidth=20e9, gemms=gemms, attention_flops=80e9, steps=steps)


def test_fit_recovers_scales_and_overheads_from_engine_steps():
    config = model_config()
    measured = synthetic_measurements(config, StepModel(config, _true_profile(config)))
    fitted = fit_profile(config, measured)
    truth = _true_profile(config)
    assert fitted.step_overhead_s == pytest.approx(0.002)
    assert fitted.scales["linear"] == pytest.approx(1.0, rel=0.1)
    assert fitted.scales["attention_decode"] == pytest.approx(truth.scales["attention_decode"], rel=0.15)
    assert fitted.prefill_sequence_layer_overhead_s == pytest.approx(truth.prefill_sequence_layer_overhead_s, rel=0.2)
    assert fitted.chunk_layer_overhead_s == pytest.approx(truth.chunk_layer_overhead_s, rel=0.2)
    model = StepModel(config, fitted)
    errors = [abs(model.predict(s.shape).elapsed_seconds / s.seconds - 1) for i, s in enumerate(measured.steps) if i != 3]
    assert np.median(errors) < 0.02
    # Measurements survive a JSON round trip (refits need no torch).
    again = Measurements.from_dict(json.loads(json.dumps(dataclasses.asdict(measured))))
    assert again.steps[5].shape == measured.steps[5].shape
    assert fit_profile(config, again).scales == pytest.approx(fitted.scales)


def _true_profile(config: ModelConfig):
    measured = Measurements("CPU-2core", "float32", bandwidth=20e9, attention_flops=80e9, gemms=[])
    for rows in (1, 4, 16, 64, 256, 1024):
        for _, k, n in layer_gemm_shapes(config):
            measured.gemms.append((rows, k, n, gemm_count(rows, k, n, 4).flops / (200e9 * rows / (rows + 16))))
        measured.gemms.append((rows, config.hidden_size, config.vocab_size, 2.0 * rows * 256 * 8000 / 50e9))
    layer_curve, head_curve = gemm_curves(config, measured)
    from joule.perf.calibrate import base_profile

    profile = base_profile(config, measured)
    assert profile.gemm_curve == layer_curve and profile.lm_head_curve == head_curve
    profile.scales = {**profile.scales, "attention_decode": 1.6, "attention_prefill": 0.8}
    profile.step_overhead_s = 0.002
    profile.layer_overhead_s = 3e-4
    profile.sequence_overhead_s = 1e-4
    profile.prefill_sequence_layer_overhead_s = 2e-4
    profile.chunk_layer_overhead_s = 5e-4
    return profile


def test_fit_recovers_host_bound_eager_steps_on_a_gpu():
    """Eager steps that take max(launches, kernels), graph-replayed decodes at their own linear scale."""
    config = model_config()
    measured = synthetic_measurements(config, StepModel(config, _true_profile(config)))
    measured = dataclasses.replace(measured, hardware="H100", dtype="bfloat16", attention_backend="triton")
    truth = base_profile(config, measured)
    assert truth.host_overlaps_device and not truth.decode_attention_padded
    truth.scales = {**truth.scales, "linear_decode": 0.5}
    truth.step_overhead_s, truth.sequence_overhead_s, truth.chunk_layer_overhead_s = 5e-4, 2e-5, 1e-3
    model = StepModel(config, truth)
    steps = [dataclasses.replace(step, seconds=model.predict(step.shape).elapsed_seconds) for step in measured.steps]
    steps = [dataclasses.replace(step, executor_seconds=step.seconds - 5e-4) for step in steps]
    host_bound = [s for s in steps if not s.shape.is_decode_only
                  and model.host_layer_seconds(s.shape) > sum(model.predict(s.shape).seconds.values())]
    assert host_bound  # the synthetic set has both regimes
    fitted = fit_profile(config, dataclasses.replace(measured, steps=steps))
    assert fitted.chunk_layer_overhead_s == pytest.approx(1e-3, rel=0.1)
    assert fitted.chunk_pass_layer_overhead_s == 0.0  # no graphed prompt-chunk step to fit it from
    assert fitted.prefill_sequence_layer_overhead_s == 0.0  # triton batches every row: no per-sequence loop
    # The ridge pulls every scale toward 1, so only roughly: decodes' linear well below the chunks'.
    assert fitted.scales["linear_decode"] < 0.75 * fitted.scales["linear"]
    fitted_model = StepModel(config, fitted)
    errors = [abs(fitted_model.predict(s.shape).elapsed_seconds / s.seconds - 1) for s in steps]
    assert np.median(errors) < 0.03


def test_merging_runs_keeps_the_fastest_of_each_measurement():
    from joule.perf.calibrate import merge_measurements

    config = model_config()
    base = synthetic_measurements(config, StepModel(config, _true_profile(config)))
    slowed = dataclasses.replace(
        base, bandwidth=10e9, attention_flops=40e9,
        gemms=[(m, k, n, seconds * 2) for m, k, n, seconds in base.gemms],
        steps=[dataclasses.replace(step, seconds=step.seconds * (1.5 if i % 2 else 1.0)) for i, step in enumerate(base.steps)],
    )
    merged = merge_measurements([slowed, base])
    assert merged.bandwidth == 20e9 and merged.attention_flops == 80e9
    assert sorted(merged.gemms) == sorted(base.gemms)
    assert [s.seconds for s in merged.steps] == [s.seconds for s in base.steps]
    with pytest.raises(ValueError, match="one hardware"):
        merge_measurements([base, dataclasses.replace(base, dtype="bfloat16")])


def test_request_events_are_inferred_from_saved_step_sequences():
    """Files saved before events were recorded: finishes from which sequences do not continue, idle at run starts."""
    from joule.perf.measure import infer_step_events

    first = BatchShape([SequenceWork(100, 0, True), SequenceWork(50, 0, True)])
    second = BatchShape([SequenceWork(1, 100, True), SequenceWork(1, 50, True)])
    third = BatchShape([SequenceWork(1, 101, True)])  # the 50-token request finished in the second step
    other = BatchShape.prefill([30])
    shapes = infer_step_events([first, second, third, other], ["a", "a", "a", "b"])
    assert [s.num_finished for s in shapes] == [0, 1, 1, 1]
    assert shapes[1].sequences[1].finishes and not shapes[1].sequences[0].finishes
    assert [s.after_idle for s in shapes] == [True, False, False, True]
    # Without run names (a serving run's steps): idle after a step that finished everything it carried.
    shapes = infer_step_events([first, second, third, other])
    assert [s.after_idle for s in shapes] == [True, False, False, True]


def test_fit_recovers_request_event_costs_and_summed_eager_steps_on_a_gpu():
    config = model_config()
    measured = synthetic_measurements(config, StepModel(config, _true_profile(config)))
    measured = dataclasses.replace(measured, hardware="H100", dtype="bfloat16", attention_backend="triton")
    truth = base_profile(config, measured)
    truth.host_overlaps_device = False  # eager steps: launches on top of the kernels
    truth.step_overhead_s, truth.sequence_overhead_s, truth.chunk_layer_overhead_s = 5e-4, 2e-5, 1e-3
    truth.finish_token_overhead_s, truth.wake_overhead_s = 2e-7, 1e-3
    steps = []
    for index, step in enumerate(measured.steps):
        shape = step.shape
        if shape.is_decode_only and index % 2:  # every other decode step finishes half its requests
            half = len(shape.sequences) // 2 or 1
            shape = dataclasses.replace(shape, sequences=[dataclasses.replace(s, finishes=i < half)
                                                          for i, s in enumerate(shape.sequences)])
        if not shape.is_decode_only and index % 2 == 0:
            shape = dataclasses.replace(shape, after_idle=True)
        seconds = StepModel(config, truth).predict(shape).elapsed_seconds
        steps.append(StepSample("synthetic", shape, seconds, seconds - 5e-4))
    fitted = fit_profile(config, dataclasses.replace(measured, steps=steps))
    assert not fitted.host_overlaps_device  # the structure with the smaller calibration error
    assert fitted.wake_overhead_s == pytest.approx(1e-3, rel=0.15)
    assert fitted.finish_token_overhead_s == pytest.approx(2e-7, rel=0.25)
    model = StepModel(config, fitted)
    assert np.median([abs(model.predict(s.shape).elapsed_seconds / s.seconds - 1) for s in steps]) < 0.03


def test_steps_queued_by_the_lookahead_tell_host_from_device_time():
    """Steps run one by one show host + device only; the executor's own time holds host work too, so the measured
    step overhead (wall minus executor time) is short of the host's. Queued steps cost max(host, device): with them
    in the fit, a host term per step is found and queued steps are predicted well on both sides of the max."""
    config = model_config()
    measured = synthetic_measurements(config, StepModel(config, _true_profile(config)))
    measured = dataclasses.replace(measured, hardware="H200", dtype="bfloat16", attention_backend="triton",
                                   chunk_graph_max_tokens=512)
    truth = base_profile(config, measured)
    assert truth.graph_layer_overhead_on_device  # calibrate sets it when the engine captured graphs
    truth.scales = {**truth.scales, "linear_decode": 0.8}
    truth.step_overhead_s, truth.sequence_overhead_s, truth.layer_overhead_s = 2e-3, 4e-5, 5e-5
    model = StepModel(config, truth)
    plain = [dataclasses.replace(step, seconds=model.predict(step.shape).elapsed_seconds) for step in measured.steps]
    plain = [dataclasses.replace(step, executor_seconds=step.seconds - 5e-4) for step in plain]  # 1.5 ms unseen
    queued_shapes = [dataclasses.replace(BatchShape.decode(b, c), queued=True) for b in (1, 2, 8, 64, 128, 200)
                     for c in (50, 800)]
    costs = [model.predict(shape) for shape in queued_shapes]
    assert any(c.host_seconds > c.device_seconds for c in costs) and any(c.host_seconds < c.device_seconds for c in costs)
    queued = [StepSample("queued", shape, cost.elapsed_seconds, cost.elapsed_seconds) for shape, cost in
              zip(queued_shapes, costs)]

    def queued_errors(profile):
        fitted_model = StepModel(config, profile)
        return [abs(fitted_model.predict(s.shape).elapsed_seconds / s.seconds - 1) for s in queued]

    without = fit_profile(config, dataclasses.replace(measured, steps=plain))
    assert without.step_overhead_s == pytest.approx(5e-4)  # all it can see
    fitted = fit_profile(config, dataclasses.replace(measured, steps=plain + queued))
    assert fitted.step_overhead_s == pytest.approx(2e-3, rel=0.15)
    assert np.median(queued_errors(fitted)) < 0.05 < np.median(queued_errors(without))
    fitted_model = StepModel(config, fitted)
    assert np.median([abs(fitted_model.predict(s.shape).elapsed_seconds / s.seconds - 1) for s in plain]) < 0.03
    # Saved and read back, queued steps stay queued (refits need no torch).
    again = Measurements.from_dict(json.loads(json.dumps(dataclasses.asdict(
        dataclasses.replace(measured, steps=plain + queued)))))
    assert [s.shape.queued for s in again.steps] == [False] * len(plain) + [True] * len(queued)


def test_measured_output_costs_leave_an_unobserved_steps_overheads_and_predict_calibrations_own_steps_as_before():
    """Calibration steps stream and are metered: the fit's overheads hold both. The measured costs are moved out
    of them, so a FINAL_ONLY unmetered step is predicted cheaper and a calibration-kind step exactly as fitted."""
    from joule.perf.output_costs import OutputCosts

    config = model_config()
    measured = synthetic_measurements(config, StepModel(config, _true_profile(config)))
    plain = fit_profile(config, measured)
    costs = OutputCosts(streamed_sequence_s=2e-5, metered_sequence_s=1e-5, metered_step_s=3e-4)
    split = fit_profile(config, dataclasses.replace(measured, output_costs=costs))
    assert split.sequence_overhead_s == pytest.approx(plain.sequence_overhead_s - 3e-5)
    assert split.step_overhead_s == pytest.approx(plain.step_overhead_s - 3e-4)
    assert (split.streamed_sequence_overhead_s, split.metered_sequence_overhead_s, split.metered_step_overhead_s) == (
        2e-5, 1e-5, 3e-4)
    streamed = BatchShape.decode(64, 300)
    unobserved = BatchShape([dataclasses.replace(s, streams=False) for s in streamed.sequences], metered=False)
    before, after = StepModel(config, plain), StepModel(config, split)
    assert after.predict(streamed).elapsed_seconds == pytest.approx(before.predict(streamed).elapsed_seconds)
    saved = before.predict(unobserved).elapsed_seconds - after.predict(unobserved).elapsed_seconds
    assert saved == pytest.approx(64 * 3e-5 + 3e-4)
    # Saved with the measurements, merged as the fastest of several runs.
    again = Measurements.from_dict(json.loads(json.dumps(dataclasses.asdict(
        dataclasses.replace(measured, output_costs=costs)))))
    assert again.output_costs == costs
    from joule.perf.calibrate import merge_measurements

    slower = OutputCosts(4e-5, 5e-6, 4e-4)
    merged = merge_measurements([dataclasses.replace(measured, output_costs=slower),
                                 dataclasses.replace(measured, output_costs=costs)])
    assert merged.output_costs == OutputCosts(2e-5, 5e-6, 3e-4)
    assert merge_measurements([measured]).output_costs is None  # files saved before the costs were measured
    with pytest.raises(ValueError, match="metered_step_s"):
        OutputCosts(metered_step_s=-1.0)


def test_energy_fit_recovers_idle_power_and_per_flop_and_per_byte_energies_from_metered_windows():
    from joule.perf.calibrate import merge_measurements
    from joule.perf.energy_fit import EnergyWindow, fit_energy

    truth = (120.0, 3e-13, 5e-11)  # W, J per FLOP, J per byte

    def window(name, seconds, flops, moved, noise=1.0, idle_watts=truth[0]):
        return EnergyWindow(name, seconds, flops, moved, noise * (idle_watts * seconds + truth[1] * flops
                                                                  + truth[2] * moved))

    windows = [window("idle", 2.0, 0.0, 0.0), window("prefill", 2.1, 9e14, 2e11, 1.01),
               window("decode 192", 2.0, 6e13, 7e12, 0.99), window("batch 1", 2.2, 1e12, 4e12)]
    config = model_config()
    measured = dataclasses.replace(synthetic_measurements(config, StepModel(config, _true_profile(config))),
                                   hardware="H100", dtype="bfloat16", attention_backend="triton")  # a 700 W board
    profile = fit_profile(config, measured)
    catalog = (profile.idle_watts, profile.energy_per_flop, profile.energy_per_byte)
    assert profile.energy_source.startswith("catalog")
    assert fit_energy(profile, windows, "nvml:0")
    assert profile.idle_watts == pytest.approx(truth[0], rel=0.03)
    assert profile.energy_per_flop == pytest.approx(truth[1], rel=0.05)
    assert profile.energy_per_byte == pytest.approx(truth[2], rel=0.05)
    assert profile.energy_source.startswith("fitted to nvml:0 over 4 windows")
    # Too few windows, or none idle: the profile keeps what it had.
    kept = fit_profile(config, measured)
    assert not fit_energy(kept, windows[1:], "nvml:0") and not fit_energy(kept, windows[:2], "nvml:0")
    assert (kept.idle_watts, kept.energy_per_flop, kept.energy_per_byte) == catalog
    # Idle power above the board's maximum is not believed.
    impossible = [window(w.name, w.seconds, w.flops, w.bytes, idle_watts=900.0) for w in windows]
    assert not fit_energy(kept, impossible, "nvml:0") and kept.idle_watts == catalog[0]
    # Windows travel with the measurements: calibrate --refit fits them again; merged runs pool them.
    with_windows = dataclasses.replace(measured, energy_windows=windows, energy_meter="nvml:0")
    again = Measurements.from_dict(json.loads(json.dumps(dataclasses.asdict(with_windows))))
    assert again.energy_windows == windows and again.energy_meter == "nvml:0"
    refit = fit_profile(config, again)
    assert refit.idle_watts == pytest.approx(profile.idle_watts) and refit.energy_source.startswith("fitted")
    assert len(merge_measurements([with_windows, with_windows]).energy_windows) == 8
    with pytest.raises(ValueError, match="seconds must be positive"):
        EnergyWindow("bad", 0.0, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("truth_overlaps", [False, True])
def test_a_fit_with_queued_steps_keeps_the_eager_form_it_was_fitted_in(truth_overlaps):
    """The queued steps' refit solves the summed form's features, so its profiles are the summed form (they once
    took the GPU default, the max form, and predicted eager prompt steps with a structure they were not fitted
    in). Where the max form wins the steps run alone, the summed form refitted with the queued steps competes on
    every step, and the fit keeps whichever predicts all of them better."""
    config = model_config()
    measured = synthetic_measurements(config, StepModel(config, _true_profile(config)))
    measured = dataclasses.replace(measured, hardware="H200", dtype="bfloat16", attention_backend="triton",
                                   chunk_graph_max_tokens=512)
    truth = base_profile(config, measured)
    truth.host_overlaps_device = truth_overlaps
    truth.step_overhead_s, truth.sequence_overhead_s, truth.chunk_layer_overhead_s = 2e-3, 4e-5, 1e-3
    model = StepModel(config, truth)
    plain = [dataclasses.replace(step, seconds=model.predict(step.shape).elapsed_seconds) for step in measured.steps]
    plain = [dataclasses.replace(step, executor_seconds=step.seconds - 5e-4) for step in plain]
    queued = [StepSample("queued", shape, cost.elapsed_seconds, cost.elapsed_seconds)
              for shape in (dataclasses.replace(BatchShape.decode(b, c), queued=True)
                            for b in (1, 8, 64, 200) for c in (50, 800))
              for cost in (model.predict(shape),)]
    steps = plain + queued
    fitted = fit_profile(config, dataclasses.replace(measured, steps=steps))
    fitted_model = StepModel(config, fitted)
    errors = [abs(fitted_model.predict(s.shape).elapsed_seconds / s.seconds - 1) for s in steps]
    assert np.median(errors) < 0.05
    if not truth_overlaps:
        assert not fitted.host_overlaps_device
    summed = step_fit._fit_with_queued(config, measured, plain, queued,
                                       step_fit._fit_plain(config, measured, plain, 4, allow_max_form=False), 4)
    assert not summed.host_overlaps_device
