"""The step-model fit behind `joule perf calibrate`: per-class scales and host overheads from measured steps.

Torch-free: refits run from saved measurements. Steps are additive (host + device) unless the engine's decode
lookahead launched them behind another (``BatchShape.queued``): those cost max(host, device), so each one enters
the fit through the side the current fit says binds it, until that assignment settles. They are what tells host
from device time apart: a step run on its own only shows the sum.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from joule.perf.energy_fit import fit_energy
from joule.perf.fitting import fit_gemm_curve, fit_relative_l1
from joule.perf.hardware import get_hardware
from joule.perf.profile import DeviceProfile
from joule.perf.step_model import BatchShape, StepModel, gemm_count

if TYPE_CHECKING:
    from joule.perf.calibrate import Measurements
    from joule.perf.measure import StepSample
    from joule.perf.output_costs import OutputCosts

# Pull of each class scale toward 1 (relative-error units): strong for linear, whose rates were
# measured on the model's own GEMMs; weak for attention, which the micro-benchmarks model least.
_RIDGE = {"linear": 0.3, "attention_prefill": 0.05, "attention_decode": 0.02, "elementwise": 0.1,
          "linear_decode": 0.1, "linear_memory": 0.1}
# On a CPU every pull is at most this. Eager CPU steps identify the scales on their own, and the full pull held a bf16
# fit on an AMX CPU at the micro-benchmarks' speeds: prompt steps predicted a quarter short. Refits of the saved CPU
# measurements, rechecked on their saved validations (docs/perf-model.md, 2026-12-05 (f)): bf16 offline TTFT -19 %
# -> +1 %, float32 grid 7.3 -> 4.2 %; on the H200's the full pull did better (grid 7.7 % against 9.7 % without it).
_CPU_RIDGE_CAP = 0.002


def gemm_curves(model_config, measured: Measurements) -> tuple[list[list[float]], list[list[float]]]:
    """[rows, FLOP/s] for the layer GEMMs (summed per row count) and for lm_head."""
    layer: dict[int, list[float]] = {}
    head: list[list[float]] = []
    for rows, k, n, seconds in measured.gemms:
        flops = 2.0 * rows * k * n
        if n == model_config.vocab_size and k == model_config.hidden_size:
            head.append([float(rows), flops / seconds])
        else:
            totals = layer.setdefault(rows, [0.0, 0.0])
            totals[0] += flops
            totals[1] += seconds
    curve = [[float(rows), flops / seconds] for rows, (flops, seconds) in sorted(layer.items())]
    return curve, sorted(head)


def base_profile(model_config, measured: Measurements) -> DeviceProfile:
    """Rates from the micro-benchmarks, unit scales, no overheads, energy from the catalog."""
    spec = get_hardware(measured.hardware)
    catalog = DeviceProfile.from_hardware(spec, measured.dtype)
    rows, flops, nbytes, seconds = [], [], [], []
    for m, k, n, secs in measured.gemms:
        count = gemm_count(m, k, n, catalog.element_bytes)
        rows.append(m), flops.append(count.flops), nbytes.append(count.bytes), seconds.append(secs)
    gemm_flops, m_half = fit_gemm_curve(np.array(rows), np.array(flops), np.array(nbytes), np.array(seconds),
                                        measured.bandwidth)
    layer_curve, head_curve = gemm_curves(model_config, measured)
    paged = measured.attention_backend == "triton"  # paged kernels read each sequence's KV once, unpadded
    return DeviceProfile(
        hardware=spec.name, dtype=measured.dtype, gemm_flops=gemm_flops, gemm_m_half=m_half,
        attention_flops=measured.attention_flops, memory_bandwidth=measured.bandwidth,
        step_overhead_s=0.0, sequence_overhead_s=0.0, layer_overhead_s=0.0,
        prefill_sequence_layer_overhead_s=0.0, idle_watts=catalog.idle_watts, max_watts=catalog.max_watts,
        energy_per_flop=catalog.energy_per_flop, energy_per_byte=catalog.energy_per_byte,
        gemm_curve=layer_curve, lm_head_curve=head_curve,
        decode_attention_padded=not paged, kv_passes=1.0 if paged else 3.0,
        decode_staging=measured.attention_backend == "portable" and spec.kind == "cpu",
        host_overlaps_device=spec.kind == "gpu", linear_roofline="max" if spec.kind == "gpu" else "sum",
        staging_max_copy_bytes=measured.staging_max_copy_bytes,
        chunk_graph_max_tokens=measured.chunk_graph_max_tokens, max_graphed_chunks=measured.max_graphed_chunks,
        # The engine captured graphs: their steps' per-layer gaps lie between kernels on the device.
        graph_layer_overhead_on_device=spec.kind == "gpu" and measured.chunk_graph_max_tokens > 0,
    )


FIT_FEATURES = ("linear", "attention_prefill", "attention_decode", "elementwise", "layer", "sequence",
                "prefill_sequence_layer", "chunk_layer", "staging_rebuild", "linear_decode", "linear_memory",
                "finish", "finish_token", "wake", "chunk_pass_layer", "host_step")
_CHUNK_PASS_LAYER = FIT_FEATURES.index("chunk_pass_layer")
_PREFILL_SEQUENCE_LAYER = FIT_FEATURES.index("prefill_sequence_layer")
# Host time per step beyond the measured step overhead (wall minus executor time, whose executor part holds
# host work too): only steps queued behind another tell it from device time, so it is fitted only with them.
_HOST_STEP = FIT_FEATURES.index("host_step")


def step_features(model_config, profile: DeviceProfile, shape: BatchShape) -> np.ndarray:
    """One row of the fit: unscaled class seconds and overhead multipliers for a step."""
    model = StepModel(model_config, profile)
    shape = model.resolve_staging(shape)
    _, seconds = model.class_seconds(shape)
    layers, sequences = model_config.num_hidden_layers, len(shape.sequences)
    decode_only = 1.0 if shape.is_decode_only else 0.0
    eager_chunk = 1.0 if model.is_eager_chunk_step(shape) else 0.0
    replays = len(model.graph_passes(shape) or [None])
    graphed_chunks = 1.0 if not shape.is_decode_only and model.graph_passes(shape) is not None else 0.0
    rebuilt = sequences * shape.staging_capacity * layers if shape.staging == "rebuild" else 0.0
    linear, memory = seconds["linear"], 0.0
    if profile.linear_roofline == "sum":
        _, _, linear, memory = model.linear_parts(shape, model.graph_passes(shape))
    return np.array([
        (1.0 - decode_only) * linear, seconds["attention_prefill"], seconds["attention_decode"],
        seconds["elementwise"] + seconds["sampling"], layers * replays, sequences,
        eager_chunk * shape.num_prompt_sequences * layers, eager_chunk * layers, rebuilt, decode_only * linear, memory,
        shape.num_finished, shape.finished_tokens, 1.0 if shape.after_idle else 0.0,
        graphed_chunks * layers * replays, 1.0,
    ])


def fit_profile(model_config, measured: Measurements, samples: list[StepSample] | None = None,
                rounds: int = 3) -> DeviceProfile:
    """Fit class scales and overheads to measured engine steps (minimising relative error).

    Contention from other jobs only slows steps down, so after each round the steps measured far
    slower than the fit predicts (by more than ``OUTLIER_SLOWDOWN``) are dropped and the fit repeated.
    """
    samples = list(samples if samples is not None else measured.steps)
    profile = _fit_once(model_config, measured, samples)
    for _ in range(rounds - 1):
        model = StepModel(model_config, profile)
        kept = [s for s in samples if model.predict(s.shape).elapsed_seconds >= s.seconds * (1 - OUTLIER_SLOWDOWN)]
        if len(kept) == len(samples) or len(kept) < len(FIT_FEATURES) * 2:
            break
        samples = kept
        profile = _fit_once(model_config, measured, samples)
    if measured.output_costs is not None:
        split_output_costs(profile, measured.output_costs)
    profile.host_probe_s = measured.host_probe_s or None
    if measured.energy_windows and not fit_energy(profile, measured.energy_windows, measured.energy_meter):
        profile.energy_source += f" (a fit to {measured.energy_meter}'s windows was refused)"
    return profile


def split_output_costs(profile: DeviceProfile, costs: OutputCosts) -> None:
    """Move the measured costs of streamed outputs and metering out of the fitted step and sequence overheads.

    Calibration steps are streamed and metered, so what the fit calls per-step and per-sequence host work holds
    both; what is left is an unobserved step's (FINAL_ONLY, unmetered). Clamped at 0 where the fit gave less."""
    profile.streamed_sequence_overhead_s = costs.streamed_sequence_s
    profile.metered_sequence_overhead_s = costs.metered_sequence_s
    profile.metered_step_overhead_s = costs.metered_step_s
    profile.sequence_overhead_s = max(0.0, profile.sequence_overhead_s - costs.streamed_sequence_s
                                      - costs.metered_sequence_s)
    profile.step_overhead_s = max(0.0, profile.step_overhead_s - costs.metered_step_s)


