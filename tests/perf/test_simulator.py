"""Simulator: determinism, same scheduling decisions as a real EngineCore loop, metrics, workloads."""

from __future__ import annotations

import math

import pytest
from helpers.fixed_time_model import run_fixed_time_engine

from joule.engine.request import Request, RequestSLO
from joule.engine.scheduler_config import SchedulerConfig
from joule.model.config import ModelConfig
from joule.perf.arrivals import LengthDistribution, SyntheticRequest, TimedRequest, WorkloadSpec, generate
from joule.perf.metrics import SLO
from joule.perf.simulated_executor import SimulatedExecutor
from joule.perf.simulator import ClusterSimulator, ReplicaConfig
from joule.sampling_params import SamplingParams

STEP_SECONDS = 0.05


def small_model() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=5000, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=4096)


def replica(num_kv_blocks=None, **settings) -> ReplicaConfig:
    return ReplicaConfig.for_hardware("L4", num_kv_blocks=num_kv_blocks, **settings)


def run_real_engine(requests, num_blocks, block_size, settings) -> tuple[list, dict]:
    """EngineCore driven the way a server drives it, one step at a time (no lookahead, as the replicas here)."""
    return run_fixed_time_engine(SchedulerConfig(**settings), num_blocks, block_size, requests, STEP_SECONDS)


@pytest.mark.parametrize("num_blocks,budget", [(400, 256), (24, 64)])  # roomy; tight: chunking and preemption
def test_simulator_makes_the_same_scheduling_decisions_as_the_real_engine(num_blocks, budget):
    model = small_model()
    workload = WorkloadSpec(40, rate=15.0, input_len=LengthDistribution("uniform", 8, 150),
                            output_len=LengthDistribution("uniform", 1, 40), seed=3)
    requests = generate(workload, model.vocab_size)
    settings = dict(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=512)
    real_plans, real_first = run_real_engine(requests, num_blocks, 16, settings)

    simulator = ClusterSimulator(
        model, [replica(num_blocks, max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=512,
                        decode_lookahead=False)],  # the real side's stand-in executes one step at a time
        record_plans=True, fixed_step_seconds=STEP_SECONDS,
    )
    result = simulator.run(requests)
    assert simulator.plans(0) == real_plans
    assert {r.request_id: r.first_token_time for r in result.records} == pytest.approx(real_first)
    if num_blocks == 24:
        assert result.summary()["num_preemptions"] > 0


def test_simulation_is_deterministic_for_a_seed():
    model = small_model()
    spec = WorkloadSpec.parse("sharegpt,rate=30,num=50,seed=5")
    first = ClusterSimulator(model, [replica()] * 2).run(generate(spec, model.vocab_size, 2048)).summary()
    second = ClusterSimulator(model, [replica()] * 2).run(generate(spec, model.vocab_size, 2048)).summary()
    assert first == second
    other = WorkloadSpec.parse("sharegpt,rate=30,num=50,seed=6")
    third = ClusterSimulator(model, [replica()] * 2).run(generate(other, model.vocab_size, 2048)).summary()
    assert third["ttft_s"] != first["ttft_s"]


def test_the_progress_bar_counts_every_finished_request_and_changes_nothing():
    class CountingBar:
        count = 0

        def update(self, finished):
            self.count += finished

    model = small_model()
    spec = WorkloadSpec.parse("sharegpt,rate=30,num=40,seed=5")
    bar = CountingBar()
    shown = ClusterSimulator(model, [replica()] * 2)._run(generate(spec, model.vocab_size, 2048), bar).summary()
    assert bar.count == 40
    assert shown == ClusterSimulator(model, [replica()] * 2).run(generate(spec, model.vocab_size, 2048)).summary()


def test_metrics_of_an_offline_run_with_fixed_steps():
    """Two requests admitted together, 1 s steps: TTFT 1 s, one token per step after that."""
    model = small_model()
    spec = WorkloadSpec(2, input_len=LengthDistribution("fixed", 10), output_len=LengthDistribution("fixed", 5))
    result = ClusterSimulator(model, [replica()], fixed_step_seconds=1.0).run(generate(spec, model.vocab_size))
    summary = result.summary(SLO(ttft_s=1.5, tpot_s=0.5))
    assert summary["ttft_s"]["p50"] == pytest.approx(1.0)
    assert summary["tpot_s"]["p50"] == pytest.approx(1.0)
    assert summary["e2e_s"]["p50"] == pytest.approx(5.0)
    assert summary["output_throughput"] == pytest.approx(10 / 5.0)
    assert summary["num_steps"] == 5
    assert summary["slo_attainment"] == 0.0 and not summary["meets_slo"]


