"""A fixed piece of host work, timed: the engine's own scheduler, block manager and step model serving a fixed
workload in simulated time (pure Python, no device, no torch).

Why: machines lent as one GPU kind differed 2x in host speed between calls (eager batch-1 decode 71 against 141
tok/s on two H200s, docs/benchmarks.md), and a profile's host terms describe the host it was calibrated on.
Calibration records this probe in the profile (``DeviceProfile.host_probe_s``) and validation measures it again, so a
miss on a faster or slower host shows as one.
"""

from __future__ import annotations

import time

from joule.model.config import ModelConfig

# Llama-3.2-1B's shape: only the step model's arithmetic depends on it.
_PROBE_MODEL = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=2048,
                           intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=64, max_position_embeddings=4096)
PROBE_WORKLOAD = "input=uniform:64:512,output=uniform:16:96,num=96,rate=200,seed=11"


def host_probe_seconds(repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs of the probe (other processes only ever slow it down): ~0.1-0.3 s each."""
    from joule.perf.arrivals import WorkloadSpec, generate
    from joule.perf.simulator import ClusterSimulator, ReplicaConfig

    requests = generate(WorkloadSpec.parse(PROBE_WORKLOAD), _PROBE_MODEL.vocab_size, 4096)
    replica = ReplicaConfig.for_hardware("H100", calibrated=False, max_num_batched_tokens=2048, metered=False)
    best = float("inf")
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        ClusterSimulator(_PROBE_MODEL, [replica]).run(requests)
        best = min(best, time.perf_counter() - started)
    return best


def describe(now_s: float, calibrated_s: float | None) -> str:
    """One line for a validation's output: this host's probe against the profile's."""
    if not calibrated_s:
        return f"host probe {1e3 * now_s:.0f} ms (the profile predates the probe: no comparison)"
    ratio = calibrated_s / now_s
    return (f"host probe {1e3 * now_s:.0f} ms against {1e3 * calibrated_s:.0f} ms at calibration: this host is "
            f"{ratio:.2f}x as fast by this probe (noisy: it read 74-126 ms on one machine; the host factor fitted to "
            "a validation's step grid is the better reading)")
