"""Running the real engine for measurements: scenarios and their steps (the recording executor lives in
``recording``, quiet-window timing in ``machine_load``).

Shared by calibration (fit) and validation (check). Imports torch and the runtime lazily.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace

import numpy as np

from joule.heap import heap_frozen_while_running
from joule.perf.hardware import get_hardware
from joule.perf.machine_load import (  # noqa: F401  (re-exported: calibrate and validate import them here)
    CONTENDED_SHARE,
    ForeignLoad,
    _timed,
    copy_bandwidth,
    wait_for_quiet,
)
from joule.perf.recording import RecordingExecutor  # noqa: F401  (re-exported: calibration, the step log)
from joule.perf.step_model import BatchShape, DecodeStaging


@dataclass(frozen=True)
class Scenario:
    """Requests to run through the engine: ``prompts`` at once, ``late_prompts`` after some steps.

    ``waves`` adds more arrivals, ``(after_steps, prompt lengths)`` each: staggered arrivals make
    the changing decode batches and mixed steps of a serving run, which fixed batches never show.
    """

    name: str
    prompts: tuple[int, ...]
    max_tokens: int
    late_prompts: tuple[int, ...] = ()
    late_after_steps: int = 0
    waves: tuple[tuple[int, tuple[int, ...]], ...] = ()
    # Run with the decode lookahead: only the steps it queues behind another are kept, timed back to back.
    lookahead: bool = False

    def arrivals(self) -> dict[int, tuple[int, ...]]:
        """Prompt lengths to add before each step index (0: at the start)."""
        arrivals: dict[int, tuple[int, ...]] = {0: self.prompts}
        extra = ((self.late_after_steps, self.late_prompts),) if self.late_prompts else ()
        for after, lengths in extra + self.waves:
            if after < 0:
                raise ValueError(f"scenario {self.name!r}: arrivals after {after} steps; must be >= 0")
            arrivals[after] = arrivals.get(after, ()) + tuple(lengths)
        return arrivals


def _serving_like(name: str, lengths: tuple[int, ...], every: int, max_tokens: int) -> Scenario:
    """One prompt arriving every ``every`` steps, cycling through ``lengths``."""
    waves = tuple((every * index, (length,)) for index, length in enumerate(lengths) if index)
    return Scenario(name, lengths[:1], max_tokens, waves=waves)


# Compositions used to fit. Validation (validate.py) uses different ones.
CALIBRATION_SCENARIOS = (
    Scenario("prefill 1x48", (48,), 1),
    Scenario("prefill 1x700", (700,), 1),
    Scenario("prefill 3x200", (200, 200, 200), 1),
    Scenario("chunked 1x2300", (2300,), 1),
    Scenario("decode 1 @ 400", (400,), 6),
    Scenario("decode 4 @ 170", (170,) * 4, 6),
    Scenario("decode 6 @ 40", (40,) * 6, 6),
    Scenario("decode 20 @ 160", (160,) * 20, 6),
    Scenario("decode 48 @ 24", (24,) * 48, 6),
    Scenario("decode 56 @ 48", (48,) * 56, 6),  # dense copies beyond their bound: padded gathers
    Scenario("mixed 12 decodes + 300", (96,) * 12, 6, (300,), 3),
    _serving_like("staggered 60..220, every 5 steps", (60, 220, 140, 90, 180, 60, 220, 140), 5, 16),
    _serving_like("staggered 60..220, every 2 steps", (100, 200, 60, 160, 120, 220, 90, 140, 180, 60), 2, 16),
)

# On a GPU the same shapes are too small to leave the launch-bound regime: larger batches.
GPU_CALIBRATION_SCENARIOS = (
    Scenario("prefill 1x64", (64,), 1),
    Scenario("prefill 1x1500", (1500,), 1),
    Scenario("prefill 6x700", (700,) * 6, 1),
    Scenario("chunked 1x12000", (12000,), 1),
    Scenario("decode 1 @ 900", (900,), 8),
    Scenario("decode 16 @ 300", (300,) * 16, 8),
    Scenario("decode 96 @ 200", (200,) * 96, 8),
    Scenario("decode 192 @ 1000", (1000,) * 192, 8),
    Scenario("mixed 64 decodes + 1000", (300,) * 64, 8, (1000,), 3),
    _serving_like("staggered 200..900, every 3 steps", (200, 900, 500, 300, 700) * 4, 3, 24),
    # Queued steps cost max(host, device): they tell the two apart (``step_fit._fit_with_queued``).
    Scenario("lookahead decode 1 @ 600", (600,), 32, lookahead=True),
    Scenario("lookahead decode 8 @ 300", (300,) * 8, 16, lookahead=True),
    Scenario("lookahead decode 64 @ 300", (300,) * 64, 16, lookahead=True),
    Scenario("lookahead decode 192 @ 600", (600,) * 192, 12, lookahead=True),
)


def default_scenarios(engine, validation: bool = False):
    from joule.perf.validate import GPU_VALIDATION_SCENARIOS, VALIDATION_SCENARIOS

    if engine.device.type == "cuda":
        return GPU_VALIDATION_SCENARIOS if validation else GPU_CALIBRATION_SCENARIOS
    return VALIDATION_SCENARIOS if validation else CALIBRATION_SCENARIOS


@dataclass
class StepSample:
    scenario: str
    shape: BatchShape
    seconds: float  # wall time of LLMEngine.step()
    executor_seconds: float  # the model executor's own time for the step


def infer_step_events(shapes: list[BatchShape], runs: list[str] | None = None,
                      idle_at_run_start: bool = True) -> list[BatchShape]:
    """Shapes saved before finishing requests and idle starts were recorded, with both inferred.

    A sequence that computed up to position ``p`` in one step continues in the next at context ``p``
    unless its request finished; counted per position (a multiset), so equal sequences need no ids.
    ``runs`` names the run (scenario) of each step: a run's last step finishes every sequence that
    sampled, and its first step came after idle time (measurements wait for a quiet machine between
    runs) when ``idle_at_run_start``. Without run names, a step comes after idle when the previous one
    finished every sequence it carried (an engine emptied, then waited for arrivals)."""
    result = []
    for index, shape in enumerate(shapes):
        run = runs[index] if runs is not None else None
        following = shapes[index + 1] if index + 1 < len(shapes) else None
        if runs is not None and (following is None or runs[index + 1] != run):
            following = None
        waiting: dict[int, int] = {}
        for sequence in (following.sequences if following is not None else ()):
            waiting[sequence.context_length] = waiting.get(sequence.context_length, 0) + 1
        sequences = []
        for sequence in shape.sequences:
            reached = sequence.context_length + sequence.num_new_tokens
            continues = waiting.get(reached, 0) > 0
            if continues:
                waiting[reached] -= 1
            sequences.append(replace(sequence, finishes=sequence.samples and not continues))
        if runs is not None:
            after_idle = idle_at_run_start and (index == 0 or runs[index - 1] != run)
        else:
            after_idle = index == 0 or all(s.finishes for s in result[-1].sequences)
        result.append(replace(shape, sequences=sequences, after_idle=after_idle))
    return result


def detect_hardware() -> str:
    """Catalog name for the current device (CUDA device name, else the CPU by core count)."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().upper()
        for key in ("H200", "H100", "A100", "L40S", "L4", "A10G"):
            if key in name:
                return get_hardware(key).name
        raise ValueError(f"GPU {name!r} is not in the catalog; pass --hardware")
    return detect_cpu_hardware()


