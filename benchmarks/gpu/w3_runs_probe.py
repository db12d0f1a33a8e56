"""Why workload 3 runs faster run after run on one engine (23k -> 35k tok/s on the H100, 2026-12-05).

Usage (GPU machine, repo root):
    PYTHONPATH=. python benchmarks/gpu/w3_runs_probe.py [runs] [out.json] [after-bs1|ab-metering|ab-prompts] [gc-stats]
``ab-metering``: ``runs`` pairs of runs with the engine's NVML energy metering on and off, alternated (ABBA).
``ab-prompts``: ``runs`` pairs with prompt steps queued ahead too (``SchedulerConfig.lookahead_prompts``) and not.
``gc-stats`` (with any mode): the collector's own statistics of every collection on stderr (``gc.DEBUG_STATS``).
``after-bs1``: then engine_bench.py's batch-1 latency runs on the same engine (graphs, lookahead, sampling and eager
variants, with its execute() timer), ``runs`` more runs, and ``runs`` more after a full collection and an emptied
allocator cache: whether what engine_bench runs first is what slows its workload-3 runs (25.6-28.1k tok/s there
against 28.2-33.5k here, H100 2026-12-05 (d)).
Builds the engine as engine_bench.py does (Llama-3.2-1B shape, bf16, dummy weights, graphs, the defaults) and runs
workload 3 (256 x (512 -> 128), seed 2) ``runs`` times. The scheduler is deterministic, so step i of one run is
step i of the next: per-step wall times are compared across runs, split into steps with prompt tokens and
decode-only steps, beside what each run newly compiled (Triton variants), the allocator's new device allocations
and the GPU's clocks, temperature and power after the run. Prints a table; raw per-step times go to the JSON.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time

sys.path.insert(0, "benchmarks/gpu")
import torch  # noqa: E402
from engine_bench import (  # noqa: E402
    LLAMA_1B, apply_batch_one_variant, batch_one_variants, build, generate, timed_execute,
)
from profile_engine import compiled_variants  # noqa: E402

from joule.bench.latency import measure_latency  # noqa: E402
from joule.bench.workload import fixed_length_workload  # noqa: E402


def gpu_state() -> dict:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return {"sm_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "mem_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
                "temp_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
                "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
                "throttle": int(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))}
    except Exception as error:  # noqa: BLE001 - the probe still times steps without NVML
        return {"error": repr(error)}


def timed_steps(engine) -> list[tuple[float, int, int]]:
    """Wrap ``engine.step`` so each call's wall time and its step's prompt / decode token counts are recorded."""
    records, original = [], engine.step

    def step():
        started = time.perf_counter()
        outputs = original()
        last = engine.core.last_step
        records.append((time.perf_counter() - started, last.num_prefill_tokens, last.num_decode_tokens))
        return outputs

    engine.step = step
    return records


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    out_path = sys.argv[2] if len(sys.argv) > 2 else "w3_runs_probe.json"
    engine, graphs, capture_s = build(LLAMA_1B, dtype="bfloat16", max_model_len=4096)
    requests = fixed_length_workload(256, 512, 128, engine.model_config.vocab_size, seed=2)
    prompts, output_lens = [r.prompt_token_ids for r in requests], [r.output_len for r in requests]
    output_tokens = sum(output_lens)
    print(f"{torch.cuda.get_device_name()}, graphs {graphs} ({capture_s:.1f} s), start {gpu_state()}", flush=True)
    generate(engine, [prompts[0][:32]] * 4, [4] * 4)  # engine_bench's warm-up
    if "after-bs1" in sys.argv[3:]:
        engine.core.step_observer = None  # as engine_bench.py's workload 3 runs (no NVML reads a step)
    results = []
    if "gc-stats" in sys.argv[3:]:
        gc.set_debug(gc.DEBUG_STATS)  # every collection's generation sizes and time, on stderr
    observer = engine.core.step_observer
    switches = {
        # Metered runs were the fast ones (2026-12-05 (d)): alternated on one engine, ABBA, to tell.
        "ab-metering": ("metered", "unmetered",
                        lambda on: setattr(engine.core, "step_observer", observer if on else None)),
        # Prompt steps queued ahead too, against decode steps only (engine_bench's default), unmetered as there.
        "ab-prompts": ("prompt steps queued", "decode steps queued",
                       lambda on: setattr(engine.core.scheduler.config, "lookahead_prompts", on)),
    }
    for mode, (on_label, off_label, switch) in switches.items():
        if mode not in sys.argv[3:]:
            continue
        if mode == "ab-prompts":
            engine.core.step_observer = None
        for index in range(runs):
            for on in ((True, False) if index % 2 == 0 else (False, True)):
                switch(on)
                run_phase(engine, prompts, output_lens, output_tokens, 1, results, on_label if on else off_label)
        summarize(results, out_path)
        return
    phases = [("fresh", runs)]
    if "after-bs1" in sys.argv[3:]:
        phases += [("after bs1", runs), ("after gc + empty_cache", runs)]
    for phase, count in phases:
        if phase == "after bs1":
            batch_one(engine, graphs)
        elif phase.startswith("after gc"):
            gc.collect()
            torch.cuda.empty_cache()
        print(f"-- {phase}", flush=True)
        run_phase(engine, prompts, output_lens, output_tokens, count, results, phase)
    summarize(results, out_path)


def batch_one(engine, graphs: bool) -> None:
    """engine_bench.py's batch-1 section on this engine, settings restored as it leaves them."""
    prompt = fixed_length_workload(1, 128, 256, engine.model_config.vocab_size, seed=1)[0].prompt_token_ids
    observer = engine.core.step_observer
    timed_execute(engine)
    for use_graphs, metered, lookahead, temperature in batch_one_variants(graphs):
        apply_batch_one_variant(engine, observer, use_graphs, metered, lookahead)
        measure_latency(engine, [prompt], 256, num_iters=2, temperature=temperature)
    apply_batch_one_variant(engine, None, graphs, False, True)  # as engine_bench.py leaves it for workload 3


