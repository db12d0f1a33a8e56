"""What makes the calibration's queued decode steps slower than a run's: outputs, metering or the recording.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/queued_steps.py [out.json] [--rows 64]
    [--context 300] [--steps 48] [--model benchmarks/configs/llama-3.2-1b]

Why: on one H100 host of 2026-12-06 (l) the calibration's "lookahead decode 64 @ 300" steps took 2.56 ms each
(streamed DELTA outputs, the NVML energy ledger on, every plan recorded by ``perf.measure.RecordingExecutor``), while
the validation's offline run of 64 requests (FINAL_ONLY outputs) paced its decode steps at ~1.9 ms on the same machine.
The output-cost probe put streamed outputs at 3.8 us a row there and metering near 0, which leaves most of the gap
unexplained, and the fitted per-sequence host term carries it into every simulated step (docs/perf-model.md (l)).
This runs the same queued 64-row decode steps on the engine as calibration builds it (``perf.measure.build_engine``,
graphs captured, the lookahead on) under each condition in turn and reports both what calibration times (the
``step()`` call) and the pace (start to start, which the host work between steps also fills).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import asdict, dataclass

from joule.engine.core import lookahead_on
from joule.perf.json_files import write_json
from joule.perf.measure import RecordingExecutor, build_engine
from joule.runtime.cuda_graphs import enable_engine_cuda_graphs
from joule.sampling_params import RequestOutputKind, SamplingParams

# (outputs, energy ledger on, plans recorded): the run's conditions first, calibration's last.
CONDITIONS = ((RequestOutputKind.FINAL_ONLY, False, False), (RequestOutputKind.DELTA, False, False),
              (RequestOutputKind.FINAL_ONLY, True, False), (RequestOutputKind.DELTA, True, False),
              (RequestOutputKind.DELTA, True, True))


@dataclass
class ConditionResult:
    outputs: str
    metered: bool
    recorded: bool
    step_ms: float  # median wall time of LLMEngine.step(), what calibration records
    pace_ms: float  # median time from one step's start to the next's


def run_condition(engine, plain_executor, observer, rows: int, context: int, steps: int, kind, metered: bool,
                  recorded: bool, seed: int) -> ConditionResult:
    core = engine.core
    core.step_observer = observer if metered else None
    core.executor = RecordingExecutor(plain_executor) if recorded else plain_executor
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True, output_kind=kind)
    ids = [f"queued-{seed}-{index}" for index in range(rows)]
    for request_id in ids:
        engine.add_request(request_id, {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(context)]}, params)
    requests = core.scheduler.requests
    try:
        while any(requests[request_id].num_output_tokens == 0 for request_id in ids):
            engine.step()
        starts, durations = [], []
        for _ in range(steps):
            started = time.perf_counter()
            outputs = engine.step()
            durations.append(time.perf_counter() - started)
            starts.append(started)
            if recorded:  # as calibration does after each timed step
                core.executor.with_events(outputs, after_idle=False, metered=metered)
        paces = [later - earlier for earlier, later in zip(starts, starts[1:])]
    finally:
        for request_id in ids:
            engine.abort_request(request_id)
        while engine.has_unfinished_requests():
            engine.step()
        engine.block_manager.reset_prefix_cache()
        core.executor = plain_executor
    return ConditionResult(kind.value, metered, recorded, 1e3 * statistics.median(durations),
                           1e3 * statistics.median(paces))


def main(argv: list[str] | None = None) -> list[ConditionResult]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="queued_steps.json")
    parser.add_argument("--model", default="benchmarks/configs/llama-3.2-1b")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the conditions (alternated)")
    parser.add_argument("--lookahead", action=argparse.BooleanOptionalAction, default=None,
                        help="the decode lookahead (default: as the engine, on with CUDA)")
    args = parser.parse_args(argv)
    engine = build_engine(args.model, args.dtype, "dummy", args.device)
    plain_executor = engine.core.executor.inner  # build_engine wraps it in a RecordingExecutor
    engine.core.executor = plain_executor
    graphs = enable_engine_cuda_graphs(engine)
    engine.core.decode_lookahead = lookahead_on(args.lookahead, plain_executor.device.type == "cuda")
    observer = engine.core.step_observer
    print(f"graphs {graphs}, lookahead {engine.core.decode_lookahead}, energy ledger {observer is not None}; "
          f"{args.rows} rows of {args.context} tokens, {args.steps} steps a condition", flush=True)
    run_condition(engine, plain_executor, observer, args.rows, args.context, 4, *CONDITIONS[0], seed=-1)  # warm-up
    results = []
    for round_index in range(args.rounds):
        for index, (kind, metered, recorded) in enumerate(CONDITIONS):
            result = run_condition(engine, plain_executor, observer, args.rows, args.context, args.steps, kind,
                                   metered, recorded, seed=round_index * len(CONDITIONS) + index)
            results.append(result)
            print(f"round {round_index}: {result.outputs:>10} metered {result.metered!s:>5} recorded "
                  f"{result.recorded!s:>5}: step {result.step_ms:7.3f} ms, pace {result.pace_ms:7.3f} ms", flush=True)
    write_json(args.out, {"rows": args.rows, "context": args.context, "steps": args.steps,
                          "results": [asdict(result) for result in results]}, indent=1)
    return results


if __name__ == "__main__":
    main()
