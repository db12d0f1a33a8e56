"""The engine's host work per step, without a model: scheduling, the scheduler's update and output processing.

Usage: PYTHONPATH=. python benchmarks/cpu/host_step.py [--sequences 256] [--steps 200] [--profile] [--lookahead]
       PYTHONPATH=. python benchmarks/cpu/host_step.py --phase prefill [--prompt-len 512] [--profile]
A tiny random model (one layer; Qwen's 151,936-token vocabulary) whose executor is replaced by one that
returns a token for every sampling sequence at once, so what is timed is what the GPU engine pays on its host
between graph replays: ``num_sequences`` requests (prompts uniform 100-1,024 tokens, greedy, FINAL_ONLY
outputs, prefix caching on), timed over ``steps`` decode-only steps once every prompt is in.

``--lookahead``: each step's successor is planned before its tokens are in (``Scheduler.schedule_continuation``),
as the engine runs on a GPU, instead of a full ``schedule``.

``--phase run`` times whole runs of workload 3's shape (256 x (512 -> 128), outputs kept as LLM.generate keeps
them) and the garbage collector's pauses in them, with the start-up heap frozen as LLM.generate runs
(``joule/heap.py``) or, with ``--no-freeze``, not.

``--phase graph-fill`` times the decode graph runner's host mirrors filled for ``--sequences`` rows of 512-token
prompts decoding (``DecodeGraphRunner._fill``: what a graphed decode step pays on its host before its copies).

``--phase launch`` times the executor's launch of a graphed decode continuation of ``--sequences`` rows (what
``ModelExecutor.launch`` pays on its host: the continuation's token rows, the graph runner's checks, mirrors and
upload, the sampling launch) with the forward and the logits stubbed out (no model runs).

``--phase prefill`` times the prompt steps instead, as workload 3 runs them (256 prompts of ``--prompt-len``
random tokens, 8,192-token steps): scheduling, the executor's input arrays (``ModelExecutor._prepare``, which
an eager prompt step pays before its first kernel) and the update, from the first step until every prompt is in.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import tempfile
import time
from pathlib import Path

from joule.engine.plan import StepResult
from joule.llm_engine import LLMEngine
from joule.sampling_params import RequestOutputKind, SamplingParams

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "torch_dtype": "float32"}


def tiny_engine(args, kv_cache_memory_bytes: int = 2 << 30, **settings) -> LLMEngine:
    """The one-layer random model (Qwen's vocabulary); energy attribution only with ``--energy``."""
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "config.json").write_text(json.dumps(TINY))
        engine = LLMEngine.from_kwargs(model=directory, load_format="dummy", dtype="float32", max_model_len=4096,
                                       kv_cache_memory_bytes=kv_cache_memory_bytes, **settings)
    if not args.energy:
        engine.core.step_observer = None
    return engine