def test_energy_counts_idle_time_between_requests():
    model = small_model()
    spec = WorkloadSpec(2, rate=0.1, arrival="fixed", input_len=LengthDistribution("fixed", 10),
                        output_len=LengthDistribution("fixed", 2))
    result = ClusterSimulator(model, [replica()]).run(generate(spec, model.vocab_size))
    totals = result.replicas[0]
    idle = result.makespan - totals.busy_seconds
    assert idle > 9.0  # a 10 s gap between the two requests
    assert result.energy_joules() == pytest.approx(totals.busy_joules + totals.idle_watts * idle)


def test_synthetic_tokens_never_eos_unless_asked():
    executor = SimulatedExecutor(None, vocab_size=3, eos_token_id=1, fixed_step_seconds=0.1)
    assert all(executor.token_for(f"r{i}", p) != 1 for i in range(20) for p in range(20))
    stopping = SimulatedExecutor(None, vocab_size=3, eos_token_id=1, eos_probability=0.5, fixed_step_seconds=0.1)
    tokens = [stopping.token_for(f"r{i}", p) for i in range(20) for p in range(20)]
    assert 0.35 < tokens.count(1) / len(tokens) < 0.65
    with pytest.raises(ValueError, match="eos_token_id"):
        SimulatedExecutor(None, vocab_size=3, eos_probability=0.5, fixed_step_seconds=0.1)


def test_workload_parsing_and_arrival_processes():
    spec = WorkloadSpec.parse("input=fixed:100,output=uniform:5:9,rate=50,num=2000,arrival=gamma,cv=3,seed=1")
    requests = generate(spec, 1000)
    gaps = [b.arrival_time - a.arrival_time for a, b in zip(requests, requests[1:])]
    mean = sum(gaps) / len(gaps)
    assert mean == pytest.approx(1 / 50, rel=0.15)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert 2.0 < cv < 4.0
    assert {len(r.request.prompt_token_ids) for r in requests} == {100}
    assert {r.request.output_len for r in requests} <= set(range(5, 10))
    offline = generate(WorkloadSpec.parse("sharegpt,num=500"), 1000, max_model_len=1024)
    assert all(r.arrival_time == 0 for r in offline)
    assert all(len(r.request.prompt_token_ids) + r.request.output_len <= 1024 for r in offline)
    with pytest.raises(ValueError, match="unknown workload key"):
        WorkloadSpec.parse("sharegpt,speed=3")
    with pytest.raises(ValueError, match="lognormal"):
        LengthDistribution.parse("normal:3:4")
    assert SLO.parse("ttft=200ms,tpot=0.05,attainment=0.95") == SLO(0.2, 0.05, 0.95)


def test_kv_capacity_follows_memory_and_rejects_models_that_do_not_fit():
    big = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128)
    with pytest.raises(ValueError, match="no room for a KV cache on L4"):
        replica().kv_blocks(big)
    small = small_model()
    blocks = ReplicaConfig.for_hardware("H100").kv_blocks(small)
    per_block = small.kv_cache_bytes_per_token(2) * 16
    assert blocks == int((80 * 2**30 * 0.9 - small.num_parameters * 2 - 2 * 2**30) // per_block)


def test_simulator_charges_finishing_requests_and_the_wake_up_after_idle_time():
    """Two requests 10 s apart, 2 output tokens each: each first step wakes an idle replica, each second
    step finishes a request holding 11 KV tokens (10 prompt + 1 output). Steps run one by one (no
    lookahead, which would queue the second step behind the first and hide host-side costs in it)."""
    import dataclasses

    model = small_model()
    spec = WorkloadSpec(2, rate=0.1, arrival="fixed", input_len=LengthDistribution("fixed", 10),
                        output_len=LengthDistribution("fixed", 2))
    requests = generate(spec, model.vocab_size)
    plain = replica(decode_lookahead=False)
    with_events = dataclasses.replace(plain, profile=dataclasses.replace(
        plain.profile, wake_overhead_s=0.5, finish_overhead_s=0.01, finish_token_overhead_s=0.001))
    before = ClusterSimulator(model, [plain]).run(requests).summary()
    after = ClusterSimulator(model, [with_events]).run(requests).summary()
    assert after["ttft_s"]["p50"] - before["ttft_s"]["p50"] == pytest.approx(0.5)
    # e2e: the wake-up, then the finishing step's 10 ms + 11 tokens x 1 ms.
    assert after["e2e_s"]["p50"] - before["e2e_s"]["p50"] == pytest.approx(0.5 + 0.01 + 0.011)


def test_simulated_executor_knows_which_requests_a_step_finishes():
    from joule.perf.simulated_executor import finishes_with

    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=3, min_tokens=1), max_tokens=3,
                      eos_token_ids=frozenset({7}))
    assert not finishes_with(request, 5)
    assert not finishes_with(request, 7)  # EOS before min_tokens is banned
    request.output_token_ids.append(5)
    assert finishes_with(request, 7) and not finishes_with(request, 5)
    request.output_token_ids.append(5)
    assert finishes_with(request, 5)  # the length cap


