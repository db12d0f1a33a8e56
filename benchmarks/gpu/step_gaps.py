"""Where a throughput workload's GPU time goes: kernel time by kernel, and every gap between kernels with what the
host did meanwhile.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/step_gaps.py [out_dir] [w3|w2|b1] [plain runs]
(b1: issue 3's batch-1 workload, 128 -> 256, profiled over decode steps 100-110, then every device event of the
window's last two steps in order, with its gap from the event before: what sits between two graph replays.)
Why: a prompt step of workload 3 takes ~29.5 ms with prompt steps queued ahead, but its kernels added up to
~26.6 ms under profile_engine.py (H100 2026-12-05 (e)): either the GPU idles ~3 ms a step or the profiler's
kernel table was short. Builds the engine as engine_bench.py does (defaults: decode and prompt lookahead on,
metering off), runs the workload plainly, then under torch.profiler with the executor's launch/collect and the
engine's step marked: workload 3 whole, workload 2 (Qwen3-0.6B, 256 x uniform [100, 1024], 1,000+ steps) in
windows of steps (``W2_WINDOWS``) to keep the trace small. From the Chrome trace: GPU busy time against the span,
kernel time by kernel, the idle gaps (>= 5 us) summed by the kind of step whose launch they end in, the largest
gaps with the kernels on either side, and the host ranges open mid-gap. Writes ``gaps_<workload>.json`` and the
gzipped traces to ``out_dir``.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, "benchmarks/gpu")
import torch  # noqa: E402
from engine_bench import LLAMA_1B, QWEN3_06B, build, generate  # noqa: E402
from profile_engine import add_all  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from joule.bench.workload import fixed_length_workload, uniform_length_workload  # noqa: E402
from joule.heap import heap_frozen_while_running  # noqa: E402

GAP_US = 5.0
W2_WINDOWS = ((0, 24), (150, 180), (500, 530), (850, 880))  # step ranges: prompts, then 256, ~150, ~40 decoding
B1_WINDOWS = ((100, 110),)
SEQUENCE_EVENTS = 240  # batch 1: the window's last ~two steps (~110 device events a step)
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch",
                "cudaMemcpyAsync", "cudaMemsetAsync")


def mark(owner, name: str, label) -> None:
    """Wrap ``owner.name`` in a profiler range named by ``label(*args)`` (a string or a callable)."""
    original = getattr(owner, name)

    def marked(*args, **kwargs):
        with record_function(label(*args) if callable(label) else label):
            return original(*args, **kwargs)

    setattr(owner, name, marked)


def plan_label(plan, *_) -> str:
    decodes = sum(1 for sequence in plan.sequences if sequence.num_tokens == 1)
    prompt_tokens = plan.num_tokens - decodes
    return f"launch {'prompt' if prompt_tokens else 'decode'} {decodes}+{prompt_tokens}"


def analyse(trace: dict, top: int = 25) -> dict:
    """Gaps between device events of a Chrome trace, attributed to the host ranges open at the time."""
    events = [event for event in trace.get("traceEvents", []) if event.get("ph") == "X"]
    device = sorted((event for event in events if event.get("cat") in DEVICE_CATEGORIES), key=lambda e: e["ts"])
    host_ranges = [event for event in events if event.get("cat") == "user_annotation"]
    launches = {event["args"]["correlation"]: event["ts"] for event in events
                if event.get("cat") in ("cuda_runtime", "cuda_driver") and event.get("name") in LAUNCH_NAMES
                and "correlation" in event.get("args", {})}
    if not device:
        return {"kernels": 0}

    def open_ranges(at: float) -> list[str]:
        return sorted(event["name"] for event in host_ranges if event["ts"] <= at <= event["ts"] + event["dur"])

    def launch_kind(event: dict) -> str:
        launched = launches.get(event.get("args", {}).get("correlation"))
        names = open_ranges(launched) if launched is not None else []
        kinds = [name.split()[1] for name in names if name.startswith("launch ")]
        if kinds:
            return f"launch {kinds[0]}"
        return "collect" if "collect" in names else ("step" if "step" in names else "elsewhere")

    gaps, busy, end = [], 0.0, device[0]["ts"]
    start_all, previous = device[0]["ts"], device[0]
    for event in device:
        if event["ts"] - end >= GAP_US:
            gaps.append({"us": event["ts"] - end, "at": end - start_all, "after": previous["name"][:60],
                         "before": event["name"][:60], "kind": launch_kind(event),
                         "host": open_ranges((end + event["ts"]) / 2)})
        busy += max(0.0, event["ts"] + event["dur"] - max(end, event["ts"]))
        if event["ts"] + event["dur"] > end:
            end, previous = event["ts"] + event["dur"], event
    by_kernel, calls = defaultdict(float), defaultdict(int)
    for event in device:
        by_kernel[event["name"][:70]] += event["dur"]
        calls[event["name"][:70]] += 1
    by_kind, by_host = defaultdict(float), defaultdict(float)
    for gap in gaps:
        by_kind[gap["kind"]] += gap["us"]
        by_host[" > ".join(gap["host"]) or "(none)"] += gap["us"]
    sequence, previous_end = [], None
    for event in device[-SEQUENCE_EVENTS:]:
        gap = 0.0 if previous_end is None else event["ts"] - previous_end
        sequence.append({"at": event["ts"] - start_all, "us": event["dur"], "gap": gap, "name": event["name"][:70]})
        previous_end = event["ts"] + event["dur"] if previous_end is None else max(previous_end,
                                                                                     event["ts"] + event["dur"])
    return {"kernels": len(device), "span_us": end - start_all, "busy_us": busy, "sequence": sequence,
            "idle_us": sum(gap["us"] for gap in gaps), "gaps": len(gaps),
            "by_kernel": [{"name": name, "us": us, "calls": calls[name]}
                          for name, us in sorted(by_kernel.items(), key=lambda item: -item[1])[:top]],
            "idle_by_launch_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
            "idle_by_open_host_ranges": dict(sorted(by_host.items(), key=lambda item: -item[1])[:top]),
            "largest": sorted(gaps, key=lambda gap: -gap["us"])[:top]}


def report(result: dict) -> None:
    if not result.get("kernels"):
        print("no device events in the trace")
        return
    print(f"device events {result['kernels']}, span {result['span_us'] / 1e3:.1f} ms, busy "
          f"{result['busy_us'] / 1e3:.1f} ms, idle in {result['gaps']} gaps >= {GAP_US:.0f} us: "
          f"{result['idle_us'] / 1e3:.1f} ms")
    print("kernel time by kernel:")
    for row in result["by_kernel"]:
        print(f"  {row['us'] / 1e3:8.2f} ms {row['calls']:6d} x {row['us'] / row['calls']:8.1f} us  {row['name']}")
    print("idle by the step kind whose launch ends the gap:")
    for kind, us in result["idle_by_launch_kind"].items():
        print(f"  {us / 1e3:8.2f} ms  {kind}")
    print("idle by host ranges open mid-gap:")
    for ranges, us in result["idle_by_open_host_ranges"].items():
        print(f"  {us / 1e3:8.2f} ms  {ranges}")
    print("largest gaps:")
    for gap in result["largest"]:
        print(f"  {gap['us']:8.1f} us at {gap['at'] / 1e3:7.2f} ms  {gap['kind']:14s} {gap['after'][:34]:34s} -> "
              f"{gap['before'][:34]:34s} host: {' > '.join(gap['host'])}")


def print_sequence(result: dict) -> None:
    """Every device event of the window's tail, in order; a gap < 0 overlapped the event before (PDL)."""
    print(f"the last {len(result.get('sequence', []))} device events:")
    for event in result.get("sequence", []):
        print(f"  {event['at']:10.1f} {event['us']:7.1f} us  gap {event['gap']:6.1f}  {event['name']}")