OUTLIER_SLOWDOWN = 0.3


_DEVICE_FEATURES = [FIT_FEATURES.index(name) for name in
                    ("linear", "attention_prefill", "attention_decode", "elementwise", "linear_decode")]
_HOST_LAYER_FEATURES = [FIT_FEATURES.index(name) for name in ("layer", "prefill_sequence_layer", "chunk_layer")]


def _fit_once(model_config, measured: Measurements, samples: list[StepSample], regime_rounds: int = 4) -> DeviceProfile:
    """One fit over ``samples``: the steps run on their own first, then (where there are any) with the steps the
    decode lookahead queued behind another (``_fit_with_queued``)."""
    plain = [s for s in samples if not s.shape.queued]
    queued = [s for s in samples if s.shape.queued]
    profile = _fit_plain(model_config, measured, plain or samples, regime_rounds)
    if not queued or not plain:
        return profile
    if not profile.host_overlaps_device:
        return _fit_with_queued(model_config, measured, plain, queued, profile, regime_rounds)
    # The eager-step max form won on the steps run alone, but it takes no queued steps (not fitted; no GPU has
    # needed it): the summed form refitted with them competes on every step. On the H200 (2026-12-05) the max form
    # won the plain steps narrowly, skipped the queued refit and predicted a fresh grid at 13.1 % against 3.8 %.
    summed = _fit_with_queued(model_config, measured, plain, queued,
                              _fit_plain(model_config, measured, plain, regime_rounds, allow_max_form=False),
                              regime_rounds)
    return min((profile, summed), key=lambda fitted: _total_relative_error(model_config, fitted, samples))


