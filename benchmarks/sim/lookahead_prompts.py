"""Serving with prompt steps queued ahead or not, in simulation: does the default (on since 2026-12-05 (e)) cost
a new request its TTFT?

Usage (repo root, CPU): PYTHONPATH=. python benchmarks/sim/lookahead_prompts.py [--hardware H100] [--rates 8,24,40,60]
Poisson arrivals as `joule bench serve` plans them (10 s, seed 0) in two workloads (long prompts, short outputs; and
nano-vllm's lengths), Llama-3.2-1B shape, through ``ClusterSimulator`` (the engine's scheduler and its lookahead
continuations on the shipped calibrated profile), with ``lookahead_prompts`` off and on, the decode lookahead on
in both, as the engine runs on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from goodput import MODEL_CONFIG, simulate_run, timed_requests  # noqa: E402

from joule.bench.serve_workload import WorkloadOptions, parse_rates  # noqa: E402
from joule.bench.workload import LengthDistribution  # noqa: E402
from joule.model.config import ModelConfig  # noqa: E402
from joule.perf.simulator import ReplicaConfig  # noqa: E402

WORKLOADS = (("uniform:1024:3072", "uniform:64:192"), ("uniform:100:1024", "uniform:100:1024"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hardware", default="H100")
    parser.add_argument("--rates", default="8,24,40,60")
    args = parser.parse_args()
    model = ModelConfig.from_file(MODEL_CONFIG)
    print(f"{'input -> output':<38} {'req/s':>5} {'queued':>6} {'done/s':>7} {'TTFT p50':>9} {'p99':>8} "
          f"{'TPOT p50':>9} {'p99':>6}  (ms)")
    for input_len, output_len in WORKLOADS:
        options = WorkloadOptions(num_prompts=1, input_len=LengthDistribution.parse(input_len),
                                  output_len=LengthDistribution.parse(output_len, "output"), duration_s=10,
                                  max_model_len=4096, seed=0)
        for rate in parse_rates(args.rates):
            requests = timed_requests(options, rate)
            for prompts in (False, True):
                replica = ReplicaConfig.for_hardware(args.hardware, max_model_len=4096, max_num_seqs=256,
                                                     max_num_batched_tokens=8192, decode_lookahead=True,
                                                     lookahead_prompts=prompts)
                metrics = simulate_run(model, replica, requests, rate).metrics
                print(f"{input_len + ' -> ' + output_len:<38} {rate:>5g} {'prompts' if prompts else 'decodes':>6} "
                      f"{metrics.request_throughput:>7.2f} {metrics.ttft_ms.median:>9.1f} "
                      f"{metrics.ttft_ms.percentiles['p99']:>8.1f} {metrics.tpot_ms.median:>9.2f} "
                      f"{metrics.tpot_ms.percentiles['p99']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