def test_decode_lookahead_in_simulation_runs_the_engines_continuations_and_hides_host_time():
    """With the engine's decode lookahead the simulator drives ``Scheduler.schedule_continuation`` too: the
    same requests complete with the same tokens counts, and continuation steps cost max(host, device)
    instead of their sum, so a decode-heavy offline run ends no later (and here sooner)."""
    model = small_model()
    spec = WorkloadSpec(8, input_len=LengthDistribution("fixed", 32), output_len=LengthDistribution("fixed", 40))
    requests = generate(spec, model.vocab_size)
    plain = ClusterSimulator(model, [replica(decode_lookahead=False)]).run(requests)
    simulator = ClusterSimulator(model, [replica(decode_lookahead=True, lookahead_prompts=True)])
    continuations = []
    executor = simulator.replicas[0].executor
    launch = executor.launch
    executor.launch = lambda plan, previous=None: (
        continuations.append(plan) if previous is not None else None) or launch(plan, previous)
    ahead = simulator.run(requests)
    assert continuations
    first, second = plain.summary(), ahead.summary()
    assert second["num_requests"] == first["num_requests"] == 8
    assert second["output_throughput"] > first["output_throughput"]
    assert ahead.makespan < plain.makespan
    # Queuing only decode steps (the engine's default before 2026-12-05 (e)): prompt steps' host time shows again.
    decode_only = ClusterSimulator(model, [replica(decode_lookahead=True, lookahead_prompts=False)]).run(requests)
    assert plain.makespan > decode_only.makespan > ahead.makespan
    default = ClusterSimulator(model, [replica()]).run(requests)  # a GPU replica: both on, as the engine on CUDA
    assert default.makespan == ahead.makespan


def test_a_queued_graph_step_pays_its_per_layer_gaps_on_the_device():
    """A profile whose graph steps' per-layer overhead is device time: steps run one by one cost the same, but
    the lookahead can no longer hide that overhead behind the host. With no other host cost, a queued step then
    costs device + gaps (nothing left to overlap) instead of max(gaps, device)."""
    import dataclasses

    model = small_model()
    spec = WorkloadSpec(4, input_len=LengthDistribution("fixed", 32), output_len=LengthDistribution("fixed", 40))
    requests = generate(spec, model.vocab_size)
    host_side = replica()
    host_side = dataclasses.replace(host_side, profile=dataclasses.replace(
        host_side.profile, layer_overhead_s=1e-6, chunk_graph_max_tokens=512, max_graphed_chunks=2, step_overhead_s=0.0,
        sequence_overhead_s=0.0, finish_overhead_s=0.0, finish_token_overhead_s=0.0, wake_overhead_s=0.0))
    device_side = dataclasses.replace(host_side, profile=dataclasses.replace(
        host_side.profile, graph_layer_overhead_on_device=True))
    runs = {}
    for name, base in (("host", host_side), ("device", device_side)):
        for lookahead in (False, True):
            config = dataclasses.replace(base, decode_lookahead=lookahead)
            runs[name, lookahead] = ClusterSimulator(model, [config]).run(requests).makespan
    assert runs["host", False] == pytest.approx(runs["device", False])
    assert runs["host", True] < runs["host", False]
    assert runs["device", True] == pytest.approx(runs["device", False])


