"""The TBT SLO (a request's largest gap between tokens) in the simulator's summary: a prefill-first schedule
stalls a running decode for a whole prompt, which the TBT sees."""

from __future__ import annotations

import pytest

from joule.bench.workload import SyntheticRequest
from joule.model.config import ModelConfig
from joule.perf.arrivals import LengthDistribution, TimedRequest, WorkloadSpec, generate
from joule.perf.metrics import SLO
from joule.perf.simulator import ClusterSimulator, ReplicaConfig


def small_model() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=5000, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=8192)


def test_met_needs_the_largest_gap_when_a_tbt_target_is_set():
    slo = SLO(ttft_s=1.0, tbt_s=0.1)
    assert slo.met(0.5, 0.05, max_itl=0.1) and not slo.met(0.5, 0.05, max_itl=0.2)
    assert SLO(ttft_s=1.0, tpot_s=0.1).met(0.5, 0.05)  # no TBT target: the gap is not needed
    with pytest.raises(ValueError, match="tbt_s"):
        slo.met(0.5, 0.05)


def test_fixed_steps_give_every_request_a_one_step_largest_gap():
    model = small_model()
    spec = WorkloadSpec(2, input_len=LengthDistribution("fixed", 10), output_len=LengthDistribution("fixed", 5))
    result = ClusterSimulator(model, [ReplicaConfig.for_hardware("L4")], fixed_step_seconds=1.0).run(
        generate(spec, model.vocab_size))
    assert [record.max_itl for record in result.records] == [1.0, 1.0]
    met = result.summary(SLO(ttft_s=1.5, tbt_s=1.0))
    assert met["slo_attainment"] == 1.0 and met["slo"]["tbt_s"] == 1.0
    assert result.summary(SLO(ttft_s=1.5, tbt_s=0.9))["slo_attainment"] == 0.0


def test_prefill_first_stalls_a_running_decode_that_chunking_protects():
    """A short request decodes; a 4,000-token prompt arrives. Prefill-first runs the whole prompt in one step
    (the decode waits), chunked prefill runs 256-token chunks beside it: similar TPOT, very different TBT."""
    model = small_model()
    requests = [TimedRequest("decoding", 0.0, SyntheticRequest(list(range(1, 17)), 64)),
                TimedRequest("long", 0.05, SyntheticRequest(list(range(1, 4001)), 2))]
    summaries = {}
    for chunked in (True, False):
        replica = ReplicaConfig.for_hardware("L4", max_num_batched_tokens=256 if chunked else 8192,
                                             max_model_len=8192, enable_chunked_prefill=chunked)
        result = ClusterSimulator(model, [replica]).run(requests)
        decoding = next(record for record in result.records if record.request_id == "decoding")
        summaries[chunked] = (decoding.max_itl, decoding.tpot)
    (chunked_gap, _), (stalled_gap, _) = summaries[True], summaries[False]
    assert stalled_gap > 2 * chunked_gap
    slo = SLO(tbt_s=(chunked_gap + stalled_gap) / 2)
    assert slo.met(0.0, 0.0, chunked_gap) and not slo.met(0.0, 0.0, stalled_gap)
