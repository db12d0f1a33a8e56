"""Kernel timeline of one graphed batch-1 decode step: where a layer's time goes between and inside kernels.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/replay_timeline.py [out.json]
Llama-3.2-1B shape, bf16, dummy weights, context ~256. Replays the batch-1 decode graph back to back under
torch.profiler and prints, per kernel name, the mean duration and the mean gap from the previous kernel's end
to its start (negative: it overlapped, as programmatic dependent launch allows), then one layer in order.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from joule.bench.workload import fixed_length_workload
from joule.llm_engine import LLMEngine
from joule.runtime.cuda_graphs import enable_engine_cuda_graphs
from joule.sampling_params import RequestOutputKind, SamplingParams

REPLAYS = 30


def main(out_path: str | None) -> None:
    engine = LLMEngine.from_kwargs(model="benchmarks/configs/llama-3.2-1b", load_format="dummy", dtype="bfloat16",
                                   max_model_len=4096, decode_lookahead=False)
    engine.core.step_observer = None
    if not enable_engine_cuda_graphs(engine):
        raise SystemExit("no CUDA graphs")
    prompt = fixed_length_workload(1, 256, 64, engine.model_config.vocab_size, seed=1)[0].prompt_token_ids
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    engine.add_request("timeline", {"prompt_token_ids": prompt}, params)
    for _ in range(4):
        engine.step()  # the graph's inputs now hold a context-258 decode row
    runner = engine.core.executor.graph_runner  # the variant a step of this context replays
    graph = (runner.short_graphs if runner.is_short(1, len(prompt) + 4) else runner.graphs)[1]
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted(((event.time_range.start, event.time_range.end, event.name) for event in prof.events()
                      if event.device_type == DeviceType.CUDA and event.time_range.end > event.time_range.start))
    per_replay = len(kernels) // REPLAYS
    span = (kernels[-1][1] - kernels[0][0]) / REPLAYS
    durations, gaps = defaultdict(list), defaultdict(list)
    for index, (start, end, name) in enumerate(kernels):
        durations[name].append(end - start)
        if index:
            gaps[name].append(start - kernels[index - 1][1])
    print(f"{len(kernels)} kernels over {REPLAYS} replays ({per_replay} a replay), {span:.1f} us a replay")
    print(f"{'us/replay':>10} {'calls':>6} {'mean us':>8} {'gap us':>7}  kernel")
    rows = []
    for name, values in sorted(durations.items(), key=lambda item: -sum(item[1])):
        gap = sum(gaps[name]) / max(1, len(gaps[name]))
        rows.append({"name": name, "calls": len(values) / REPLAYS, "mean_us": sum(values) / len(values),
                     "gap_us": gap, "us_per_replay": sum(values) / REPLAYS})
        print(f"{sum(values) / REPLAYS:10.1f} {len(values) / REPLAYS:6.1f} {sum(values) / len(values):8.2f} "
              f"{gap:7.2f}  {name[:90]}")
    middle = kernels[per_replay * (REPLAYS // 2): per_replay * (REPLAYS // 2 + 1)]
    print("one replay, in order (start offset, duration, gap):")
    origin = middle[0][0]
    for index, (start, end, name) in enumerate(middle[:24]):
        gap = start - middle[index - 1][1] if index else 0.0
        print(f"  {start - origin:8.2f} {end - start:7.2f} {gap:7.2f}  {name[:80]}")
    if out_path:
        with open(out_path, "w") as handle:
            json.dump({"span_us": span, "kernels_per_replay": per_replay, "rows": rows,
                       "one_replay": [(s - origin, e - s, n) for s, e, n in middle]}, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
