"""Workload 3's host work step by step: where the steps that leave the GPU idle spend their time.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/w3_step_phases.py [out.json] [--batch-one | --cold]

``--batch-one``: the same phases for workload 1 instead (one request, 128 -> 256, greedy, graphs and the lookahead on,
unmetered, as engine_bench.py's "unmetered lookahead" row). On one host of 2026-12-06 (l) its step went 0.995 ->
1.086 ms (79.3 % of the roofline) while eager steps ran at 59 % of another start's speed: whether the host binds
a batch-1 step there, and in which phase, is what this tells.

``--cold``: workload 3's first run on a fresh engine (after only the 4-request warm-up) and the run after it, both
instrumented, then the steps the first one spent over 1 ms longer on, phase by phase, with the device allocations
(cudaMalloc) each step made. Why: a fresh engine's first run was 25.6k tok/s against 35.8k for the next ((l),
call 2); `joule bench throughput` times exactly such a first run.

Why: under the profiler (H100, 2026-12-06 (k), ``step_gaps.py w3``) the GPU idled 25 ms of a 900 ms run, mostly in
the steps around the first requests' last token (steps 125-128: 6.5-9.7 ms a step, the GPU's ~3.3) and in the
tail's shrinking batches, with a few slow steps every ~15 steps before. This times each host phase of every step
with ``perf_counter`` (cheap enough to leave the run's pace alone) and logs every garbage collection with its
generation: the engine's step, the core's step, planning the continuation, launching it, collecting, the
scheduler's update, and the outputs. Runs workload 3 twice plain (as engine_bench.py builds it), then once
instrumented; prints the slow steps' phases and the phase totals, writes every step's phases as JSON. Also the
time outside the steps, when the GPU has nothing queued: before the first (adding the requests), between them and
after the last.
"""

from __future__ import annotations

import gc
import statistics
import json
import sys
import time
from collections import defaultdict

sys.path.insert(0, "benchmarks/gpu")
from engine_bench import LLAMA_1B, build, generate  # noqa: E402
from w3_host_profile import warmed_workload_three  # noqa: E402

from joule.bench.workload import fixed_length_workload  # noqa: E402

PHASES = {"engine step": ("engine", "step"), "core step": ("core", "step"),
          "plan continuation": ("scheduler", "schedule_continuation"), "launch": ("executor", "launch"),
          "collect": ("executor", "collect"), "update": ("scheduler", "update")}

LAUNCH_PHASES = {"  continuation inputs": ("executor", "_continuation_inputs"), "  can_run": ("runner", "can_run"),
                 "  wait for last copy": ("copied", "synchronize"), "  fill": ("runner", "_fill"),
                 "  send": ("runner", "_send"), "  sampling": ("executor", "_launch_sampling"),
                 "  logits": ("model", "compute_logits"), "  tokens to host": ("executor", "_tokens_on_device"),
                 "  prepare": ("executor", "_prepare"), "  forward": ("model", "forward")}


class StepLog:
    def __init__(self) -> None:
        self.step = -1
        self.rows: list[dict] = []
        self.before_steps: dict = defaultdict(float)  # phases timed before the first step (adding the requests)
        self.first_step_at = self.last_step_end = 0.0
        self._gc_started = 0.0

    def begin_step(self) -> None:
        self.step += 1
        self.rows.append(defaultdict(float))
        if self.step == 0:
            self.first_step_at = time.perf_counter()

    def reset(self) -> None:
        self.step, self.rows = -1, []
        self.before_steps = defaultdict(float)

    def add(self, phase: str, seconds: float) -> None:
        (self.rows[-1] if self.rows else self.before_steps)[phase] += seconds * 1e3

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.add(f"gc gen{info['generation']}", time.perf_counter() - self._gc_started)
            self.add(f"gc gen{info['generation']} count", 1e-3)