def profiled_windows(engine, prompts, lengths, windows, out_dir: str, name: str) -> list[dict]:
    """One run of the workload, the profiler on only for the step ranges in ``windows``; a result per window."""
    engine.block_manager.reset_prefix_cache()
    results, step = [], 0
    with heap_frozen_while_running():
        add_all(engine, prompts, lengths)
        for first, last in windows:
            while step < first and engine.has_unfinished_requests():
                engine.step()
                step += 1
            if not engine.has_unfinished_requests():
                break
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                started = time.perf_counter()
                while step < last and engine.has_unfinished_requests():
                    engine.step()
                    step += 1
                torch.cuda.synchronize()
                seconds = time.perf_counter() - started
            trace_path = os.path.join(out_dir, f"{name}_steps_{first}_{last}.json")
            prof.export_chrome_trace(trace_path)
            with open(trace_path) as handle:
                result = analyse(json.load(handle))
            result.update(window=[first, last], wall_ms=1e3 * seconds)
            print(f"--- {name} steps {first}-{step}: {1e3 * seconds:.1f} ms wall "
                  f"({engine.core.scheduler.num_running} running at the end)")
            report(result)
            if name == "b1":
                print_sequence(result)
            results.append(result)
            with open(trace_path, "rb") as source, gzip.open(trace_path + ".gz", "wb") as target:
                target.write(source.read())
            os.remove(trace_path)
        while engine.has_unfinished_requests():
            engine.step()
    return results


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "step_gaps"
    workload = sys.argv[2] if len(sys.argv) > 2 else "w3"
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    if workload not in ("w2", "w3", "b1"):
        raise SystemExit(f"workload must be w2, w3 or b1, not {workload!r}")
    os.makedirs(out_dir, exist_ok=True)
    model = QWEN3_06B if workload == "w2" else LLAMA_1B
    engine, graphs, _ = build(model, dtype="bfloat16", max_model_len=4096)
    engine.core.step_observer = None
    print(torch.cuda.get_device_name(), torch.__version__, workload, "graphs", graphs, flush=True)
    vocab = engine.model_config.vocab_size
    requests = {"w3": lambda: fixed_length_workload(256, 512, 128, vocab, seed=2),
                "w2": lambda: uniform_length_workload(256, 100, 1024, vocab, seed=0),
                "b1": lambda: fixed_length_workload(1, 128, 256, vocab, seed=1)}[workload]()
    prompts, lengths = [r.prompt_token_ids for r in requests], [r.output_len for r in requests]
    generate(engine, [prompts[0][:32]] * 4, [4] * 4)
    for _ in range(runs):
        _, seconds = generate(engine, prompts, lengths)
        print(f"plain run: {sum(lengths) / seconds:.0f} output tok/s ({seconds:.3f} s)", flush=True)
    executor = engine.core.executor
    mark(executor, "launch", plan_label)
    mark(executor, "collect", "collect")
    mark(engine, "step", "step")
    windows = {"w3": ((0, 10**9),), "w2": W2_WINDOWS, "b1": B1_WINDOWS}[workload]
    results = profiled_windows(engine, prompts, lengths, windows, out_dir, workload)
    with open(os.path.join(out_dir, f"gaps_{workload}.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