def detect_cpu_hardware() -> str:
    """Catalog name for this machine's CPU: the 2-core development machine's kind, else the generic server CPU."""
    return "CPU-2core" if (os.cpu_count() or 1) <= 2 else "CPU"


def build_engine(model: str | None, dtype: str, load_format: str, device: str = "auto",
                 max_num_batched_tokens: int | None = None, kv_cache_memory_bytes: int | None = None):
    """An LLMEngine whose executor records each plan's batch shape (CPU: 2048-token steps, 512 MiB KV)."""
    from joule.config import EngineConfig
    from joule.llm_engine import LLMEngine
    from joule.runtime.device import resolve_device

    if resolve_device(device).type == "cpu":
        max_num_batched_tokens = max_num_batched_tokens or 2048
        kv_cache_memory_bytes = kv_cache_memory_bytes or 512 << 20

    engine = LLMEngine(EngineConfig(
        model=model, dtype=dtype, device=device, load_format=load_format,
        max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory_bytes=kv_cache_memory_bytes,
        decode_lookahead=False,  # each step timed on its own: the step model predicts unoverlapped steps
    ))
    engine.core.executor = RecordingExecutor(engine.core.executor, decode_staging_of(engine))
    return engine


def decode_staging_of(engine) -> DecodeStaging | None:
    """The portable backend on a CPU keeps dense decode copies, bounded to half the KV cache."""
    if engine.device.type != "cpu" or attention_backend_name(engine) != "portable":
        return None
    config, kv_cache = engine.model_config, engine.core.executor.kv_cache
    element_bytes = torch_element_size(engine.dtype)
    cache_bytes = sum(cache.numel() * cache.element_size() for cache in kv_cache.key_caches + kv_cache.value_caches)
    return DecodeStaging(config.kv_cache_bytes_per_token(element_bytes), 0.5 * cache_bytes)


