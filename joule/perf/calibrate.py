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

import time
from dataclasses import dataclass, field, fields

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
from joule.perf.energy_fit import ENERGY_SCENARIOS, GPU_ENERGY_SCENARIOS, EnergyWindow, measure_energy_windows
from joule.perf.host_probe import host_probe_seconds
from joule.perf.output_costs import OutputCosts, measure_output_costs
from joule.perf.profile import DeviceProfile
from joule.perf.step_fit import (  # noqa: F401  (re-exported: the calibration API in one place)
    FIT_FEATURES,
    base_profile,
    fit_profile,
    gemm_curves,
    step_features,
)
from joule.perf.step_model import BatchShape, SequenceWork, layer_gemm_shapes

GEMM_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)  # small M in detail: decode batches
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
    # Host costs of streamed outputs and metering (``joule.perf.output_costs``); None in files saved before them.
    output_costs: OutputCosts | None = None
    # What a hardware meter counted over windows of steady work (``joule.perf.energy_fit``); none without one.
    energy_windows: list[EnergyWindow] = field(default_factory=list)
    energy_meter: str = ""
    host_probe_s: float = 0.0  # ``joule.perf.host_probe`` on the calibrating host; 0 in files saved before it

    @classmethod
    def from_dict(cls, data: dict) -> Measurements:
        """Inverse of ``dataclasses.asdict``: refit a profile from saved measurements without torch."""
        saved = data.get("steps", [])
        shapes = [BatchShape([SequenceWork(**s) for s in step["shape"]["sequences"]], step["shape"].get("staging", ""),
                             step["shape"].get("staging_capacity", 0), step["shape"].get("after_idle", False),
                             step["shape"].get("queued", False), step["shape"].get("metered", True))
                  for step in saved]
        if saved and "after_idle" not in saved[0]["shape"]:  # saved before request events were recorded
            shapes = infer_step_events(shapes, [step["scenario"] for step in saved])
        steps = [StepSample(step["scenario"], shape, step["seconds"], step["executor_seconds"])
                 for step, shape in zip(saved, shapes)]
        return cls(data["hardware"], data["dtype"], data["bandwidth"], [tuple(g) for g in data["gemms"]],
                   data["attention_flops"], steps, data.get("attention_backend", ""),
                   data.get("staging_max_copy_bytes", 0.0), data.get("chunk_graph_max_tokens", 0),
                   data.get("max_graphed_chunks", 4),
                   OutputCosts(**data["output_costs"]) if data.get("output_costs") else None,
                   [EnergyWindow(**window) for window in data.get("energy_windows", [])],
                   data.get("energy_meter", ""), data.get("host_probe_s", 0.0))


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

    from joule.runtime.graph_timing import repeated_graph

    return _timed(repeated_graph(function, calls).replay, repeats, torch.cuda.synchronize) / calls


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
                        first.staging_max_copy_bytes, first.chunk_graph_max_tokens, first.max_graphed_chunks,
                        _cheapest_output_costs([run.output_costs for run in runs]),
                        [window for run in runs for window in run.energy_windows],  # more windows, a steadier fit
                        next((run.energy_meter for run in runs if run.energy_meter), ""),
                        min((run.host_probe_s for run in runs if run.host_probe_s), default=0.0))


def _cheapest_output_costs(costs: list[OutputCosts | None]) -> OutputCosts | None:
    """Like the steps, the fastest of several runs' output costs, term by term."""
    known = [cost for cost in costs if cost is not None]
    if not known:
        return None
    return OutputCosts(*(min(getattr(cost, term.name) for cost in known) for term in fields(OutputCosts)))


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
    from joule.model.config import ModelConfig
    from joule.model.loader import resolve_model_path
    from joule.perf.json_files import read_json

    runs = [Measurements.from_dict(read_json(path)) for path in measurement_paths]
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
    measured.output_costs = measure_output_costs(engine)
    costs = measured.output_costs
    log(f"  host output costs: streamed {1e6 * costs.streamed_sequence_s:.2f} us a sequence, metering "
        f"{1e6 * costs.metered_step_s:.1f} us a step + {1e6 * costs.metered_sequence_s:.2f} us a sequence")
    measure_energy(engine, measured, log)
    measured.host_probe_s = host_probe_seconds()
    log(f"  host probe: {1e3 * measured.host_probe_s:.0f} ms")
    profile = fit_profile(engine.model_config, measured)
    profile.source = (
        f"joule perf calibrate on {hardware}, {dtype_name}, model {engine.model_path.name}, "
        f"{len(measured.steps)} steps, {time.strftime('%Y-%m-%d')}"
    )
    return profile, measured


def measure_energy(engine, measured: Measurements, log=print) -> None:
    """Energy windows (``joule.perf.energy_fit``) where the engine's meter measures; else the catalog's energies
    stay, and the log says so."""
    from joule.energy.meter import MEASURED
    from joule.perf.step_model import StepModel

    meter = engine.energy_meter
    if meter.source != MEASURED:
        log(f"  energy: {meter.name} is an estimate, not a meter: the catalog's energy coefficients stay")
        return
    scenarios = GPU_ENERGY_SCENARIOS if engine.device.type == "cuda" else ENERGY_SCENARIOS
    counting = StepModel(engine.model_config, base_profile(engine.model_config, measured))
    # Read the hardware counter itself at the windows' ends, not a background sampler's extrapolation.
    measured.energy_windows = measure_energy_windows(engine, counting, scenarios, getattr(meter, "inner", meter),
                                                     log=log)
    measured.energy_meter = meter.name