def fake_model_with_inputs(engine: LLMEngine) -> None:
    """Steps build the executor's input arrays (what an eager step pays before its first kernel) and return a
    token per sampling row, with no model."""
    executor = engine.core.executor

    def execute(plan):
        executor._prepare(plan)
        tokens = {sequence.request.request_id: 7 for sequence in plan.sequences if sequence.samples}
        return StepResult(token_ids=tokens, elapsed_seconds=0.0)

    executor.execute = execute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported")
    parser.add_argument("--profile", action="store_true", help="print a cProfile table of one pass")
    parser.add_argument("--output-kind", default="final_only", choices=[kind.value for kind in RequestOutputKind],
                        help="final_only (offline) or delta (what a streaming server asks for)")
    parser.add_argument("--energy", action="store_true",
                        help="keep the per-request energy attribution on (the engine's default; off here by default)")
    parser.add_argument("--phase", default="decode", choices=["decode", "prefill", "run", "graph-fill", "launch"])
    parser.add_argument("--lookahead", action="store_true",
                        help="decode: plan each step's successor before its tokens are known, as the engine does on "
                             "a GPU (scheduler.schedule_continuation instead of schedule)")
    parser.add_argument("--recording", action="store_true",
                        help="decode: the executor wrapped as calibration wraps it (perf.measure.RecordingExecutor), "
                             "to see what the calibration's bookkeeping adds to the steps it times")
    parser.add_argument("--no-freeze", action="store_true", help="--phase run: leave the start-up heap unfrozen")
    parser.add_argument("--runs", type=int, default=8, help="--phase run: runs timed")
    parser.add_argument("--prompt-len", type=int, default=512, help="--phase prefill: every prompt's length")
    parser.add_argument("--tokenizer", action="store_true",
                        help="decode: the default model (SmolLM2) instead of the tiny one, so outputs are detokenized "
                             "as a real checkpoint's are (the GPU benchmarks' dummy configs have no tokenizer)")
    args = parser.parse_args()
    if args.phase == "prefill":
        time_prefill(args)
        return
    if args.phase == "run":
        time_runs(args)
        return
    if args.phase == "graph-fill":
        time_graph_fill(args)
        return
    if args.phase == "launch":
        time_launch(args)
        return
    if args.tokenizer:  # ~46 KB of float32 KV a token: 256 prompts of <= 1,024 + 600 outputs
        engine = LLMEngine.from_kwargs(model=None, dtype="float32", max_model_len=4096, kv_cache_memory_bytes=20 << 30,
                                       max_num_seqs=args.sequences)
        if not args.energy:
            engine.core.step_observer = None
    else:
        engine = tiny_engine(args, max_num_seqs=args.sequences)
    # Ordinary word-piece ids (a fixed token would detokenize unrealistically: one cached piece), handed over as
    # bare ids, as the executor does for rows sampled on the device.
    sampled = random.Random(1).choices(range(200, 20000), k=4099)
    turn = [0]

    def execute(plan):
        tokens = {}
        for sequence in plan.sequences:
            if sequence.samples:
                turn[0] = (turn[0] + 1) % len(sampled)
                tokens[sequence.request.request_id] = sampled[turn[0]]
        return StepResult(token_ids=tokens, elapsed_seconds=0.0)

    executor = engine.core.executor
    executor.execute = execute
    if args.lookahead:  # the GPU's path: each step's successor planned while it is "in flight"
        executor.launch = lambda plan, previous=None: plan
        executor.collect = execute
        executor.can_continue = lambda launched: True
        engine.core.decode_lookahead = True
    if args.recording:  # as `joule perf calibrate` times its steps: each plan's batch shape recorded
        from joule.perf.measure import RecordingExecutor

        engine.core.executor = RecordingExecutor(executor)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True,
                            output_kind=RequestOutputKind(args.output_kind))
    for index in range(args.sequences):
        prompt = [rng.randrange(100, 30000) for _ in range(rng.randint(100, 1024))]
        engine.add_request(str(index), {"prompt_token_ids": prompt}, params)
    requests = engine.core.scheduler.requests
    while any(request.num_output_tokens == 0 for request in requests.values()):
        engine.step()
    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        best = min(best, (time.perf_counter() - started) / args.steps)
    print(f"host work per decode step of {args.sequences} sequences ({args.output_kind}"
          f"{', energy attribution' if args.energy else ''}{', detokenized' if args.tokenizer else ''}"
          f"{', lookahead' if args.lookahead else ''}): "
          f"{best * 1e3:.3f} ms "
          f"(best of {args.repeats} x {args.steps} steps)")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            engine.step()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def time_prefill(args) -> None:
    best, profiler = float("inf"), None
    for repeat in range(args.repeats + args.profile):
        engine = tiny_engine(args, max_num_seqs=args.sequences, max_num_batched_tokens=8192)
        fake_model_with_inputs(engine)
        rng = random.Random(repeat)
        params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True,
                                output_kind=RequestOutputKind(args.output_kind))
        for index in range(args.sequences):
            prompt = [rng.randrange(100, 30000) for _ in range(args.prompt_len)]
            engine.add_request(str(index), {"prompt_token_ids": prompt}, params)
        requests = engine.core.scheduler.requests
        steps = 0
        if repeat == args.repeats:
            profiler = cProfile.Profile()
            profiler.enable()
        started = time.perf_counter()
        while any(request.num_output_tokens == 0 for request in requests.values()):
            engine.step()
            steps += 1
        elapsed = time.perf_counter() - started
        if profiler is not None:
            profiler.disable()
        else:
            best = min(best, elapsed / steps)
    print(f"host work per prompt step ({args.sequences} prompts of {args.prompt_len} tokens, 8,192-token steps, "
          f"{steps} steps{', energy attribution' if args.energy else ''}): {best * 1e3:.3f} ms "
          f"(best of {args.repeats} runs)")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


def time_runs(args) -> None:
    import collections
    import contextlib
    import gc

    from joule.heap import heap_frozen_while_running

    # 234k blocks of 16 tokens: the KV block table of a Llama-3.2-1B-shaped engine on an H200.
    engine = tiny_engine(args, kv_cache_memory_bytes=234_000 * 16 * 2 * 2 * 64 * 4 // 2, max_num_seqs=256,
                         max_num_batched_tokens=8192)
    fake_model_with_inputs(engine)
    events: list[tuple[str, int, float]] = []
    gc.callbacks.append(lambda phase, info: events.append((phase, info["generation"], time.perf_counter())))
    walls, pause_total, pause_count, longest = [], collections.Counter(), collections.Counter(), 0.0
    for run in range(args.runs):
        rng = random.Random(run)
        params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True,
                                output_kind=RequestOutputKind(args.output_kind))
        for index in range(args.sequences):
            prompt = [rng.randrange(100, 30000) for _ in range(args.prompt_len)]
            engine.add_request(f"{run}-{index}", {"prompt_token_ids": prompt}, params)
        events.clear()
        outputs = []
        started = time.perf_counter()
        with contextlib.nullcontext() if args.no_freeze else heap_frozen_while_running():
            while engine.has_unfinished_requests():
                outputs.extend(engine.step())
        walls.append(time.perf_counter() - started)
        for (_, generation, began), (_, _, ended) in zip(events[::2], events[1::2]):
            pause_total[generation] += ended - began
            pause_count[generation] += 1
            longest = max(longest, ended - began)
    pauses = "; ".join(f"generation {generation}: {pause_count[generation] / args.runs:.1f} x, "
                       f"{pause_total[generation] / args.runs * 1e3:.1f} ms" for generation in sorted(pause_count))
    print(f"host work per run of {args.sequences} x ({args.prompt_len} -> 128), start-up heap "
          f"{'not frozen' if args.no_freeze else 'frozen'}: runs {', '.join(f'{wall * 1e3:.0f}' for wall in walls)} ms "
          f"(median {sorted(walls)[len(walls) // 2] * 1e3:.0f}); collector per run: {pauses}; "
          f"longest pause {longest * 1e3:.1f} ms")


