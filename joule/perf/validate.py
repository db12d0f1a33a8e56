"""Check a profile against the real engine: per-step latency and whole runs, simulated vs measured.

``validate_steps`` runs batch compositions that calibration never saw and
compares each step's wall time with the step model. ``compare_run`` replays
one workload (offline, or with timed arrivals) on the real ``LLMEngine`` and in
the simulator, with the same prompts, KV capacity and scheduler settings, and
compares throughput, TTFT and TPOT. Imports the runtime lazily (torch).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from joule.engine.core import lookahead_on
from joule.heap import heap_frozen_while_running
from joule.perf.arrivals import TimedRequest
from joule.perf.measure import Scenario, infer_step_events, measure_steps
from joule.perf.metrics import percentiles
from joule.perf.profile import DeviceProfile
from joule.perf.resimulate import replica_settings, simulate_with
from joule.perf.step_model import BatchShape, SequenceWork, StepModel

VALIDATION_SCENARIOS = (
    Scenario("prefill 1x100", (100,), 2),
    Scenario("prefill 1x450", (450,), 2),
    Scenario("prefill 1x1500", (1500,), 2),
    Scenario("prefill 5x90", (90,) * 5, 2),
    Scenario("decode 2 @ 250", (250,) * 2, 6),
    Scenario("decode 12 @ 600", (600,) * 12, 5),
    Scenario("decode 32 @ 64", (64,) * 32, 6),
    Scenario("decode 64 @ 120", (120,) * 64, 5),
    Scenario("mixed 4 decodes + 128", (200,) * 4, 6, (128,), 3),
    Scenario("mixed 30 decodes + 500", (50,) * 30, 5, (500,), 3),
)

GPU_VALIDATION_SCENARIOS = (
    Scenario("prefill 1x300", (300,), 1),
    Scenario("prefill 1x4000", (4000,), 1),
    Scenario("prefill 12x400", (400,) * 12, 1),
    Scenario("decode 4 @ 2000", (2000,) * 4, 8),
    Scenario("decode 48 @ 600", (600,) * 48, 8),
    Scenario("decode 128 @ 120", (120,) * 128, 8),
    Scenario("decode 256 @ 500", (500,) * 256, 6),
    Scenario("mixed 24 decodes + 2000", (400,) * 24, 8, (2000,), 3),
    Scenario("mixed 160 decodes + 600", (150,) * 160, 8, (600,), 3),
)


def random_validation_grid(seed: int, gpu: bool) -> tuple[Scenario, ...]:
    """A fresh grid of step compositions drawn from ``seed`` (numpy's generator, deterministic): 3 prefill
    scenarios (one short, one long, several prompts), 4 decode batches and 2 mixed ones (decodes plus a
    prompt arriving after 3 steps), sizes log-uniform over the ranges a serving run meets on the device.
    A re-validation on a seed nobody fitted or tuned against checks the model honestly; compositions
    equal to a calibration scenario's are drawn again."""
    from joule.perf.measure import CALIBRATION_SCENARIOS, GPU_CALIBRATION_SCENARIOS

    rng = np.random.default_rng(seed)
    # (prefill short, prefill long, prompts in a multi-prefill, their length, decode batch, decode
    # context, mixed decodes, mixed chunk); the CPU's KV cache (512 MiB for calibration) holds ~11k
    # tokens of the default model, the GPU's a few 100k.
    ranges = dict(short=(32, 600), long=(1000, 7000), many=(5, 14), many_len=(150, 600), batch=(2, 256),
                  context=(64, 2500), mixed=(8, 192), chunk=(200, 3000), kv=150_000) if gpu else dict(
                  short=(32, 300), long=(400, 1800), many=(2, 6), many_len=(40, 200), batch=(2, 64),
                  context=(32, 700), mixed=(2, 32), chunk=(64, 700), kv=6_000)

    def draw(name: str) -> int:
        low, high = ranges[name]
        return int(round(np.exp(rng.uniform(np.log(low), np.log(high)))))

    taken = {(scenario.prompts, scenario.late_prompts)
             for scenario in (GPU_CALIBRATION_SCENARIOS if gpu else CALIBRATION_SCENARIOS)}
    scenarios: list[Scenario] = []

    def add(make) -> None:
        while True:
            scenario = make()
            if (scenario.prompts, scenario.late_prompts) not in taken:
                taken.add((scenario.prompts, scenario.late_prompts))
                scenarios.append(scenario)
                return

    def decode() -> Scenario:
        batch = draw("batch")
        context = min(draw("context"), max(16, ranges["kv"] // batch - 16))
        return Scenario(f"decode {batch} @ {context}", (context,) * batch, 8)

    def mixed() -> Scenario:
        batch, chunk = draw("mixed"), draw("chunk")
        context = min(draw("context"), max(16, (ranges["kv"] - chunk) // batch - 16))
        return Scenario(f"mixed {batch} decodes @ {context} + {chunk}", (context,) * batch, 8, (chunk,), 3)

    add(lambda: (lambda n: Scenario(f"prefill 1x{n}", (n,), 1))(draw("short")))
    add(lambda: (lambda n: Scenario(f"prefill 1x{n}", (n,), 1))(draw("long")))
    add(lambda: (lambda k, n: Scenario(f"prefill {k}x{n}", (n,) * k, 1))(draw("many"), draw("many_len")))
    for _ in range(4):
        add(decode)
    for _ in range(2):
        add(mixed)
    return tuple(scenarios)


@dataclass
class StepCheck:
    scenario: str
    kind: str  # prefill, decode or mixed
    num_sequences: int
    num_tokens: int
    measured_s: float
    predicted_s: float
    # [new rows, cached tokens, samples (0/1)] per sequence: lets a saved report be re-predicted
    # with another profile (``recheck``) without measuring again.
    sequences: list[list[int]] = field(default_factory=list)
    staging: str = ""  # BatchShape.staging and staging_capacity
    staging_capacity: int = 0
    after_idle: bool = False  # BatchShape.after_idle; each sequence's 4th entry is its ``finishes``
    queued: bool = False  # BatchShape.queued: launched behind the step before (the decode lookahead)

    @property
    def error(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s

    @property
    def shape(self) -> BatchShape:
        return BatchShape([SequenceWork(q, c, bool(sampled), bool(rest and rest[0])) for q, c, sampled, *rest in self.sequences],
                          self.staging, self.staging_capacity, self.after_idle, self.queued)

    @classmethod
    def of(cls, scenario: str, shape: BatchShape, measured_s: float, model: StepModel) -> StepCheck:
        compact = [[s.num_new_tokens, s.context_length, int(s.samples), int(s.finishes)] for s in shape.sequences]
        return cls(scenario, step_kind(shape), len(shape.sequences), shape.num_tokens, measured_s,
                   model.predict(shape).elapsed_seconds, compact, shape.staging, shape.staging_capacity,
                   shape.after_idle, shape.queued)


def step_kind(shape) -> str:
    if shape.is_decode_only:
        return "decode"
    if all(s.num_new_tokens > 1 for s in shape.sequences):
        return "prefill"
    return "mixed"


def validate_steps(engine, profile: DeviceProfile, scenarios=None, repeats: int = 3, reduce=None) -> list[StepCheck]:
    """Predicted vs measured (``reduce`` over repeats, as calibration) for every step of the scenarios."""
    from joule.perf.measure import default_scenarios

    model = StepModel(engine.model_config, profile)
    samples = measure_steps(engine, scenarios or default_scenarios(engine, validation=True), repeats, reduce)
    return [StepCheck.of(sample.scenario, sample.shape, sample.seconds, model) for sample in samples]


def recheck(checks: list[StepCheck], model: StepModel) -> list[StepCheck]:
    """The same measured steps predicted by another model (a refit profile), without measuring."""
    return [StepCheck.of(check.scenario, check.shape, check.measured_s, model) for check in checks]


def checks_from_report(section: dict, runs: bool | None = None) -> list[StepCheck]:
    """The step checks a report section saved (``summarize_checks(..., keep_steps=True)``).

    Reports saved before finishing requests and idle starts were recorded get them inferred
    (``infer_step_events``): per scenario for the step grid, from the step sequence for whole runs
    (``runs``; by default, when every check is named "run")."""
    rows = section.get("step_checks", [])
    checks = [StepCheck(**row) for row in rows]
    if rows and "after_idle" not in rows[0]:
        if runs is None:
            runs = all(check.scenario == "run" for check in checks)
        shapes = infer_step_events([check.shape for check in checks],
                                   None if runs else [check.scenario for check in checks])
        for check, shape in zip(checks, shapes):
            check.sequences = [[s.num_new_tokens, s.context_length, int(s.samples), int(s.finishes)]
                               for s in shape.sequences]
            check.after_idle = shape.after_idle
    return checks


def summarize_checks(checks: list[StepCheck], keep_steps: bool = True) -> dict:
    by_kind = {}
    for kind in ("prefill", "decode", "mixed"):
        errors = [abs(c.error) for c in checks if c.kind == kind]
        if errors:
            by_kind[kind] = {"steps": len(errors), "median_abs_error": statistics.median(errors)}
    by_scenario = {}
    for check in checks:
        by_scenario.setdefault(check.scenario, []).append(check)
    summary = {
        "steps": len(checks),
        "median_abs_error": statistics.median(abs(c.error) for c in checks),
        "by_kind": by_kind,
        "by_scenario": {
            name: {"steps": len(group), "median_measured_s": statistics.median(c.measured_s for c in group),
                   "median_predicted_s": statistics.median(c.predicted_s for c in group),
                   "median_error": statistics.median(c.error for c in group)}
            for name, group in by_scenario.items()
        },
    }
    if keep_steps:
        summary["step_checks"] = [asdict(check) for check in checks]
    return summary


def measure_run(engine, requests: list[TimedRequest], streamed: bool = True) -> dict:
    """Serve timed requests on the real engine in wall-clock time; vLLM-style latency metrics. ``streamed``: DELTA
    outputs every step, as a streaming server asks; else FINAL_ONLY, as ``LLM.generate`` (token times from each
    request's metrics)."""
    with heap_frozen_while_running():  # as LLM.generate runs (joule/heap.py)
        return _measure_run(engine, requests, streamed)


def _measure_run(engine, requests: list[TimedRequest], streamed: bool) -> dict:
    from joule.energy.meter import MEASURED
    from joule.sampling_params import RequestOutputKind, SamplingParams

    pending = sorted(requests, key=lambda r: r.arrival_time)
    records: dict[str, dict] = {}
    steps: list = []  # (batch shape, wall seconds) of every step, when the executor records shapes
    started = time.time()
    next_index = 0
    idle = True  # the engine has had nothing to run since the last step (or ever): the next step wakes it
    output_kind = RequestOutputKind.DELTA if streamed else RequestOutputKind.FINAL_ONLY
    meter = engine.energy_meter if engine.energy_meter.source == MEASURED else None
    joules_before = meter.read_joules() if meter is not None else None
    while next_index < len(pending) or engine.has_unfinished_requests():
        now = time.time() - started
        while next_index < len(pending) and pending[next_index].arrival_time <= now:
            timed = pending[next_index]
            next_index += 1
            params = SamplingParams(max_tokens=timed.request.output_len, ignore_eos=True, temperature=0.0,
                                    output_kind=output_kind)
            engine.add_request(timed.request_id, {"prompt_token_ids": timed.request.prompt_token_ids}, params,
                               arrival_time=started + timed.arrival_time)
            records[timed.request_id] = {"arrival": started + timed.arrival_time, "tokens": 0}
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[next_index].arrival_time - (time.time() - started)))
            idle = True
            continue
        step_started = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - step_started
        executor = engine.core.executor
        metered = engine.core.step_observer is not None
        shape = executor.with_events(outputs, idle, metered) if hasattr(executor, "with_events") else None
        if shape is not None and engine.core.last_step.num_sequences:
            steps.append((shape, elapsed))
            idle = False
        for output in outputs:
            record = records[output.request_id]
            produced = sum(len(completion.token_ids) for completion in output.outputs)
            if produced:
                record.setdefault("first", output.metrics.first_token_time)
                record["last"] = output.metrics.last_token_time
                record["tokens"] += produced
    elapsed = time.time() - started
    joules = meter.read_joules() - joules_before if meter is not None else None
    done = list(records.values())
    tokens = sum(r["tokens"] for r in done)
    return {
        "makespan_s": elapsed,
        "output_throughput": tokens / elapsed,
        "ttft_s": percentiles([r["first"] - r["arrival"] for r in done]),
        "tpot_s": percentiles([(r["last"] - r["first"]) / (r["tokens"] - 1) for r in done if r["tokens"] > 1]),
        "output_tokens": tokens,
        "steps": steps,
        "energy_j": joules,  # what a hardware meter counted over the run; None where the meter estimates
    }


def simulate_like_engine(engine, profile: DeviceProfile, requests: list[TimedRequest], streamed: bool = True) -> dict:
    """The same requests in the simulator, with the engine's KV capacity, scheduler settings and metering, and the
    run's output kind."""
    return simulate_with(engine.model_config, profile, replica_settings(engine, streamed), requests)


def compare_run(engine, profile: DeviceProfile, requests: list[TimedRequest], repeats: int = 3,
                warmup: bool = True, quiet_wait_s: float = 10.0, decode_lookahead: bool | None = None,
                streamed: bool = True) -> dict:
    """Measured vs simulated for one workload; each measured metric is its median over ``repeats`` runs
    (on a CPU, runs during which other processes took more than ``CONTENDED_SHARE`` of the machine
    are repeated, up to ``repeats`` more, and left out when clean ones exist).

    The simulator has no cold start, so neither should the measured runs: an unmeasured warm-up
    replays the first quarter of the requests (on a GPU, mixed steps compile kernel variants on
    first use). Both sides then see the same prompts, arrival times, KV capacity and scheduler
    settings, an empty prefix cache, and vLLM's TTFT/TPOT definitions (``measure_run``, metrics.py).
    ``decode_lookahead`` (None: the engine's default, on with CUDA) is set on the engine for these runs and
    given to the simulator; the step grid (``validate_steps``) times steps one by one without it. ``streamed``: the
    requests ask for DELTA outputs (a streaming server), else FINAL_ONLY (``LLM.generate``); both sides know it.
    """
    lookahead = lookahead_on(decode_lookahead, engine.device.type == "cuda")
    before = engine.core.decode_lookahead
    engine.core.decode_lookahead = lookahead
    try:
        return _compare_run(engine, profile, requests, repeats, warmup, quiet_wait_s, streamed)
    finally:
        engine.core.decode_lookahead = before


def _compare_run(engine, profile: DeviceProfile, requests: list[TimedRequest], repeats: int,
                 warmup: bool, quiet_wait_s: float, streamed: bool) -> dict:
    import os

    from joule.perf.measure import (
        CONTENDED_SHARE,
        ForeignLoad,
        copy_bandwidth,
        wait_for_quiet,
    )

    if warmup and requests:
        ordered = sorted(requests, key=lambda timed: timed.arrival_time)
        warm = [replace(timed, request_id=f"warmup-{timed.request_id}") for timed in ordered[: max(4, len(ordered) // 4)]]
        measure_run(engine, warm, streamed)
        engine.block_manager.reset_prefix_cache()
    all_runs = []
    for attempt in range(2 * repeats):  # contended runs (see ForeignLoad) are repeated, up to as many again
        if sum(run["clean"] for run in all_runs) >= repeats or (attempt >= repeats and not on_cpu(engine)):
            break
        wait_for_quiet(quiet_wait_s)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        bandwidth = copy_bandwidth()
        with ForeignLoad() as foreign:
            run = measure_run(engine, requests, streamed)
        engine.block_manager.reset_prefix_cache()
        all_runs.append(run | {"load_average_before": load, "foreign_cpu_share": foreign.share,
                               "host_copy_gbps_before": bandwidth / 1e9,
                               "clean": foreign.share <= CONTENDED_SHARE or not on_cpu(engine)})
    runs = [run for run in all_runs if run["clean"]] or all_runs
    simulated = simulate_like_engine(engine, profile, requests, streamed)
    measured = {
        "output_throughput": statistics.median(run["output_throughput"] for run in runs),
        "makespan_s": statistics.median(run["makespan_s"] for run in runs),
        "ttft_s_p50": statistics.median(run["ttft_s"]["p50"] for run in runs),
        "tpot_s_p50": statistics.median(run["tpot_s"]["p50"] for run in runs),
    }
    simulated_values = {"output_throughput": simulated["output_throughput"], "makespan_s": simulated["makespan_s"],
                        "ttft_s_p50": simulated["ttft_s"]["p50"], "tpot_s_p50": simulated["tpot_s"]["p50"]}
    if all(run["energy_j"] is not None for run in runs):  # a hardware meter: the energy model is checked too
        measured["energy_j"] = statistics.median(run["energy_j"] for run in runs)
        simulated_values["energy_j"] = simulated["energy_j"]
    comparison = {
        key: {"measured": measured[key], "simulated": simulated_values[key],
              "error": (simulated_values[key] - measured[key]) / measured[key]}
        for key in measured
    }
    comparison["runs"] = [
        {"output_throughput": run["output_throughput"], "ttft_s_p50": run["ttft_s"]["p50"],
         "tpot_s_p50": run["tpot_s"]["p50"], "steps": len(run["steps"]), "used": run in runs,
         "load_average_before": run["load_average_before"], "foreign_cpu_share": run["foreign_cpu_share"],
         "host_copy_gbps_before": run["host_copy_gbps_before"]}
        for run in all_runs
    ]
    comparison["simulated_steps"] = simulated["num_steps"]
    comparison["simulation"] = replica_settings(engine, streamed)  # what re-simulating it later needs (resimulate.py)
    model = StepModel(engine.model_config, profile)
    checks = [StepCheck.of("run", shape, seconds, model) for run in runs for shape, seconds in run["steps"]]
    if checks:
        comparison["run_steps"] = summarize_checks(checks)
        del comparison["run_steps"]["by_scenario"]
        comparison["run_steps"]["measured_total_s"] = sum(c.measured_s for c in checks)
        comparison["run_steps"]["predicted_total_s"] = sum(c.predicted_s for c in checks)
    return comparison


def on_cpu(engine) -> bool:
    return engine.device.type == "cpu"


def median_abs(values) -> float:
    return float(np.median(np.abs(np.asarray(values, dtype=float))))
