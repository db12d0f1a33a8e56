"""The simulator drives the new scheduling options through the engine's own scheduler."""

from __future__ import annotations

from joule.engine.request import RequestSLO
from joule.model.config import ModelConfig
from joule.perf.arrivals import WorkloadSpec, generate
from joule.perf.simulator import ClusterSimulator, ReplicaConfig


def _model() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=5000, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=4096)


def _simulate(request_slo=None, **settings):
    model = _model()
    replica = ReplicaConfig.for_hardware("L4", max_num_batched_tokens=512, max_model_len=512, **settings)
    requests = generate(WorkloadSpec.parse("uniform,rate=50,num=40,input=uniform:20:200,output=uniform:5:40,seed=1"),
                        model.vocab_size, 512)
    simulator = ClusterSimulator(model, [replica], record_plans=True, request_slo=request_slo)
    result = simulator.run(requests)
    return simulator, result


def test_prefill_first_in_the_simulator_never_mixes_prompts_and_decodes():
    simulator, result = _simulate(enable_chunked_prefill=False)
    assert all(record.finish_time is not None for record in result.records)
    seen_prompt: set[str] = set()
    for plan in simulator.plans():
        is_prompt = []
        for sequence in plan:
            is_prompt.append(sequence.request_id not in seen_prompt or sequence.num_tokens > 1)
            seen_prompt.add(sequence.request_id)
        assert all(is_prompt) or not any(is_prompt)


def test_deadline_and_predicted_admission_run_in_the_simulator_with_the_slo_on_every_request():
    slo = RequestSLO(ttft_seconds=2.0, tpot_seconds=0.05)
    simulator, result = _simulate(request_slo=slo, scheduling_policy="deadline", admission_policy="predicted")
    scheduler = simulator.replicas[0].core.scheduler
    assert scheduler.config.policy == "deadline" and scheduler.config.admission == "predicted"
    assert all(record.finish_time is not None for record in result.records)
    assert scheduler.step_time.ready  # fed by the simulated step times
    assert scheduler.admission.predictor.num_recorded == len(result.records)