def time_graph_fill(args) -> None:
    from joule.engine.plan import ScheduledSequence, StepPlan
    from joule.engine.request import Request
    from joule.runtime.attention.triton_backend import TritonAttentionBackend
    from joule.runtime.cuda_graphs import DecodeGraphRunner

    engine = tiny_engine(args, kv_cache_memory_bytes=1 << 26, max_num_seqs=args.sequences)
    executor = engine.core.executor
    runner = DecodeGraphRunner(executor.model, executor.kv_cache, TritonAttentionBackend(), executor.device,
                               max_num_seqs=args.sequences, max_model_len=4096)
    params = SamplingParams(temperature=0.0, max_tokens=args.steps)
    requests = [Request(f"r{index}", [1] * 512, params, 4) for index in range(args.sequences)]
    times = []
    for _ in range(args.repeats):
        for index, request in enumerate(requests):
            request.block_ids = list(range(index * 64, index * 64 + 33))  # 512 tokens and the next one's block
        for position in range(512, 512 + args.steps):
            if position % 16 == 0:  # every row's next block, as the block manager appends it
                for index, request in enumerate(requests):
                    request.block_ids.append(index * 64 + position // 16)
            plan = StepPlan([ScheduledSequence(request, [1], position, request.block_ids, True)
                             for request in requests])
            started = time.perf_counter()
            runner._fill(plan)
            times.append(time.perf_counter() - started)
    times.sort()
    print(f"graph runner fill of {args.sequences} decode rows: median {1e3 * times[len(times) // 2]:.3f} ms, "
          f"p10 {1e3 * times[len(times) // 10]:.3f} ms ({len(times)} steps)")


def time_launch(args) -> None:
    import torch

    from joule.engine.plan import CONTINUATION_TOKEN, ScheduledSequence, StepPlan
    from joule.engine.request import Request
    from joule.runtime.attention.triton_backend import TritonAttentionBackend
    from joule.runtime.cuda_graphs import DecodeGraphRunner
    from joule.runtime.executor import LaunchedStep

    engine = tiny_engine(args, kv_cache_memory_bytes=1 << 26, max_num_seqs=args.sequences)
    executor = engine.core.executor
    runner = DecodeGraphRunner(executor.model, executor.kv_cache, TritonAttentionBackend(), executor.device,
                               max_num_seqs=args.sequences, max_model_len=4096)
    hidden = torch.zeros(args.sequences, TINY["hidden_size"])
    logits = torch.zeros(args.sequences, 8)
    runner._forward = lambda size, short=False: hidden[:size]  # no model: the host work around it only
    executor.model.compute_logits = lambda rows: logits[: rows.shape[0]]
    executor.graph_runner, executor.use_cuda_graphs, executor.backend = runner, True, runner.backend
    params = SamplingParams(temperature=0.0, max_tokens=args.steps)
    requests = [Request(f"r{index}", [1] * 512, params, 4) for index in range(args.sequences)]
    previous_tokens = torch.zeros(args.sequences, dtype=torch.int64)
    times = []
    profiler = cProfile.Profile() if args.profile else None
    for _ in range(args.repeats):
        for index, request in enumerate(requests):
            request.block_ids = list(range(index * 64, index * 64 + 33))
        previous = LaunchedStep(requests, 0.0, token_ids=previous_tokens, host_token_ids=previous_tokens)
        for position in range(512, 512 + args.steps):
            if position % 16 == 0:
                for index, request in enumerate(requests):
                    request.block_ids.append(index * 64 + position // 16)
            plan = StepPlan([ScheduledSequence(request, [CONTINUATION_TOKEN], position, request.block_ids, True)
                             for request in requests])
            if profiler is not None:
                profiler.enable()
            started = time.perf_counter()
            previous = executor.launch(plan, previous)
            times.append(time.perf_counter() - started)
            if profiler is not None:
                profiler.disable()
    times.sort()
    print(f"executor launch of a {args.sequences}-row decode continuation: median {1e3 * times[len(times) // 2]:.3f} "
          f"ms, p10 {1e3 * times[len(times) // 10]:.3f} ms ({len(times)} steps)")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
