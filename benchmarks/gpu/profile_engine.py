"""Where the GPU engine's time goes: one call that profiles decode and a throughput workload.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/profile_engine.py [out_dir] [parts]
(parts: comma-separated from batch_one, workload_two, workload_two_fp8, workload_three; default all)
(1) Llama-3.2-1B bf16, batch 1, 128 -> 256 with decode CUDA graphs: per-step wall time split into
    graph replay (host + GPU), logits projection, sampler and the engine around them (each part
    synchronised, so the parts add up to more than an unsynchronised step), and a pure back-to-back
    replay time against the copy-bandwidth roofline.
(2) Kernel tables (torch.profiler) of batch-1 decode steps, eager and graphed.
(3) Qwen3-0.6B on nano-vllm's workload (256 requests, uniform [100, 1024] in and out): time split
    between graphed decode steps and eager mixed/prefill steps, and a kernel table of a few of each.
Weights are random (``load_format="dummy"``).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from joule.bench.latency import copy_bandwidth, decode_bytes_per_step
from joule.bench.workload import fixed_length_workload, uniform_length_workload
from joule.llm_engine import LLMEngine
from joule.runtime.cuda_graphs import enable_engine_cuda_graphs
from joule.sampling_params import RequestOutputKind, SamplingParams

LLAMA_1B, QWEN3_06B = "benchmarks/configs/llama-3.2-1b", "benchmarks/configs/qwen3-0.6b"
STARTED = time.perf_counter()


def log(*parts) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s]", *parts, flush=True)


def add_all(engine: LLMEngine, prompts: list[list[int]], output_lens: list[int]) -> None:
    tag = time.monotonic_ns()
    for index, (prompt, length) in enumerate(zip(prompts, output_lens)):
        params = SamplingParams(temperature=0.0, max_tokens=length, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        engine.add_request(f"{tag}-{index}", {"prompt_token_ids": prompt}, params)


def run_all(engine: LLMEngine) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - started


class SyncedTimers:
    """Wrap callables so each call is synchronised and timed (attribution, not speed)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self._undo = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            torch.cuda.synchronize()
            started = time.perf_counter()
            result = original(*args, **kwargs)
            torch.cuda.synchronize()
            self.seconds[label].append(time.perf_counter() - started)
            return result

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


def kernel_table(prof, steps: int, limit: int = 22) -> list[dict]:
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us <= 0 or event.key.startswith("ProfilerStep"):
            continue
        rows.append({"name": event.key[:90], "calls_per_step": event.count / steps,
                     "us_per_step": device_us / steps})
    rows.sort(key=lambda row: -row["us_per_step"])
    total = sum(row["us_per_step"] for row in rows)
    print(f"    kernel time per step: {total:.1f} us over {len(rows)} kernels/ops")
    for row in rows[:limit]:
        print(f"    {row['us_per_step']:9.1f} us  {row['calls_per_step']:7.1f}x  {row['name']}")
    return rows[:limit]


def gpu_busy(prof) -> tuple[float, float]:
    """Microseconds with at least one kernel or copy running (overlaps counted once), and the whole span."""
    intervals = sorted((event.time_range.start, event.time_range.end) for event in prof.events()
                       if event.device_type == DeviceType.CUDA and event.time_range.end > event.time_range.start)
    if not intervals:
        return 0.0, 0.0
    busy, current_start, current_end = 0.0, *intervals[0]
    for start, end in intervals[1:]:
        if start > current_end:
            busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    busy += current_end - current_start
    return busy, intervals[-1][1] - intervals[0][0]


def compiled_variants() -> dict[str, int]:
    """How many variants Triton compiled of each of our kernels (each one ~1 s inside some step)."""
    import importlib
    import pkgutil

    import joule.kernels
    from triton.runtime.jit import JITFunction

    counts = {}
    for module_info in pkgutil.iter_modules(joule.kernels.__path__):
        module = importlib.import_module(f"joule.kernels.{module_info.name}")
        for name, value in vars(module).items():
            caches = getattr(value, "device_caches", None) if isinstance(value, JITFunction) else None
            if caches:
                counts[f"{module_info.name}.{name}"] = sum(len(cache[0]) for cache in caches.values())
    return {name: count for name, count in sorted(counts.items()) if count}


def profile_steps(engine: LLMEngine, steps: int) -> list[dict]:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    return kernel_table(prof, steps)


def decode_step_ms(engine: LLMEngine, prompt: list[int], steps: int = 200) -> float:
    """Milliseconds per batch-1 decode step over up to ``steps`` unsynchronised steps (prefill excluded)."""
    add_all(engine, [prompt], [256])
    engine.step()
    engine.step()  # prefill + first decode out of the way
    torch.cuda.synchronize()
    started, count = time.perf_counter(), 0
    while engine.has_unfinished_requests() and count < steps:
        engine.step()
        count += 1
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    run_all(engine)
    return elapsed / count * 1e3


