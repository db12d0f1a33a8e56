"""Whole runs of a validation, simulated again from what the report saved: another profile (a refit, a merge of two
calibrations) is checked against runs measured earlier without a GPU or an engine.

A report keeps each run's workload and the engine settings the simulator was given (``replica_settings``). Reports
saved before that get the settings inferred from their measured steps (``inferred_settings``) and the workload from
the command line; the re-simulation says so."""

from __future__ import annotations

from dataclasses import fields

from joule.model.config import ModelConfig
from joule.perf.arrivals import TimedRequest, WorkloadSpec, generate
from joule.perf.hardware import get_hardware
from joule.perf.profile import DeviceProfile
from joule.perf.simulator import ClusterSimulator, ReplicaConfig

# ReplicaConfig fields a validation run takes from its engine; "streamed" (the run's output kind) travels beside them.
REPLICA_KEYS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size", "num_kv_blocks",
                "enable_prefix_caching", "decode_lookahead", "lookahead_prompts", "metered")
COMPARED = ("output_throughput", "makespan_s", "ttft_s_p50", "tpot_s_p50", "energy_j")


def replica_settings(engine, streamed: bool) -> dict:
    """The engine's KV capacity, scheduler limits, lookahead and metering, as plain values a report can keep."""
    config = engine.core.scheduler.config
    return {
        "max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_model_len": config.max_model_len, "block_size": engine.block_manager.block_size,
        "num_kv_blocks": engine.block_manager.num_blocks,
        "enable_prefix_caching": engine.block_manager.enable_prefix_caching,
        "decode_lookahead": engine.core.decode_lookahead, "lookahead_prompts": config.lookahead_prompts,
        "metered": engine.core.step_observer is not None, "streamed": streamed,
    }


def simulate_with(model_config: ModelConfig, profile: DeviceProfile, settings: dict,
                  requests: list[TimedRequest]) -> dict:
    """The simulator's summary of the requests on one replica with the saved settings."""
    replica = ReplicaConfig(hardware=get_hardware(profile.hardware), profile=profile,
                            **{key: settings[key] for key in REPLICA_KEYS})
    return ClusterSimulator(model_config, [replica], streamed_outputs=settings["streamed"]).run(requests).summary()


def offline_requests(spec: str, vocab_size: int) -> list[TimedRequest]:
    """NUM_PROMPTS,INPUT_LEN,OUTPUT_LEN, every request there at time 0 (as ``LLM.generate`` gets them)."""
    from joule.bench.workload import fixed_length_workload

    try:
        num, input_len, output_len = (int(value) for value in spec.split(","))
    except ValueError:
        raise ValueError(f"--offline: expected NUM_PROMPTS,INPUT_LEN,OUTPUT_LEN, got {spec!r}") from None
    prompts = fixed_length_workload(num, input_len, output_len, vocab_size, seed=0)
    return [TimedRequest(f"offline-{index}", 0.0, request) for index, request in enumerate(prompts)]


def serving_requests(spec: str, vocab_size: int, max_model_len: int) -> list[TimedRequest]:
    return generate(WorkloadSpec.parse(spec), vocab_size, max_model_len)


def requests_for(workload: dict, vocab_size: int, max_model_len: int) -> list[TimedRequest]:
    if workload["kind"] == "offline":
        return offline_requests(workload["spec"], vocab_size)
    return serving_requests(workload["spec"], vocab_size, max_model_len)


def inferred_settings(section: dict, streamed: bool) -> dict:
    """Settings of a run saved without them: the step budget is the largest measured step's tokens; the lookahead
    was on when any step was queued, and queued prompt chunks too when a queued step has one; metering when the run
    has a measured energy; KV blocks ample (the runs validation makes stay far below a GPU's capacity); the rest
    ``ReplicaConfig``'s defaults (the engine's)."""
    steps = (section.get("run_steps") or {}).get("step_checks", [])
    if not steps:
        raise ValueError("the saved run has neither its settings nor its steps to infer them from")
    defaults = {item.name: item.default for item in fields(ReplicaConfig) if item.name in REPLICA_KEYS}
    return defaults | {
        "max_num_batched_tokens": max(step["num_tokens"] for step in steps), "num_kv_blocks": None,
        "decode_lookahead": any(step.get("queued", False) for step in steps),
        "lookahead_prompts": any(step.get("queued", False) and any(row[0] > 1 for row in step["sequences"])
                                 for step in steps),
        "metered": "energy_j" in section, "streamed": streamed,
    }


def resimulate(section: dict, name: str, model_config: ModelConfig, profile: DeviceProfile,
               spec: str | None = None) -> dict:
    """Measured (as saved) against a fresh simulation, as ``compare_run`` reports them; ``spec`` is the workload
    for a report that did not save its own. ``inferred`` lists what had to be guessed."""
    inferred = []
    settings = section.get("simulation")
    if settings is None:
        settings = inferred_settings(section, streamed=name != "offline")
        inferred.append("settings")
    workload = section.get("workload")
    if workload is None:
        if not spec:
            raise ValueError(f"the saved {name} run has no workload: give it with --{name}")
        workload = {"kind": name, "spec": spec}
        inferred.append("workload")
    requests = requests_for(workload, model_config.vocab_size, settings["max_model_len"])
    simulated = simulate_with(model_config, profile, settings, requests)
    values = {"output_throughput": simulated["output_throughput"], "makespan_s": simulated["makespan_s"],
              "ttft_s_p50": simulated["ttft_s"]["p50"], "tpot_s_p50": simulated["tpot_s"]["p50"],
              "energy_j": simulated["energy_j"]}
    comparison = {
        key: {"measured": section[key]["measured"], "simulated": values[key],
              "error": (values[key] - section[key]["measured"]) / section[key]["measured"]}
        for key in COMPARED if key in section
    }
    return comparison | {"workload": workload, "simulation": settings, "inferred": inferred,
                         "simulated_steps": simulated["num_steps"]}
