"""`joule perf calibrate`: measure this device, fit a DeviceProfile, save it as JSON.

Three kinds of measurement, about two minutes on the 2-core CPU machine:
1. micro-benchmarks: copy bandwidth, GEMMs of the model's own shapes at
   several row counts (the small-M curve), causal attention;
2. real engine steps: a few workloads run through ``LLMEngine`` (default model,
   or ``--load-format dummy`` with any config), each step's wall time recorded
   with the batch its plan carried;
3. a fit: the per-class scales and overheads of the step model, non-negative,
   minimising the sum of absolute relative errors (ridge-pulled toward scale 1).

Only this module (and ``validate``) touches torch and the runtime, lazily.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace

import numpy as np

from joule.perf.fitting import fit_gemm_curve, fit_relative_l1
from joule.perf.hardware import get_hardware
from joule.perf.measure import (  # noqa: F401  (re-exported: the calibration API in one place)
    CALIBRATION_SCENARIOS,
    GPU_CALIBRATION_SCENARIOS,
    RecordingExecutor,
    Scenario,
    StepSample,
    _timed,
    attention_backend_name,
    build_engine,
    default_reduce,
    default_scenarios,
    detect_hardware,
    infer_step_events,
    measure_steps,
    run_scenario,
    wait_for_quiet,
)
from joule.perf.profile import DeviceProfile
from joule.perf.step_model import (
    BatchShape,
    SequenceWork,
    StepModel,
    gemm_count,
    layer_gemm_shapes,
)

GEMM_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # small M in detail: decode batches
# Pull of each class scale toward 1 (relative-error units): strong for linear, whose rates were
# measured on the model's own GEMMs; weak for attention, which the micro-benchmarks model least.
_RIDGE = {"linear": 0.3, "attention_prefill": 0.05, "attention_decode": 0.02, "elementwise": 0.1,
          "linear_decode": 0.1, "linear_memory": 0.1}


@dataclass
class Measurements:
    hardware: str
    dtype: str
    bandwidth: float
    gemms: list[tuple[int, int, int, float]] = field(default_factory=list)  # (M, K, N, seconds)
    attention_flops: float = 0.0
    steps: list[StepSample] = field(default_factory=list)
    # "portable" (padded KV gathers) or "triton" (paged kernels); "" in files saved before it was recorded.
    attention_backend: str = ""
    staging_max_copy_bytes: float = 0.0  # the portable backend's bound on its dense decode copies (CPU)
    chunk_graph_max_tokens: int = 0  # largest captured prompt-chunk graph (GPU); 0: none
    max_graphed_chunks: int = 4

    @classmethod
    def from_dict(cls, data: dict) -> Measurements:
        """Inverse of ``dataclasses.asdict``: refit a profile from saved measurements without torch."""
        saved = data.get("steps", [])
        shapes = [BatchShape([SequenceWork(**s) for s in step["shape"]["sequences"]], step["shape"].get("staging", ""),
                             step["shape"].get("staging_capacity", 0), step["shape"].get("after_idle", False))
                  for step in saved]
        if saved and "after_idle" not in saved[0]["shape"]:  # saved before request events were recorded
            shapes = infer_step_events(shapes, [step["scenario"] for step in saved])
        steps = [StepSample(step["scenario"], shape, step["seconds"], step["executor_seconds"])
                 for step, shape in zip(saved, shapes)]
        return cls(data["hardware"], data["dtype"], data["bandwidth"], [tuple(g) for g in data["gemms"]],
                   data["attention_flops"], steps, data.get("attention_backend", ""),
                   data.get("staging_max_copy_bytes", 0.0), data.get("chunk_graph_max_tokens", 0),
                   data.get("max_graphed_chunks", 4))


def measure_micro(model_config, dtype_name: str, device_name: str, hardware: str, repeats: int = 5) -> Measurements:
    """Copy bandwidth, the model's layer and lm_head GEMMs over GEMM_ROWS, and causal attention FLOP/s."""
    import torch
    import torch.nn.functional as F

    from joule.runtime.device import resolve_device, resolve_dtype

    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wait_for_quiet()
    numel = (256 << 20) // 4 if device.type == "cuda" else (128 << 20) // 4
    source = torch.ones(numel, dtype=torch.float32, device=device)
    target = torch.ones_like(source)
    copy_seconds = _timed(lambda target=target, source=source: target.copy_(source), repeats, synchronize)
    measured = Measurements(hardware, str(dtype).removeprefix("torch."), bandwidth=2 * source.nbytes / copy_seconds)
    del source, target
    # One cache-resident weight per shape: this is the compute side of the GEMM roofline; the step
    # model adds the cost of streaming every layer's weights from memory at small M.
    layer_weights = [torch.randn(k, n, dtype=dtype, device=device) * 0.02 for _, k, n in layer_gemm_shapes(model_config)]
    head = torch.randn(model_config.hidden_size, model_config.vocab_size, dtype=dtype, device=device) * 0.02
    # Two passes over the sizes, at different times, keeping each one's fastest: a burst of other
    # jobs that slowed one size (and so bent the curve's shape) rarely hits it twice.
    fastest: dict[tuple[int, int, int], float] = {}
    for _ in range(2 if device.type == "cpu" else 1):
        for rows in GEMM_ROWS:
            wait_for_quiet(5.0)
            for weight in layer_weights + ([head] if rows <= 256 else []):  # lm_head only sees sampled rows
                inputs = torch.randn(rows, weight.shape[0], dtype=dtype, device=device)
                key = (rows, weight.shape[0], weight.shape[1])
                product = (lambda inputs=inputs, weight=weight: inputs @ weight)
                seconds = (_graph_timed(product, repeats) if device.type == "cuda"
                           else _timed(product, repeats, synchronize))
                fastest[key] = min(fastest.get(key, float("inf")), seconds)
    measured.gemms = [(*key, seconds) for key, seconds in fastest.items()]
    del layer_weights, head
    # Causal attention over prompts long enough to leave the launch-bound regime (graph-timed on a GPU:
    # a single eager 1x1024 call measured ~76 TFLOP/s on an H100, a quarter of the paged kernel's rate).
    heads, head_dim = model_config.num_attention_heads, model_config.head_dim
    batch, length = (4, 2048) if device.type == "cuda" else (1, 1024)
    query = torch.randn(batch, heads, length, head_dim, dtype=dtype, device=device)
    attend = (lambda: F.scaled_dot_product_attention(query, query, query, is_causal=True))
    attention_seconds = _graph_timed(attend, repeats) if device.type == "cuda" else _timed(attend, repeats, synchronize)
    measured.attention_flops = batch * 4.0 * heads * head_dim * length * (length + 1) / 2 / attention_seconds
    return measured