def batch_one(raw: dict) -> None:
    engine = LLMEngine.from_kwargs(model=LLAMA_1B, load_format="dummy", dtype="bfloat16", max_model_len=4096,
                                   decode_lookahead=False)  # parts timed one by one
    engine.core.step_observer = None
    graphs = enable_engine_cuda_graphs(engine)
    log("1B engine ready, graphs", graphs, "KV tokens", engine.kv_capacity_tokens)
    vocab = engine.model_config.vocab_size
    prompt = fixed_length_workload(1, 128, 256, vocab, seed=1)[0].prompt_token_ids
    add_all(engine, [prompt[:16]], [8])
    run_all(engine)  # warm-up

    step_ms = decode_step_ms(engine, prompt)  # unsynchronised

    # Attribution with synchronised parts.
    executor, runner = engine.core.executor, engine.core.executor.graph_runner
    timers = SyncedTimers()
    if runner is not None:
        timers.wrap(runner, "run", "graph run (fill+upload+replay)")
    timers.wrap(engine.core.executor.model, "compute_logits", "logits projection")
    timers.wrap(executor.sampler, "sample", "sampler")
    timers.wrap(executor, "execute", "execute total")
    timers.wrap(engine.core.scheduler, "schedule", "schedule")
    timers.wrap(engine, "step", "engine.step total")
    add_all(engine, [prompt], [256])
    engine.step()
    engine.step()
    for label in list(timers.seconds):
        timers.seconds[label].clear()
    while engine.has_unfinished_requests():
        engine.step()
    timers.restore()
    parts = {label: 1e3 * sum(values) / len(values) for label, values in timers.seconds.items() if values}

    # Pure replay, back to back.
    replay_ms = None
    if runner is not None and 1 in runner.graphs:
        # The variant the last step replayed (its inputs are still in the static buffers).
        short = runner.is_short(1, int(runner.host_sequence_lengths[0]))
        graph = (runner.short_graphs if short else runner.graphs)[1]
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(200):
            graph.replay()
        torch.cuda.synchronize()
        replay_ms = (time.perf_counter() - started) / 200 * 1e3
    hidden = torch.randn(1, engine.model_config.hidden_size, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        engine.core.executor.model.compute_logits(hidden)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(200):
        engine.core.executor.model.compute_logits(hidden)
    torch.cuda.synchronize()
    logits_ms = (time.perf_counter() - started) / 200 * 1e3
    bandwidth = copy_bandwidth(engine.device)
    weight_bytes, kv_bytes = decode_bytes_per_step(engine, 1, 128 + 128)
    roofline_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3
    log(f"batch-1 decode: {step_ms:.3f} ms/step unsynchronised; roofline {roofline_ms:.3f} ms "
        f"({100 * roofline_ms / step_ms:.1f}%); pure replay {replay_ms} ms; logits alone {logits_ms:.3f} ms")
    for label, value in parts.items():
        print(f"    {value:8.3f} ms  {label} (synchronised)")
    raw["batch1"] = {"step_ms": step_ms, "roofline_ms": roofline_ms, "replay_ms": replay_ms,
                     "logits_ms": logits_ms, "parts_ms": parts, "bandwidth": bandwidth}

    # With the decode lookahead (the CUDA default): step time, and how much of it the GPU is busy.
    engine.core.decode_lookahead = True
    lookahead_step_ms = decode_step_ms(engine, prompt)
    add_all(engine, [prompt], [64])
    engine.step()
    engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(40):
            engine.step()
        torch.cuda.synchronize()
    busy_us, span_us = gpu_busy(prof)
    run_all(engine)
    engine.core.decode_lookahead = False
    log(f"with lookahead: {lookahead_step_ms:.3f} ms/step; GPU busy {busy_us / 40:.1f} us a step "
        f"({100 * busy_us / max(span_us, 1e-9):.1f}% of the profiled span)")
    raw["batch1"].update(lookahead_step_ms=lookahead_step_ms, lookahead_gpu_busy_us_per_step=busy_us / 40,
                         lookahead_gpu_busy_fraction=busy_us / max(span_us, 1e-9))

    log("kernel table, batch-1 decode, graphs")
    add_all(engine, [prompt], [64])
    engine.step()
    engine.step()
    raw["batch1_graph_kernels"] = profile_steps(engine, 20)
    run_all(engine)
    log("kernel table, batch-1 decode, eager")
    engine.core.executor.use_cuda_graphs = False
    add_all(engine, [prompt], [64])
    engine.step()
    engine.step()
    raw["batch1_eager_kernels"] = profile_steps(engine, 20)
    run_all(engine)


def workload_two(raw: dict, kv_cache_dtype: str = "auto", label: str = "workload2") -> None:
    engine = LLMEngine.from_kwargs(model=QWEN3_06B, load_format="dummy", dtype="bfloat16", max_model_len=4096,
                                   kv_cache_dtype=kv_cache_dtype, decode_lookahead=False)
    requests = uniform_length_workload(256, 100, 1024, engine.model_config.vocab_size, seed=0)
    split_workload(engine, requests, raw, label)


def workload_two_fp8(raw: dict) -> None:
    workload_two(raw, "fp8", "workload2_fp8")


def workload_three(raw: dict) -> None:
    engine = LLMEngine.from_kwargs(model=LLAMA_1B, load_format="dummy", dtype="bfloat16", max_model_len=4096,
                                   decode_lookahead=False)  # steps timed one by one
    requests = fixed_length_workload(256, 512, 128, engine.model_config.vocab_size, seed=0)
    split_workload(engine, requests, raw, "workload3")


def split_workload(engine: LLMEngine, requests, raw: dict, label: str) -> None:
    """Synchronised time of decode-only vs mixed steps over one run, then kernel tables of both kinds."""
    engine.core.step_observer = None
    graphs = enable_engine_cuda_graphs(engine)
    log(label, "engine ready, graphs", graphs, "KV tokens", engine.kv_capacity_tokens)
    variants_before = compiled_variants()
    add_all(engine, [r.prompt_token_ids[:32] for r in requests[:4]], [4] * 4)
    run_all(engine)

    executor = engine.core.executor
    original = executor.execute
    kinds: dict[str, list[float]] = defaultdict(list)
    tokens: dict[str, int] = defaultdict(int)

    def execute(plan):
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = original(plan)
        torch.cuda.synchronize()
        decode_only = all(sequence.num_tokens == 1 for sequence in plan.sequences)
        kind = "decode-only" if decode_only else "mixed/prefill"
        kinds[kind].append(time.perf_counter() - started)
        tokens[kind] += plan.num_tokens
        return result

    trace = []
    original_inner = execute

    def traced(plan):
        decodes = sum(1 for sequence in plan.sequences if sequence.num_tokens == 1)
        started = time.perf_counter()
        result = original_inner(plan)
        if len(trace) < 24:
            trace.append((decodes, plan.num_tokens - decodes, 1e3 * (time.perf_counter() - started)))
        return result

    executor.execute = traced
    add_all(engine, [r.prompt_token_ids for r in requests], [r.output_len for r in requests])
    step_started = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    wall = time.perf_counter() - step_started
    executor.execute = original
    output_tokens = sum(r.output_len for r in requests)
    log(f"{label} (synchronised steps): {wall:.2f} s, {steps} steps, {output_tokens / wall:.0f} output tok/s")
    split = {}
    for kind, values in kinds.items():
        split[kind] = {"steps": len(values), "seconds": sum(values), "tokens": tokens[kind],
                       "ms_per_step": 1e3 * sum(values) / len(values)}
        print(f"    {kind:14s} {len(values):5d} steps  {sum(values):7.2f} s  {split[kind]['ms_per_step']:7.2f} ms/step"
              f"  {tokens[kind]} tokens")
    print(f"    outside execute: {wall - sum(sum(v) for v in kinds.values()):.2f} s")
    print("    first steps (decodes, prefill tokens, ms):", [(d, p, round(ms, 1)) for d, p, ms in trace])
    variants_after = compiled_variants()
    print("    kernel variants compiled during the run:",
          {name: count - variants_before.get(name, 0) for name, count in variants_after.items()
           if count != variants_before.get(name, 0)}, "(after start-up:", variants_before, ")")
    raw[label] = {"wall_s": wall, "steps": steps, "output_tokens": output_tokens, "split": split,
                        "first_steps": trace}
    engine.block_manager.reset_prefix_cache()  # the next pass must prefill again

    # Kernel tables: early mixed steps, then a batch-256 decode.
    add_all(engine, [r.prompt_token_ids for r in requests], [r.output_len for r in requests])
    log(f"kernel table, {label} first 6 steps (prefill chunks)")
    raw[f"{label}_mixed_kernels"] = profile_steps(engine, 6)
    for _ in range(40):
        engine.step()
    while engine.has_unfinished_requests() and any(
            request.num_output_tokens == 0 for request in engine.core.scheduler.requests.values()):
        engine.step()  # every prompt in: decode-only steps from here
    log(f"kernel table, {label} decode steps ({engine.core.scheduler.num_running} running)")
    raw[f"{label}_decode_kernels"] = profile_steps(engine, 10)
    while engine.has_unfinished_requests():
        engine.step()


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    raw: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    log(raw["device"], raw["torch"])
    parts = {part.__name__: part for part in (batch_one, workload_two, workload_two_fp8, workload_three)}
    chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else list(parts)
    for part in (parts[name] for name in chosen):
        try:
            part(raw)
        except Exception as error:  # noqa: BLE001 - keep the other part's numbers
            import traceback

            traceback.print_exc()
            raw[part.__name__ + "_error"] = repr(error)
        gc.collect()
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "profile_engine.json"), "w") as handle:
        json.dump(raw, handle, indent=2, default=str)
    log("done")


if __name__ == "__main__":
    main()
