"""Workload 3 (256 x (512 -> 128), Llama-3.2-1B shape, bf16, dummy weights) with the decode lookahead queuing decode
steps only, or prompt steps too (``SchedulerConfig.lookahead_prompts``, off by default since 2026-12-05), alternated over rounds on one
engine, so machine drift between them cancels.

Usage (GPU machine): PYTHONPATH=. python benchmarks/gpu/w3_lookahead_ab.py [ROUNDS] [OUT_JSON]
"""

from __future__ import annotations

import json
import statistics
import sys

import torch

sys.path.insert(0, "benchmarks/gpu")
from engine_bench import LLAMA_1B, build, throughput  # noqa: E402

from joule.bench.workload import fixed_length_workload  # noqa: E402


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    engine, graphs, _ = build(LLAMA_1B, dtype="bfloat16", max_model_len=4096)
    workload = fixed_length_workload(256, 512, 128, engine.model_config.vocab_size, seed=2)
    engine.core.decode_lookahead = True
    results: dict[str, list[float]] = {"decode-only lookahead (default)": [], "prompt steps too": []}
    for _ in range(rounds):
        for label, prompts in (("decode-only lookahead (default)", False), ("prompt steps too", True)):
            engine.core.scheduler.config.lookahead_prompts = prompts
            results[label].append(throughput(engine, workload)["output_tok_per_s"])
    print(torch.cuda.get_device_name(), torch.__version__, f"graphs {graphs}")
    for label, values in results.items():
        print(f"{label:<28} median {statistics.median(values):8.0f} tok/s  runs "
              + ", ".join(f"{value:.0f}" for value in values))
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