def wrap(log: StepLog, owner, method: str, phase: str, begins_step: bool = False, count=None) -> None:
    """``count``: a function whose growth over each call lands in the step as ``phase + " count"``."""
    original = getattr(owner, method)

    def timed(*args, **kwargs):
        if begins_step:
            log.begin_step()
        before = count() if count is not None else 0
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            ended = time.perf_counter()
            log.add(phase, ended - started)
            if begins_step:
                log.last_step_end = ended
            if count is not None:
                log.add(phase + " count", (count() - before) * 1e-3)

    try:
        setattr(owner, method, timed)
    except (AttributeError, TypeError) as error:  # a C++-backed object without instance attributes
        print(f"not timed: {phase} ({type(error).__name__}: {error})", flush=True)


def warmed_batch_one():
    """Workload 1 as engine_bench.py's unmetered lookahead row runs it, after a warm-up and two plain runs."""
    engine, _, _ = build(LLAMA_1B, dtype="bfloat16", max_model_len=4096)
    engine.core.step_observer = None
    prompts = [fixed_length_workload(1, 128, 256, engine.model_config.vocab_size, seed=1)[0].prompt_token_ids]
    lengths = [256]
    generate(engine, [prompts[0][:32]] * 4, [4] * 4)
    for _ in range(2):
        print(f"plain run: {sum(lengths) / generate(engine, prompts, lengths)[1]:.0f} tok/s", flush=True)
    return engine, prompts, lengths


def step_ranges(num_steps: int, batch_one: bool) -> tuple[tuple[int, int], ...]:
    """Workload 3: its 256-row decode steps, then the tail; workload 1: every decode step (the first is the prompt's)."""
    return ((1, num_steps),) if batch_one else ((18, 126), (126, num_steps))


def device_allocations() -> int:
    import torch

    return torch.cuda.memory_stats().get("num_device_alloc", 0)


def instrument(engine, log: StepLog, count_allocations: bool = False) -> None:
    """``count_allocations``: each step's device allocations too (``torch.cuda.memory_stats`` around every step:
    ~0.15 ms a step on the H100's host, outside the step's own time but inside the run's)."""
    owners = {"engine": engine, "core": engine.core, "scheduler": engine.core.scheduler,
              "executor": engine.core.executor}
    wrap(log, engine, "add_request", "add_request")  # before the first step: lands in log.before_steps
    for phase, (owner, method) in PHASES.items():
        wrap(log, owners[owner], method, phase, begins_step=phase == "engine step",
             count=device_allocations if phase == "engine step" and count_allocations else None)
    # Inside the launch: the graph runner's input work, the replay itself, and the sampling launches.
    executor = engine.core.executor
    runner = executor.graph_runner
    owners.update(runner=runner, model=executor.model, copied=runner._copied)
    owners.update({f"graph {size}": graph for size, graph in runner.graphs.items()})
    for phase, (owner, method) in LAUNCH_PHASES.items():
        wrap(log, owners[owner], method, phase)
    for size in runner.graphs:
        wrap(log, owners[f"graph {size}"], "replay", "  replay")