def _fit_plain(model_config, measured: Measurements, samples: list[StepSample], regime_rounds: int,
               allow_max_form: bool = True) -> DeviceProfile:
    """Steps run one by one. Where host work may overlap the device (GPU), an eager step with a
    prompt chunk takes either max(host per-layer work, device time) or their sum; the structure with
    the smaller total relative error on ``samples`` is kept (``host_overlaps_device`` says which).
    For the max form, each such step is assigned the regime the previous fit predicts for it, only
    that regime's features are kept, and the fit is repeated until the assignment settles.

    The sum won on the GPU calibrations up to 2026-12-04 (H100, H200: eager steps run ~3-6 ms over their
    device time, growing with the step's sequences), which the max form, fitted from a handful of
    eager steps, turned into a flat ~30 ms of "launches" that over-predicted every smaller eager step. On
    2026-12-05 the max form won the H200's plain steps narrowly; ``_fit_once`` then lets the summed form,
    refitted with the queued steps, compete on all of them (it won: a fresh grid at 7.7 % against 13.1 %)."""
    profile = base_profile(model_config, measured)
    if not samples:
        return profile
    step_overhead = max(statistics.median(s.seconds - s.executor_seconds for s in samples), 0.0)
    features = np.array([step_features(model_config, profile, s.shape) for s in samples])
    targets = np.array([max(s.seconds - step_overhead, 1e-6) for s in samples])
    measured_seconds = np.array([s.seconds for s in samples])
    ridge = _ridge(len(samples), measured.hardware)
    unidentified = _unidentified(measured, features, host_step=False)  # alone, steps cannot tell host_step

    def solve(matrix: np.ndarray) -> np.ndarray:
        return _solve(matrix, targets, measured_seconds, ridge, unidentified)

    _apply(profile, solve(features), step_overhead)
    if not allow_max_form:
        profile.host_overlaps_device = False
    if not profile.host_overlaps_device:
        return profile
    chunk_steps = np.array([StepModel(model_config, profile).is_eager_chunk_step(s.shape) for s in samples])
    summed = replace(profile, host_overlaps_device=False, scales=dict(profile.scales))  # what was just fitted
    best = (_total_relative_error(model_config, summed, samples), summed)
    for start in (chunk_steps.copy(), np.zeros_like(chunk_steps)):  # every eager step host-bound, or none
        host_bound, candidate = start, None
        for _ in range(regime_rounds):
            masked = features.copy()
            masked[np.ix_(host_bound, _DEVICE_FEATURES)] = 0.0
            masked[np.ix_(chunk_steps & ~host_bound, _HOST_LAYER_FEATURES)] = 0.0
            candidate = base_profile(model_config, measured)
            _apply(candidate, solve(masked), step_overhead)
            model = StepModel(model_config, candidate)
            regime = chunk_steps & np.array([
                model.host_layer_seconds(s.shape) > sum(model.predict(s.shape).seconds.values()) for s in samples])
            if (regime == host_bound).all():
                break
            host_bound = regime
        error = _total_relative_error(model_config, candidate, samples)
        if error < best[0]:
            best = (error, candidate)
    return best[1]


