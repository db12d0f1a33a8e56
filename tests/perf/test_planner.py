"""Planner: plans meet the SLO and are ordered by the objective; large multi-replica sweeps run fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from joule.model.config import ModelConfig
from joule.perf.arrivals import WorkloadSpec, generate
from joule.perf.metrics import SLO
from joule.perf.planner import Planner, PlannerConfig
from joule.perf.simulator import ClusterSimulator, ReplicaConfig

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"


def small_model() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=5000, hidden_size=512, intermediate_size=1024,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=4096)


def quick_config(**overrides) -> PlannerConfig:
    values = dict(hardware=("L4", "A10G"), batched_tokens=(2048,), max_seqs=(64,), search_requests=40,
                  bisection_steps=3, verify_top=2, max_model_len=1024)
    values.update(overrides)
    return PlannerConfig(**values)


WORKLOAD = WorkloadSpec.parse("input=fixed:64,output=fixed:32,rate=40,num=80")
SLO_TARGET = SLO(ttft_s=0.25, tpot_s=0.02)


def test_planner_returns_cheapest_plan_that_meets_the_slo():
    plans = Planner(small_model(), WORKLOAD, SLO_TARGET, quick_config()).run()
    best = plans[0]
    assert best.meets_slo
    assert best.verified["slo_attainment"] >= SLO_TARGET.attainment
    assert best.verified["ttft_s"]["p50"] <= SLO_TARGET.ttft_s
    assert sum(best.counts.values()) >= 1
    # Capacity covers the target rate, and no other verified plan that meets the SLO is cheaper.
    assert sum(best.capacities[name] * count for name, count in best.counts.items()) >= WORKLOAD.rate * 0.999
    for other in plans[1:]:
        if other.verified and other.meets_slo:
            assert other.hourly_usd >= best.hourly_usd
    assert best.usd_per_million_tokens == pytest.approx(best.hourly_usd / (WORKLOAD.rate * 32 * 3600) * 1e6)


def test_energy_objective_orders_by_joules_per_token_and_price_overrides_apply():
    config = quick_config(objective="energy", allow_mixed=False, prices={"L4": 0.01})
    plans = Planner(small_model(), WORKLOAD, SLO_TARGET, config).run()
    verified = [plan for plan in plans if plan.verified and plan.meets_slo]
    assert verified
    assert [p.joules_per_token for p in verified] == sorted(p.joules_per_token for p in verified)
    l4_plans = [p for p in plans if list(p.counts) == ["L4"]]
    assert l4_plans and l4_plans[0].hourly_usd == pytest.approx(0.01 * l4_plans[0].counts["L4"])


def test_planner_rejects_offline_workloads_and_unknown_objectives():
    with pytest.raises(ValueError, match="rate"):
        Planner(small_model(), WorkloadSpec.parse("fixed,num=10"), SLO_TARGET, quick_config())
    with pytest.raises(ValueError, match="objective"):
        quick_config(objective="speed")


def test_thousand_requests_per_second_across_replicas_simulates_quickly():
    model = ModelConfig.from_file(CONFIGS / "qwen3-0.6b")
    spec = WorkloadSpec.parse("input=lognormal:128:0.5:512,output=fixed:24,rate=1200,num=3000")
    requests = generate(spec, model.vocab_size, 1024)
    replica = ReplicaConfig.for_hardware("H100", max_num_batched_tokens=4096, max_model_len=1024)
    started = time.perf_counter()
    result = ClusterSimulator(model, [replica] * 16).run(requests)
    wall = time.perf_counter() - started
    summary = result.summary(SLO(ttft_s=1.0, tpot_s=0.1))
    assert summary["num_finished"] == 3000
    assert summary["request_throughput"] > 800  # 16 replicas keep up with most of 1,200 req/s
    assert {record.replica for record in result.records} == set(range(16))
    assert wall < 60, f"3,000 requests at 1,200 req/s took {wall:.1f} s to simulate"