def instrumented_run(engine, prompts, lengths, log: StepLog, batch_one: bool, label: str) -> dict:
    log.reset()
    gc.callbacks.append(log.on_gc)
    called = time.perf_counter()
    _, seconds = generate(engine, prompts, lengths)
    returned = time.perf_counter()
    gc.callbacks.remove(log.on_gc)
    print(f"{label} instrumented run: {sum(lengths) / seconds:.0f} tok/s ({seconds * 1e3:.1f} ms)", flush=True)
    # Outside every step the GPU has nothing queued: the requests' admission before, the return after.
    outside = {"before the first step": 1e3 * (log.first_step_at - called),
               "after the last step": 1e3 * (returned - log.last_step_end),
               "between the steps": 1e3 * (log.last_step_end - log.first_step_at)
               - sum(row.get("engine step", 0.0) for row in log.rows),
               **{f"{phase} (before the first step)": value for phase, value in log.before_steps.items()}}
    print("outside the steps (ms): " + ", ".join(f"{name} {value:.1f}" for name, value in outside.items()), flush=True)
    rows = [dict(row) for row in log.rows]
    for row in rows:
        row["outputs"] = row.get("engine step", 0.0) - row.get("core step", 0.0)
        row["core other"] = row.get("core step", 0.0) - sum(
            row.get(phase, 0.0) for phase in ("plan continuation", "launch", "collect", "update"))
        row["device allocs"] = round(row.pop("engine step count", 0.0))  # log.add keeps counts / 1e3 * 1e3
    detail = list(LAUNCH_PHASES) + ["  replay"]
    for start, stop in step_ranges(len(rows), batch_one):
        print(f"steps {start}-{stop - 1}, median ms: " + ", ".join(
            f"{name.strip()} {statistics.median(row.get(name, 0.0) for row in rows[start:stop]):.3f}"
            for name in COLUMNS[:7] + detail))
    print("step  " + "  ".join(f"{column:>17s}" for column in COLUMNS))
    for index, row in enumerate(rows):
        if index < 18 or row["engine step"] > (1.5 if batch_one else 3.6) or index >= len(rows) - 18:
            print(f"{index:4d}  " + "  ".join(f"{row.get(column, 0.0):17.3f}" for column in COLUMNS))
    totals = {column: sum(row.get(column, 0.0) for row in rows) for column in COLUMNS + detail}
    totals.update({f"gc gen{g} count": round(sum(row.get(f'gc gen{g} count', 0.0) for row in rows))
                   for g in range(3)})
    print("totals (ms): " + ", ".join(f"{name.strip()} {value:.1f}" for name, value in totals.items()))
    return {"seconds": seconds, "steps": rows, "totals": totals, "outside": outside}


def cold_against_warm(cold: list[dict], warm: list[dict], threshold_ms: float = 1.0) -> list[dict]:
    """The steps the cold run spent over ``threshold_ms`` longer on, each with its phases' differences."""
    slower = []
    for index, (first, second) in enumerate(zip(cold, warm)):
        if first.get("engine step", 0.0) - second.get("engine step", 0.0) > threshold_ms:
            phases = {name: round(first.get(name, 0.0) - second.get(name, 0.0), 3)
                      for name in sorted(set(first) | set(second))
                      if abs(first.get(name, 0.0) - second.get(name, 0.0)) > 0.1 * threshold_ms}
            slower.append({"step": index, **phases})
    return slower


COLUMNS = ["engine step", "plan continuation", "launch", "collect", "update", "core other", "outputs",
           "gc gen0", "gc gen1", "gc gen2", "device allocs"]


def main() -> None:
    arguments = [argument for argument in sys.argv[1:] if not argument.startswith("--")]
    batch_one = "--batch-one" in sys.argv[1:]
    cold = "--cold" in sys.argv[1:]
    out_path = arguments[0] if arguments else "w3_step_phases.json"
    engine, prompts, lengths = (warmed_batch_one() if batch_one
                                else warmed_workload_three(plain_runs=0 if cold else 2))
    log = StepLog()
    instrument(engine, log, count_allocations=cold)
    runs = [instrumented_run(engine, prompts, lengths, log, batch_one, label)
            for label in (("cold", "warm") if cold else ("",))]
    result = runs[0] if not cold else {"cold": runs[0], "warm": runs[1]}
    if cold:
        slower = cold_against_warm(runs[0]["steps"], runs[1]["steps"])
        result["cold_slower_steps"] = slower
        print(f"cold run {1e3 * (runs[0]['seconds'] - runs[1]['seconds']):.1f} ms longer; "
              f"{len(slower)} steps over 1 ms longer, phase by phase (ms):")
        for row in slower:
            print("  " + ", ".join(f"{name.strip()} {value}" for name, value in row.items()))
        print("phase totals, cold - warm (ms): " + ", ".join(
            f"{name.strip()} {runs[0]['totals'][name] - runs[1]['totals'][name]:.1f}" for name in runs[0]["totals"]
            if abs(runs[0]["totals"][name] - runs[1]["totals"].get(name, 0.0)) >= 1.0))
    with open(out_path, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