def torch_element_size(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def attention_backend_name(engine) -> str:
    """"triton" (paged kernels, each sequence's KV read once) or "portable" (padded gathers)."""
    executor = getattr(engine.core.executor, "inner", engine.core.executor)
    return "triton" if "triton" in type(executor.backend).__name__.lower() else "portable"


def _device_synchronizer(engine):
    if engine.device.type != "cuda":
        return lambda: None
    import torch

    return torch.cuda.synchronize


def run_scenario(engine, scenario: Scenario, seed: int = 0) -> list[StepSample]:
    """Run one scenario to completion; every step's batch shape and wall time."""
    from joule.sampling_params import RequestOutputKind, SamplingParams

    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    # DELTA, as a streaming server and validate's timed runs ask: an output per request per step.
    params = SamplingParams(max_tokens=scenario.max_tokens, ignore_eos=True, temperature=0.0,
                            output_kind=RequestOutputKind.DELTA)
    tag = f"{scenario.name}-{seed}-{time.monotonic_ns()}"
    arrivals = scenario.arrivals()

    def add(lengths, prefix):
        for index, length in enumerate(lengths):
            ids = rng.integers(3, vocab, size=length).tolist()
            engine.add_request(f"{tag}-{prefix}-{index}", {"prompt_token_ids": ids}, params)

    # A step whose prompt chunks sample nothing never waits for the GPU (no token to read back), so
    # its kernels would finish inside the next step's time: wait for them to time steps one by one.
    # With the lookahead the next step is in flight when one returns: no wait, steps timed back to back.
    synchronize = (lambda: None) if scenario.lookahead else _device_synchronizer(engine)
    lookahead_before = engine.core.decode_lookahead
    engine.core.decode_lookahead = scenario.lookahead or lookahead_before
    samples: list[StepSample] = []
    # As LLM.generate runs (joule/heap.py): no full collection of the start-up heap inside a timed step.
    with heap_frozen_while_running():
        try:
            _run_steps(engine, scenario, arrivals, add, synchronize, samples)
        finally:
            engine.core.decode_lookahead = lookahead_before
    _device_synchronizer(engine)()
    engine.block_manager.reset_prefix_cache()
    return samples


def _run_steps(engine, scenario: Scenario, arrivals: dict, add, synchronize, samples: list[StepSample]) -> None:
    steps, ran = 0, False
    while True:
        if steps in arrivals:
            add(arrivals.pop(steps), f"s{steps}")
        if not engine.has_unfinished_requests():
            if not arrivals:
                break
            add(arrivals.pop(min(arrivals)), "idle")  # a wave after the others finished: bring it forward
            continue
        started = time.perf_counter()
        outputs = engine.step()
        synchronize()
        elapsed = time.perf_counter() - started
        # A run starts after idle time (the quiet-machine wait, another run's end): its first step pays it.
        shape = engine.core.executor.with_events(outputs, after_idle=not ran,
                                                 metered=engine.core.step_observer is not None)
        steps += 1
        if engine.core.last_step.num_sequences:
            ran = True
            if shape.queued or not scenario.lookahead:
                samples.append(StepSample(scenario.name, shape, elapsed, engine.core.last_step.elapsed_seconds))


def default_reduce(engine):
    """How repeats of a step combine: the median (host-side jitter goes both ways around what a run
    will see). On a CPU only runs that other processes left alone count (``measure_steps``)."""
    return statistics.median


def measure_steps(engine, scenarios, repeats: int = 3, reduce=None, max_extra_runs: int | None = None,
                  log=None) -> list[StepSample]:
    """Each scenario ``repeats`` times (after waiting for a quiet CPU); per step index, ``reduce`` of the
    times (``default_reduce`` unless given).

    On a CPU, a run during which other processes took more than ``CONTENDED_SHARE`` of the machine
    does not count toward ``repeats``: up to ``max_extra_runs`` (default ``repeats``) more are made.
    Steps are reduced over the clean runs; when none was clean, the fastest of all runs is kept
    (contention only ever adds time). A serving run sees typical step times, not the best of
    several, hence the median of clean runs rather than their minimum.
    """
    from tqdm.auto import tqdm

    on_cpu = engine.device.type == "cpu"
    explicit = reduce is not None
    reduce = reduce or default_reduce(engine)
    max_extra_runs = repeats if max_extra_runs is None else max_extra_runs
    run_scenario(engine, Scenario("warm-up", (64, 16), 3))
    result: list[StepSample] = []
    # A bar on a terminal only (disable=None); tqdm draws between scenarios, never inside a timed step.
    for scenario in tqdm(scenarios, desc="step scenarios", unit="scenario", disable=None, leave=False,
                         dynamic_ncols=True):
        runs, clean_runs, seed = [], [], 0
        while len(clean_runs) < repeats and seed < repeats + (max_extra_runs if on_cpu else 0):
            wait_for_quiet()
            with ForeignLoad() as load:
                run = run_scenario(engine, scenario, seed)
            runs.append(run)
            seed += 1
            if load.share <= CONTENDED_SHARE or not on_cpu:
                clean_runs.append(run)
            elif log is not None:
                log(f"  {scenario.name}: other processes took {load.share:.0%} of the CPU; measuring again")
        if explicit or not on_cpu:
            chosen, combine = runs, reduce
        elif clean_runs:
            chosen, combine = clean_runs, reduce
        else:
            chosen, combine = runs, min
        for index, sample in enumerate(chosen[0]):
            same = [run[index] for run in chosen if index < len(run) and run[index].shape == sample.shape]
            result.append(StepSample(
                scenario.name, sample.shape,
                combine(s.seconds for s in same), combine(s.executor_seconds for s in same),
            ))
    return result