GRAPHED_CALLS = 20


def _graph_timed(function, repeats: int, calls: int = GRAPHED_CALLS) -> float:
    """Seconds per call of ``function`` replayed ``calls`` times from one CUDA graph.

    The engine's decode steps and prompt chunks replay CUDA graphs, so a GEMM there costs its kernel
    time, not an eager launch and a synchronisation (~20 us, more than a small GEMM's kernel): timing
    single eager calls made every decode-sized GEMM look launch-bound."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function()  # warm-up outside the capture (cuBLAS picks its kernel and workspace)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            function()
    return _timed(graph.replay, repeats, torch.cuda.synchronize) / calls


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


def merge_measurements(runs: list[Measurements]) -> Measurements:
    """Several calibration runs of the same scenarios as one: the fastest time of each step and GEMM and
    the highest bandwidth and attention rate (contention only ever slows a measurement down)."""
    if not runs:
        raise ValueError("nothing to merge")
    first = runs[0]
    if any((run.hardware, run.dtype) != (first.hardware, first.dtype) for run in runs):
        raise ValueError("can only merge measurements of one hardware kind and dtype")
    gemms: dict[tuple[int, int, int], float] = {}
    for run in runs:
        for rows, k, n, seconds in run.gemms:
            gemms[(rows, k, n)] = min(seconds, gemms.get((rows, k, n), seconds))
    steps = []
    for index, step in enumerate(first.steps):
        same = [run.steps[index] for run in runs if index < len(run.steps) and run.steps[index].shape == step.shape]
        steps.append(StepSample(step.scenario, step.shape, min(s.seconds for s in same),
                                min(s.executor_seconds for s in same)))
    return Measurements(first.hardware, first.dtype, max(run.bandwidth for run in runs),
                        [(*key, seconds) for key, seconds in gemms.items()],
                        max(run.attention_flops for run in runs), steps, first.attention_backend,
                        first.staging_max_copy_bytes, first.chunk_graph_max_tokens, first.max_graphed_chunks)


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
                "finish", "finish_token", "wake", "chunk_pass_layer")
_CHUNK_PASS_LAYER = FIT_FEATURES.index("chunk_pass_layer")


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
        eager_chunk * sequences * layers, eager_chunk * layers, rebuilt, decode_only * linear, memory,
        shape.num_finished, shape.finished_tokens, 1.0 if shape.after_idle else 0.0,
        graphed_chunks * layers * replays,
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
    return profile


OUTLIER_SLOWDOWN = 0.3


_DEVICE_FEATURES = [FIT_FEATURES.index(name) for name in
                    ("linear", "attention_prefill", "attention_decode", "elementwise", "linear_decode")]
_HOST_LAYER_FEATURES = [FIT_FEATURES.index(name) for name in ("layer", "prefill_sequence_layer", "chunk_layer")]


def _fit_once(model_config, measured: Measurements, samples: list[StepSample], regime_rounds: int = 4) -> DeviceProfile:
    """One fit over ``samples``. Where host work may overlap the device (GPU), an eager step with a
    prompt chunk takes either max(host per-layer work, device time) or their sum; the structure with
    the smaller total relative error on ``samples`` is kept (``host_overlaps_device`` says which).
    For the max form, each such step is assigned the regime the previous fit predicts for it, only
    that regime's features are kept, and the fit is repeated until the assignment settles.

    The sum won on every GPU calibration so far (H100, H200: eager steps run ~3-6 ms over their
    device time, growing with the step's sequences), which the max form, fitted from a handful of
    eager steps, turned into a flat ~30 ms of "launches" that over-predicted every smaller eager step."""
    profile = base_profile(model_config, measured)
    if not samples:
        return profile
    step_overhead = max(statistics.median(s.seconds - s.executor_seconds for s in samples), 0.0)
    features = np.array([step_features(model_config, profile, s.shape) for s in samples])
    targets = np.array([max(s.seconds - step_overhead, 1e-6) for s in samples])
    measured_seconds = np.array([s.seconds for s in samples])
    ridge = np.zeros((len(_RIDGE), len(FIT_FEATURES)))
    for row, (name, pull) in enumerate(_RIDGE.items()):
        ridge[row, FIT_FEATURES.index(name)] = pull * np.sqrt(len(samples))
    no_graphed_chunks = not features[:, _CHUNK_PASS_LAYER].any()

    def solve(matrix: np.ndarray) -> np.ndarray:
        coefficients = fit_relative_l1(matrix, targets, measured_seconds, ridge, ridge.sum(axis=1))
        if no_graphed_chunks:  # no graphed prompt-chunk step in the samples: its term is 0, not a free value
            coefficients[_CHUNK_PASS_LAYER] = 0.0
        return coefficients

    _apply(profile, solve(features), step_overhead)
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
    profile.step_overhead_s = float(step_overhead)
    profile.layer_overhead_s = float(coefficients[4])
    profile.sequence_overhead_s = float(coefficients[5])
    profile.prefill_sequence_layer_overhead_s = float(coefficients[6])
    profile.chunk_layer_overhead_s = float(coefficients[7])
    profile.staging_rebuild_s_per_token_layer = float(coefficients[8]) if profile.decode_staging else 0.0
    profile.finish_overhead_s, profile.finish_token_overhead_s, profile.wake_overhead_s = (
        float(value) for value in coefficients[11:14])
    profile.chunk_pass_layer_overhead_s = float(coefficients[_CHUNK_PASS_LAYER])


def chunk_graphs_of(engine) -> tuple[int, int]:
    """(largest captured prompt-chunk graph, most chunks a graphed step may carry); (0, 4) without them."""
    runner = getattr(engine.core.executor.inner, "chunk_runner", None)
    sizes = getattr(runner, "sizes", None)
    if not sizes:
        return 0, 4
    from joule.runtime.prefill_graphs import MAX_GRAPHED_CHUNKS

    return int(max(sizes)), int(MAX_GRAPHED_CHUNKS)


def refit(measurement_paths: list[str], model: str | None = None) -> tuple[DeviceProfile, Measurements]:
    """Fit a profile from saved measurements (merged when several), without measuring again."""
    import json

    from joule.model.config import ModelConfig
    from joule.model.loader import resolve_model_path

    runs = []
    for path in measurement_paths:
        with open(path, encoding="utf-8") as handle:
            runs.append(Measurements.from_dict(json.load(handle)))
    merged = merge_measurements(runs)
    model_path = resolve_model_path(model)
    profile = fit_profile(ModelConfig.from_file(model_path / "config.json"), merged)
    profile.source = (
        f"joule perf calibrate --refit of {len(runs)} run(s) on {merged.hardware}, {merged.dtype}, model "
        f"{model_path.name}, {len(merged.steps)} steps, {time.strftime('%Y-%m-%d')}"
    )
    return profile, merged


def calibrate(model: str | None = None, dtype: str = "auto", device: str = "auto", load_format: str = "auto",
              hardware: str | None = None, repeats: int = 3, scenarios=None,
              log=print) -> tuple[DeviceProfile, Measurements]:
    """Measure and fit; returns the profile and the raw measurements."""
    import torch

    hardware = get_hardware(hardware).name if hardware else detect_hardware()
    started = time.perf_counter()
    engine = build_engine(model, dtype, load_format, device)
    dtype_name = str(engine.dtype).removeprefix("torch.")
    log(f"calibrating {hardware} ({dtype_name}, {torch.get_num_threads()} threads) on {engine.model_path}")
    measured = measure_micro(engine.model_config, dtype_name, str(engine.device), hardware)
    log(f"  copy {measured.bandwidth / 1e9:.1f} GB/s, attention {measured.attention_flops / 1e9:.1f} GFLOP/s, "
        f"{len(measured.gemms)} GEMMs ({time.perf_counter() - started:.0f} s)")
    measured.attention_backend = attention_backend_name(engine)
    staging = engine.core.executor.staging
    measured.staging_max_copy_bytes = staging.max_copy_bytes if staging is not None else 0.0
    measured.chunk_graph_max_tokens, measured.max_graphed_chunks = chunk_graphs_of(engine)
    measured.steps = measure_steps(engine, scenarios or default_scenarios(engine), repeats, log=log)
    log(f"  {len(measured.steps)} engine steps measured ({time.perf_counter() - started:.0f} s)")
    profile = fit_profile(engine.model_config, measured)
    profile.source = (
        f"joule perf calibrate on {hardware}, {dtype_name}, model {engine.model_path.name}, "
        f"{len(measured.steps)} steps, {time.strftime('%Y-%m-%d')}"
    )
    return profile, measured