def test_simulator_charges_streamed_outputs_and_metering_only_when_the_run_has_them():
    """Clients that stream (a server's) and a metered engine cost host time per step that LLM.generate's
    FINAL_ONLY outputs and a benchmark's unmetered engine do not."""
    import dataclasses

    model = small_model()
    spec = WorkloadSpec(8, rate=float("inf"), input_len=LengthDistribution("fixed", 16),
                        output_len=LengthDistribution("fixed", 20))
    requests = generate(spec, model.vocab_size)
    plain = replica(decode_lookahead=False)
    observed = dataclasses.replace(plain, profile=dataclasses.replace(
        plain.profile, streamed_sequence_overhead_s=1e-3, metered_sequence_overhead_s=0.0,
        metered_step_overhead_s=0.0))
    base = ClusterSimulator(model, [plain]).run(requests).summary()["makespan_s"]
    streamed = ClusterSimulator(model, [observed]).run(requests).summary()["makespan_s"]
    final_only = ClusterSimulator(model, [observed], streamed_outputs=False).run(requests).summary()["makespan_s"]
    assert final_only == pytest.approx(base)
    # Every one of the 8 x 20 sampled tokens made an output: 160 ms more (the prompts fit one step).
    assert streamed - base == pytest.approx(8 * 20 * 1e-3)
    metered = dataclasses.replace(plain, profile=dataclasses.replace(plain.profile, metered_step_overhead_s=1e-2))
    unmetered = dataclasses.replace(metered, metered=False)
    steps = ClusterSimulator(model, [metered]).run(requests).replicas[0].num_steps
    assert (ClusterSimulator(model, [metered]).run(requests).summary()["makespan_s"]
            - ClusterSimulator(model, [unmetered]).run(requests).summary()["makespan_s"]) == pytest.approx(steps * 1e-2)


def test_shared_prefixes_hit_the_prefix_cache_alike_in_the_simulator_and_the_real_engine():
    """Prompts behind two shared 48-token prefixes: the second request of each group skips the cached prefix
    blocks (its first chunk starts past position 0), and both sides plan the same steps."""
    from joule.bench.workload import SharedPrefix

    model = small_model()
    workload = WorkloadSpec(16, rate=10.0, input_len=LengthDistribution("uniform", 8, 40),
                            output_len=LengthDistribution("uniform", 2, 12), seed=4, prefix=SharedPrefix(48, 2))
    requests = generate(workload, model.vocab_size, max_model_len=512)
    assert [r.request.prompt_token_ids[:48] for r in requests[:4:2]] == [requests[0].request.prompt_token_ids[:48]] * 2
    assert requests[0].request.prompt_token_ids[:48] != requests[1].request.prompt_token_ids[:48]
    settings = dict(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=512)
    real_plans, _ = run_real_engine(requests, 200, 16, settings)
    simulator = ClusterSimulator(model, [replica(200, max_num_seqs=8, max_num_batched_tokens=128, max_model_len=512,
                                                 decode_lookahead=False)],
                                 record_plans=True, fixed_step_seconds=STEP_SECONDS)
    simulator.run(requests)
    assert simulator.plans(0) == real_plans
    first_chunks = {}
    for plan in real_plans:
        for sequence in plan:
            first_chunks.setdefault(sequence.request_id, sequence.start_position)
    assert sum(start >= 48 for start in first_chunks.values()) >= 10  # 3 blocks of 16 cached per group


def test_a_request_arriving_during_a_replicas_last_step_waits_for_that_step_to_end():
    """The engine adds requests between steps: one that arrives while the replica runs the step that empties it
    starts at that step's end, and does not pay the wake-up of an idle replica."""
    import dataclasses

    model = small_model()
    first = TimedRequest("a", 0.0, SyntheticRequest([5] * 10, 1))
    during = TimedRequest("b", 0.02, SyntheticRequest([6] * 10, 1))
    after = TimedRequest("c", 1.0, SyntheticRequest([7] * 10, 1))
    records = ClusterSimulator(model, [replica(decode_lookahead=False)], fixed_step_seconds=STEP_SECONDS).run(
        [first, during, after]).records
    ttft = {record.request_id: record.first_token_time - record.arrival_time for record in records}
    assert ttft == pytest.approx({"a": STEP_SECONDS, "b": 2 * STEP_SECONDS - 0.02, "c": STEP_SECONDS})
    plain = replica(decode_lookahead=False)
    waking = dataclasses.replace(plain, profile=dataclasses.replace(plain.profile, wake_overhead_s=0.5))
    during = TimedRequest("b", 1e-6, SyntheticRequest([6] * 10, 1))  # inside any predicted step
    ttft_plain = {r.request_id: r.first_token_time - r.arrival_time
                  for r in ClusterSimulator(model, [plain]).run([first, during, after]).records}
    ttft_waking = {r.request_id: r.first_token_time - r.arrival_time
                   for r in ClusterSimulator(model, [waking]).run([first, during, after]).records}
    # "a" and "c" wake an idle replica; "b" found it still running "a"'s step.
    assert ttft_waking["a"] - ttft_plain["a"] == pytest.approx(0.5)
    assert ttft_waking["c"] - ttft_plain["c"] == pytest.approx(0.5)
    assert ttft_waking["b"] - ttft_plain["b"] == pytest.approx(0.5)  # it waited for "a"'s longer step


