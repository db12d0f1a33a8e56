"""One GPU call: NVML-metered energy through the real engine; conservation and joules per output token.

Also integrates NVML's power reading on a 10 ms background sampler over the same span, as an
independent check of the energy counter the meter uses.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/energy_check.py [config] [out.json]
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time

import torch

from joule.llm_engine import LLMEngine
from joule.sampling_params import RequestOutputKind, SamplingParams


class PowerSampler(threading.Thread):
    """Trapezoid-integrates nvmlDeviceGetPowerUsage every ``period`` seconds until stopped."""

    def __init__(self, period: float = 0.01):
        super().__init__(daemon=True)
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle, self.period = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0), period
        self.joules, self.samples, self._stop_event = 0.0, 0, threading.Event()

    def run(self) -> None:
        last_time, last_watts = time.monotonic(), self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000
        while not self._stop_event.wait(self.period):
            now, watts = time.monotonic(), self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000
            self.joules += 0.5 * (watts + last_watts) * (now - last_time)
            last_time, last_watts, self.samples = now, watts, self.samples + 1

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return self.joules


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/configs/llama-3.2-1b"
    out_path = sys.argv[2] if len(sys.argv) > 2 else None
    engine = LLMEngine.from_kwargs(model=config, load_format="dummy", dtype="bfloat16", max_model_len=4096,
                                   max_num_batched_tokens=2048, kv_cache_memory_bytes=16 << 30)
    meter, ledger = engine.energy_meter, engine.energy_ledger
    print(torch.cuda.get_device_name(), "meter:", meter.name, meter.source, flush=True)
    warm = SamplingParams(max_tokens=8, ignore_eos=True)
    engine.add_request("warmup", {"prompt_token_ids": list(range(100, 400))}, warm)
    while engine.has_unfinished_requests():
        engine.step()

    rng = random.Random(0)
    pending = [(f"r{i}", [rng.randrange(100, 30000) for _ in range(rng.randint(16, 1500))], rng.randint(8, 200))
               for i in range(200)]
    before = ledger.totals()
    sampler = PowerSampler()
    sampler.start()
    started = time.monotonic()
    finals: dict[str, tuple[float, int, int]] = {}
    while pending or engine.has_unfinished_requests():
        if pending and rng.random() < 0.25:
            for _ in range(rng.randint(1, 8)):
                if pending:
                    request_id, prompt, max_tokens = pending.pop(0)
                    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                            output_kind=RequestOutputKind.FINAL_ONLY)
                    engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
        if not engine.has_unfinished_requests():
            time.sleep(0.2)  # a stretch with no request: its energy must come out unattributed
            continue
        for output in engine.step():
            finals[output.request_id] = (output.metrics.energy_joules, len(output.prompt_token_ids),
                                         len(output.outputs[0].token_ids))
    engine.step()  # close the books
    torch.cuda.synchronize()
    wall = time.monotonic() - started
    sampled_joules = sampler.stop()
    after = ledger.totals()
    metered = after.metered_joules - before.metered_joules
    attributed_requests = sum(joules for joules, _, _ in finals.values())
    unattributed = after.unattributed_joules - before.unattributed_joules
    output_tokens = sum(tokens for _, _, tokens in finals.values())
    per_token = sorted(joules / tokens for joules, _, tokens in finals.values())
    result = {
        "device": torch.cuda.get_device_name(), "meter": meter.name, "source": meter.source, "config": config,
        "requests": len(finals), "output_tokens": output_tokens, "wall_seconds": round(wall, 3),
        "metered_joules": round(metered, 3), "sum_of_request_joules": round(attributed_requests, 3),
        "unattributed_joules": round(unattributed, 3),
        "step_joules": round(after.step_joules - before.step_joules, 3),
        "idle_joules": round(after.idle_joules - before.idle_joules, 3),
        "conservation_error_percent": round(100 * (metered - attributed_requests - unattributed) / metered, 6),
        "joules_per_output_token": round(attributed_requests / output_tokens, 5),
        "joules_per_output_token_p50_p90": [round(per_token[len(per_token) // 2], 5),
                                             round(per_token[int(len(per_token) * 0.9)], 5)],
        "average_power_watts": round(metered / wall, 1),
        "power_sampled_joules_10ms": round(sampled_joules, 3), "power_samples": sampler.samples,
        "counter_vs_sampled_percent": round(100 * (metered - sampled_joules) / sampled_joules, 2),
    }
    print(json.dumps(result, indent=1))
    if out_path:
        with open(out_path, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