_LINEAR_MEMORY = FIT_FEATURES.index("linear_memory")
_LAYER_FEATURES = [FIT_FEATURES.index("layer"), _CHUNK_PASS_LAYER]


def _fit_with_queued(model_config, measured: Measurements, plain: list[StepSample], queued: list[StepSample],
                     profile: DeviceProfile, regime_rounds: int) -> DeviceProfile:
    """Refit with the queued steps: each costs max(host, device), so it enters with the side the current fit says
    binds it (device: its device features and, where graph gaps are device time, the per-layer term, against its
    whole wall time; host: the rest, against its wall time minus the step overhead), until that settles. A host
    term per step (``host_step``) is fitted too. Kept only if it lowers the total relative error."""
    samples = plain + queued
    step_overhead = profile.step_overhead_s
    base = base_profile(model_config, measured)
    features = np.array([step_features(model_config, base, s.shape) for s in samples])
    measured_seconds = np.array([s.seconds for s in samples])
    targets = np.maximum(measured_seconds - step_overhead, 1e-6)
    ridge = _ridge(len(samples), measured.hardware)
    unidentified = _unidentified(measured, features[:len(plain)], host_step=True)
    device_columns = _DEVICE_FEATURES + [_LINEAR_MEMORY] + (_LAYER_FEATURES if base.graph_layer_overhead_on_device
                                                            else [])
    host_columns = [column for column in range(len(FIT_FEATURES)) if column not in device_columns]
    queued_rows = np.arange(len(plain), len(samples))

    def fit(device_bound: np.ndarray) -> DeviceProfile:
        matrix, goal = features.copy(), targets.copy()
        on_device, on_host = queued_rows[device_bound], queued_rows[~device_bound]
        matrix[np.ix_(on_device, host_columns)] = 0.0
        goal[on_device] = measured_seconds[on_device]
        matrix[np.ix_(on_host, device_columns)] = 0.0
        fitted = base_profile(model_config, measured)
        fitted.host_overlaps_device = False  # the features here are the summed form's (the only one refitted so)
        _apply(fitted, _solve(matrix, goal, measured_seconds, ridge, unidentified), step_overhead)
        return fitted

    def regime_of(fitted: DeviceProfile) -> np.ndarray:
        model = StepModel(model_config, fitted)
        costs = [model.predict(s.shape) for s in queued]
        return np.array([cost.device_seconds >= cost.host_seconds for cost in costs])

    best = (_total_relative_error(model_config, profile, samples), profile)
    # Three starts: the plain fit's regimes, every queued step device-bound, every one host-bound.
    for start in (regime_of(profile), np.ones(len(queued), bool), np.zeros(len(queued), bool)):
        regime = start
        for _ in range(regime_rounds):
            current = fit(regime)
            error = _total_relative_error(model_config, current, samples)
            if error < best[0]:
                best = (error, current)
            following = regime_of(current)
            if (following == regime).all():
                break
            regime = following
    return best[1]


