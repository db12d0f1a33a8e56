"""Property: with equal step times, the simulator and a real ``EngineCore`` make the same scheduling decisions.

Hypothesis draws workloads (arrival rates, prompt and output lengths, shared prefixes) and engine settings (KV
cache size down to preempting, token budget, sequences per step, fcfs, deadline or fair (with or without keep-up;
requests billed to random tenants), greedy or predicted admission, chunked or prefill-first, the decode lookahead
on or off). The real side is the engine's core with a stand-in model that returns a token per sampled sequence in
a fixed time, driven as a server drives it: requests that have arrived are added between steps, an idle engine
waits for the next arrival.
"""

from __future__ import annotations

from helpers.fixed_time_model import run_fixed_time_engine
from hypothesis import given, settings
from hypothesis import strategies as st

from joule.bench.workload import SharedPrefix
from joule.engine.request import RequestSLO
from joule.engine.scheduler_config import SchedulerConfig
from joule.model.config import ModelConfig
from joule.perf.arrivals import LengthDistribution, WorkloadSpec, generate
from joule.perf.simulator import ClusterSimulator, ReplicaConfig

STEP_SECONDS = 0.05
BLOCK_SIZE = 16
MODEL = ModelConfig(architecture="LlamaForCausalLM", vocab_size=5000, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                    max_position_embeddings=4096)


@st.composite
def cases(draw):
    prefix = SharedPrefix(draw(st.sampled_from([0, 16, 40])), draw(st.integers(1, 3)))
    low = draw(st.integers(1, 120))
    workload = WorkloadSpec(
        num_requests=draw(st.integers(1, 20)), rate=draw(st.sampled_from([2.0, 10.0, 40.0, float("inf")])),
        arrival=draw(st.sampled_from(["poisson", "fixed"])),
        input_len=LengthDistribution("uniform", low, low + draw(st.integers(0, 120))),
        output_len=LengthDistribution("uniform", 1, draw(st.integers(1, 30))), seed=draw(st.integers(0, 10**6)),
        prefix=prefix)
    longest = prefix.length + low + 120 + 30
    chunked = draw(st.booleans())
    max_model_len = 512
    budget = draw(st.sampled_from([16, 32, 64, 256])) if chunked else max_model_len
    # From barely one request's blocks (preemptions) to plenty.
    num_blocks = draw(st.integers(-(-longest // BLOCK_SIZE) + 1, 120))
    return dict(workload=workload, chunked=chunked, budget=budget, num_blocks=num_blocks,
                max_num_seqs=draw(st.integers(1, 8)),
                policy=draw(st.sampled_from(["fcfs", "deadline", "fair", "fair-keep-up"])),
                tenants=draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=20)),
                admission=draw(st.sampled_from(["greedy", "predicted"])), lookahead=draw(st.booleans()),
                max_model_len=max_model_len)


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_the_simulator_plans_every_step_as_the_engine_does(case):
    requests = generate(case["workload"], MODEL.vocab_size, max_model_len=case["max_model_len"])
    for index, timed in enumerate(requests):  # tenants, for the fair policy to be fair between
        timed.tenant = case["tenants"][index % len(case["tenants"])]
    slo = RequestSLO(ttft_seconds=0.5, tpot_seconds=0.1) if case["policy"] == "deadline" else None
    policy, keep_up = case["policy"].removesuffix("-keep-up"), case["policy"].endswith("keep-up")
    replica = ReplicaConfig.for_hardware(
        "L4", num_kv_blocks=case["num_blocks"], max_num_seqs=case["max_num_seqs"],
        max_num_batched_tokens=case["budget"], max_model_len=case["max_model_len"], block_size=BLOCK_SIZE,
        scheduling_policy=policy, admission_policy=case["admission"], fair_keep_up=keep_up,
        enable_chunked_prefill=case["chunked"], decode_lookahead=case["lookahead"])
    simulator = ClusterSimulator(MODEL, [replica], record_plans=True, fixed_step_seconds=STEP_SECONDS,
                                 request_slo=slo)
    result = simulator.run(requests)
    # The simulator's engine sees the same limit: the model length, capped by what its KV cache holds.
    max_model_len = min(case["max_model_len"], case["num_blocks"] * BLOCK_SIZE)
    config = SchedulerConfig(case["max_num_seqs"], case["budget"], max_model_len, policy=policy,
                             admission=case["admission"], enable_chunked_prefill=case["chunked"], fair_keep_up=keep_up)
    engine_plans, _ = run_fixed_time_engine(config, case["num_blocks"], BLOCK_SIZE, requests, STEP_SECONDS,
                                            case["lookahead"], slo)
    assert simulator.plans(0) == engine_plans
    assert len(result.finished) == len(requests)