def run_phase(engine, prompts, output_lens, output_tokens, runs, results, phase) -> None:
    for index in range(runs):
        variants_before = compiled_variants()
        allocations_before = torch.cuda.memory_stats().get("num_device_alloc", 0)
        records, collections = timed_steps(engine), []
        started = {}

        def on_collection(phase, info):  # whether the stalls are the cyclic collector's
            if phase == "start":
                started["at"] = time.perf_counter()
            else:
                collections.append((info["generation"], round(1e3 * (time.perf_counter() - started["at"]), 2)))

        gc.callbacks.append(on_collection)
        _, seconds = generate(engine, prompts, output_lens)
        gc.callbacks.remove(on_collection)
        del engine.step  # back to the class's method
        variants = {name: count - variants_before.get(name, 0) for name, count in compiled_variants().items()
                    if count != variants_before.get(name, 0)}
        prompt_steps = [seconds for seconds, prefill, _ in records if prefill]
        decode_steps = [seconds for seconds, prefill, decodes in records if not prefill and decodes]
        result = {"tok_per_s": output_tokens / seconds, "seconds": seconds, "steps": len(records),
                  "prompt_step_s": sum(prompt_steps), "decode_step_s": sum(decode_steps),
                  "decode_step_median_ms": 1e3 * statistics.median(decode_steps) if decode_steps else None,
                  "prompt_step_median_ms": 1e3 * statistics.median(prompt_steps) if prompt_steps else None,
                  # Time lost to decode steps over twice the median: the host stalls seen on 2026-12-05 (e).
                  "decode_excess_s": sum(s - statistics.median(decode_steps) for s in decode_steps
                                         if s > 2 * statistics.median(decode_steps)) if decode_steps else 0.0,
                  "slowest_ms": sorted((round(1e3 * s, 1), p, d) for s, p, d in records)[-5:],
                  "compiled": variants,
                  "new_device_allocations": torch.cuda.memory_stats().get("num_device_alloc", 0) - allocations_before,
                  "gpu_after": gpu_state(), "collections": collections,
                  "step_ms": [round(1e3 * s, 3) for s, _, _ in records],
                  "step_tokens": [(p, d) for _, p, d in records]}
        result["phase"] = phase
        results.append(result)
        print(f"run {index}: {result['tok_per_s']:.0f} tok/s, {seconds:.3f} s, {len(records)} steps, prompt steps "
              f"{result['prompt_step_s']:.3f} s, decode steps {result['decode_step_s']:.3f} s (median "
              f"{result['decode_step_median_ms']:.2f} ms), compiled {variants}, new allocations "
              f"{result['new_device_allocations']}, collections {len(collections)} (slowest "
              f"{max(collections, key=lambda c: c[1], default=None)}), slowest {result['slowest_ms']}, "
              f"gpu {result['gpu_after']}",
              flush=True)


def summarize(results: list[dict], out_path: str) -> None:
    first, last = results[0], results[-1]
    if first["step_tokens"] == last["step_tokens"]:
        deltas = sorted(((a - b, i, first["step_tokens"][i]) for i, (a, b) in
                         enumerate(zip(first["step_ms"], last["step_ms"]))), reverse=True)
        print("steps slower in the first run than the last (ms, index, (prompt, decode tokens)):",
              [(round(d, 1), i, t) for d, i, t in deltas[:12]])
    else:
        print("the runs scheduled different steps; no per-step comparison")
    print(f"\n{'phase':>24} {'run':>4} {'tok/s':>8} {'s':>7} {'steps':>6} {'prompt s':>9} {'decode s':>9} "
          f"{'dec med ms':>10} {'prm med ms':>10} {'stalls s':>8}")
    for index, result in enumerate(results):
        print(f"{result['phase']:>24} {index:>4} {result['tok_per_s']:>8.0f} {result['seconds']:>7.3f} {result['steps']:>6} "
              f"{result['prompt_step_s']:>9.3f} {result['decode_step_s']:>9.3f} "
              f"{result['decode_step_median_ms']:>10.2f} "
              f"{result['prompt_step_median_ms']:>10.2f} {result['decode_excess_s']:>8.3f}")
    with open(out_path, "w") as file:
        json.dump({"device": torch.cuda.get_device_name(), "runs": results}, file)


if __name__ == "__main__":
    main()