def test_tenants_from_the_serving_benchmarks_planner_are_billed_and_judged_by_their_own_slos():
    """``joule simulate --tenant``: the requests ``joule bench serve`` would send (its planner), billed to their
    tenants (the fair policy sees them) and judged by their tenant's SLOs; the summary has a line per tenant."""
    from joule.bench.serve_workload import TenantSpec, WorkloadOptions, plan_run
    from joule.perf.arrivals import tenant_requests

    model = small_model()
    spec = WorkloadSpec.parse("input=fixed:64,output=fixed:8,num=30,rate=20,seed=3")
    tenants = [TenantSpec.parse("light:rate=2,num=4,ttft=0.5"), TenantSpec.parse("heavy:share=1,input=256")]
    requests = tenant_requests(spec, tenants, model.vocab_size, max_model_len=1024, default_slo=SLO(tpot_s=1.0))
    planned = plan_run(WorkloadOptions(num_prompts=30, input_len=spec.input_len, output_len=spec.output_len,
                                       max_model_len=1024, token_id_range=(0, model.vocab_size), seed=3),
                       tenants, 20.0, SLO(tpot_s=1.0))
    assert [r.request.prompt_token_ids for r in requests] == [p.prompt for p in planned]
    assert {r.tenant for r in requests} == {"light", "heavy"} and sum(r.tenant == "light" for r in requests) == 4
    assert all(r.slo == (SLO(0.5, 1.0) if r.tenant == "light" else SLO(None, 1.0)) for r in requests)
    assert all(len(r.request.prompt_token_ids) == (64 if r.tenant == "light" else 256) for r in requests)
    simulator = ClusterSimulator(model, [replica(scheduling_policy="fair")])
    seen = []
    add = simulator.replicas[0].core.add_request
    simulator.replicas[0].core.add_request = lambda request: seen.append((request.tenant, request.slo)) or add(request)
    summary = simulator.run(requests).summary()
    assert ("light", RequestSLO(0.5, 1.0)) in seen and ("heavy", RequestSLO(None, 1.0)) in seen
    assert set(summary["tenants"]) == {"light", "heavy"}
    assert summary["tenants"]["light"]["num_requests"] == 4 and summary["slo"]["per_tenant"]
    assert summary["tenants"]["light"]["slo_attainment"] == 1.0  # a roomy replica meets every target
    assert summary["slo_attainment"] == 1.0


def test_the_fair_policy_keeping_up_serves_a_heavy_tenant_below_capacity_as_fcfs_does():
    """Simulated H100, Llama-3.2-1B shape: a light tenant (4 req/s) beside a heavy one at 40 req/s, which fcfs
    serves easily. The fixed cap alone (``fair_keep_up=False``) protects the light tenant by starving the heavy one;
    keeping up (the default) the heavy tenant keeps fcfs's throughput and the light one still beats fcfs."""
    from joule.bench.serve_workload import TenantSpec
    from joule.perf.arrivals import tenant_requests
    from joule.perf.cli import load_model_config

    model = load_model_config("llama-3.2-1b")
    spec = WorkloadSpec.parse("input=fixed:256,output=fixed:32,num=176,seed=5")
    tenants = [TenantSpec.parse("light:rate=4,num=16"),
               TenantSpec.parse("heavy:rate=40,num=160,input=uniform:1024:3072,output=uniform:64:192")]
    requests = tenant_requests(spec, tenants, model.vocab_size, max_model_len=4096)
    summaries = {}
    for name, settings in (("fcfs", dict(scheduling_policy="fcfs")),
                           ("fair", dict(scheduling_policy="fair", fair_keep_up=False)),
                           ("keep-up", dict(scheduling_policy="fair"))):
        replica = ReplicaConfig.for_hardware("H100", max_num_batched_tokens=8192, **settings)
        summaries[name] = ClusterSimulator(model, [replica]).run(requests).summary()["tenants"]
    heavy = {name: summary["heavy"] for name, summary in summaries.items()}
    light = {name: summary["light"]["ttft_s"]["p99"] for name, summary in summaries.items()}
    assert heavy["fair"]["ttft_s"]["p50"] > 1.0 > 0.3 > heavy["keep-up"]["ttft_s"]["p50"]
    assert heavy["keep-up"]["output_throughput"] >= 0.95 * heavy["fcfs"]["output_throughput"]
    assert light["fair"] < light["keep-up"] < light["fcfs"]