def _ridge(num_samples: int, hardware: str) -> np.ndarray:
    """Rows pulling each class scale toward 1, weighted like ``num_samples`` steps (see ``_RIDGE``)."""
    cpu = get_hardware(hardware).kind == "cpu"
    ridge = np.zeros((len(_RIDGE), len(FIT_FEATURES)))
    for row, (name, pull) in enumerate(_RIDGE.items()):
        ridge[row, FIT_FEATURES.index(name)] = (min(pull, _CPU_RIDGE_CAP) if cpu else pull) * np.sqrt(num_samples)
    return ridge


def _solve(matrix: np.ndarray, targets: np.ndarray, measured_seconds: np.ndarray, ridge: np.ndarray,
           unidentified: list[int]) -> np.ndarray:
    """The fit's coefficients; a term the samples cannot identify (``unidentified``, see ``_unidentified``) is 0,
    not a free value."""
    if unidentified:
        matrix = matrix.copy()
        matrix[:, unidentified] = 0.0
    coefficients = fit_relative_l1(matrix, targets, measured_seconds, ridge, ridge.sum(axis=1))
    coefficients[unidentified] = 0.0
    return coefficients


def _unidentified(measured: Measurements, features: np.ndarray, host_step: bool) -> list[int]:
    """Terms these samples cannot tell from others: the graphed chunk pass without a graphed prompt-chunk step;
    the host term per step without queued steps; the per-prompt-sequence layer term where attention is not the
    portable backend's per-sequence loop (on a GPU every row is batched, and with one prompt per eager step the
    term is the per-layer chunk term over again)."""
    columns = []
    if not features[:, _CHUNK_PASS_LAYER].any():
        columns.append(_CHUNK_PASS_LAYER)
    if not host_step:
        columns.append(_HOST_STEP)
    if measured.attention_backend not in ("", "portable"):  # "": measurements that did not record it
        columns.append(_PREFILL_SEQUENCE_LAYER)
    return columns


def _total_relative_error(model_config, profile: DeviceProfile, samples: list[StepSample]) -> float:
    model = StepModel(model_config, profile)
    return sum(abs(model.predict(s.shape).elapsed_seconds / s.seconds - 1) for s in samples)


def _apply(profile: DeviceProfile, coefficients: np.ndarray, step_overhead: float) -> None:
    scales = dict(profile.scales)
    scales["linear"], scales["attention_prefill"], scales["attention_decode"] = coefficients[:3]
    scales["elementwise"] = scales["sampling"] = coefficients[3]
    scales["linear_decode"] = coefficients[9]
    scales["linear_memory"] = coefficients[10] if profile.linear_roofline == "sum" else 1.0
    profile.scales = {name: float(max(value, 1e-3)) for name, value in scales.items()}
    profile.step_overhead_s = float(step_overhead + coefficients[_HOST_STEP])
    profile.layer_overhead_s = float(coefficients[4])
    profile.sequence_overhead_s = float(coefficients[5])
    profile.prefill_sequence_layer_overhead_s = float(coefficients[6])
    profile.chunk_layer_overhead_s = float(coefficients[7])
    profile.staging_rebuild_s_per_token_layer = float(coefficients[8]) if profile.decode_staging else 0.0
    profile.finish_overhead_s, profile.finish_token_overhead_s, profile.wake_overhead_s = (
        float(value) for value in coefficients[11:14])
    profile.chunk_pass_layer_overhead_s = float(coefficients[_CHUNK_PASS_LAYER])
