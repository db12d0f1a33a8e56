"""Fairness in simulation: the engine's own scheduler on simulated time, no GPU needed.

Usage: PYTHONPATH=. python benchmarks/sim/fairness.py [HEAVY_REQ_PER_S] [BUDGETS] [PROFILE_JSON] [FAIR_PROMPT_CAP]
       [keep-up]   (the fair policy keeping up, the engine's default; without it the fixed cap, --no-fair-keep-up)
A light tenant (4 req/s, 256 -> 32 tokens) beside a heavy one (prompts uniform 1024-3072, outputs 64-192)
for 20 s of Poisson arrivals, Llama-3.2-1B shape on the shipped (or given) H100 profile; prints the light tenant's
TTFT alone and under the flood for fcfs and fair, at each token budget (default 2048,8192), and the heavy
tenant's finished requests, TTFT p50 and output tokens per second over the run.
"""

from __future__ import annotations

import random
import sys

import numpy as np

from joule.bench.workload import SyntheticRequest
from joule.engine.policies import DEFAULT_FAIR_PROMPT_CAP
from joule.model.config import ModelConfig
from joule.perf.arrivals import TimedRequest
from joule.perf.simulator import ClusterSimulator, ReplicaConfig

MODEL = ModelConfig.from_file("benchmarks/configs/llama-3.2-1b/config.json")


def workload(heavy_rate: float, seconds: float = 20.0, seed: int = 0) -> list[TimedRequest]:
    rng = random.Random(seed)
    requests = []
    for tenant, rate in (("light", 4.0), ("heavy", heavy_rate)):
        clock, index = 0.0, 0
        while rate > 0:
            clock += rng.expovariate(rate)
            if clock > seconds:
                break
            if tenant == "light":
                request = SyntheticRequest([rng.randrange(100, 30000) for _ in range(256)], 32)
            else:
                prompt = [rng.randrange(100, 30000) for _ in range(rng.randint(1024, 3072))]
                request = SyntheticRequest(prompt, rng.randint(64, 192))
            requests.append(TimedRequest(f"{tenant}-{index}", clock, request))
            index += 1
    return requests


class TenantSimulator(ClusterSimulator):
    """Requests are billed to the tenant named before the dash of their id (the API's ``user``)."""

    def _make_request(self, timed):
        request = super()._make_request(timed)
        request.tenant = timed.request_id.split("-")[0]
        return request


def light_ttft(policy: str, heavy_rate: float, budget: int, profile: str | None,
               fair_prompt_cap: int = DEFAULT_FAIR_PROMPT_CAP,
               keep_up: bool = False) -> tuple[float, float, int, float, float]:
    """The light tenant's TTFT p99 and p50; the heavy tenant's finished requests, TTFT p50 and output tok/s."""
    replica = ReplicaConfig.for_hardware("H100", profile_path=profile)
    replica.scheduling_policy = policy
    replica.fair_prompt_cap = fair_prompt_cap
    replica.max_num_batched_tokens = budget
    replica.fair_keep_up = keep_up
    result = TenantSimulator(MODEL, [replica]).run(workload(heavy_rate))
    records = result.records
    light = [r.ttft for r in records if r.request_id.startswith("light") and r.first_token_time is not None]
    heavy = [r for r in records if r.request_id.startswith("heavy") and r.finish_time is not None]
    heavy_ttft = float(np.percentile([r.ttft for r in heavy], 50)) if heavy else float("nan")
    heavy_tokens = sum(r.num_output_tokens for r in heavy) / result.makespan if heavy else 0.0
    return float(np.percentile(light, 99)), float(np.percentile(light, 50)), len(heavy), heavy_ttft, heavy_tokens


def main() -> None:
    heavy_rate = float(sys.argv[1]) if len(sys.argv) > 1 else 150.0
    budgets = [int(value) for value in sys.argv[2].split(",")] if len(sys.argv) > 2 else [2048, 8192]
    profile = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
    fair_prompt_cap = int(sys.argv[4]) if len(sys.argv) > 4 else DEFAULT_FAIR_PROMPT_CAP
    keep_up = len(sys.argv) > 5 and sys.argv[5] == "keep-up"
    for budget in budgets:
        solo_p99 = light_ttft("fcfs", 0.0, budget, profile)[0]
        for policy, heavy in (("fcfs", 0.0), ("fcfs", heavy_rate), ("fair", heavy_rate)):
            p99, p50, heavy_done, heavy_ttft, heavy_tokens = light_ttft(policy, heavy, budget, profile,
                                                                        fair_prompt_cap, keep_up)
            print(f"budget {budget:5d} {policy:5s} heavy {heavy:5.0f} req/s: light TTFT p99 {1e3 * p99:9.1f} ms "
                  f"({p99 / solo_p99:6.1f}x solo), p50 {1e3 * p50:8.1f} ms; heavy: {heavy_done} done, TTFT p50 "
                  f"{1e3 * heavy_ttft:9.1f} ms, {heavy_tokens:7.0f} output tok/s", flush=True)


if __name__ == "__main__":
    main()
