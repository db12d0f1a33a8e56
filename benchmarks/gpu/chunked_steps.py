"""Why does the chunked schedule lose goodput to prefill-first? Step times under open-loop load, in process.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/chunked_steps.py [seconds_per_config]
One Llama-3.2-1B engine (dummy bf16 weights); for each schedule a fresh Scheduler over the same cache,
requests arriving as a Poisson process (prompts uniform 1024-3072, outputs 64-192, as serve_goodput.py),
every step timed. Prints per schedule: TTFT/TPOT p50/p90, and the time of mixed vs decode-only steps.
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import torch

from joule.engine.request import RequestSLO
from joule.engine.scheduler import Scheduler
from joule.engine.scheduler_config import SchedulerConfig
from joule.llm_engine import LLMEngine
from joule.sampling_params import RequestOutputKind, SamplingParams

PROMPT_RANGE = (1024, 3072)
LLAMA_1B = "benchmarks/configs/llama-3.2-1b"
GOODPUT_SLOS = [(0.5, 0.003), (0.5, 0.004), (0.5, 0.006)]  # (TTFT, TPOT) seconds: a request counts if it meets both


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(fraction * len(values)))] if values else float("nan")


def run(engine: LLMEngine, config: SchedulerConfig, rate: float, seconds: float, slo: RequestSLO | None, seed: int):
    engine.core.scheduler = Scheduler(config, engine.block_manager)
    engine.block_manager.reset_prefix_cache()
    rng = random.Random(seed)
    arrivals, clock = [], 0.0
    while clock < seconds:
        clock += rng.expovariate(rate)
        prompt = [rng.randrange(100, 30000) for _ in range(rng.randint(*PROMPT_RANGE))]
        arrivals.append((clock, prompt, rng.randint(64, 192)))
    executor = engine.core.executor
    original = executor.execute
    steps = []

    def timed(plan):
        decodes = sum(1 for sequence in plan.sequences if sequence.num_tokens == 1)
        started = time.perf_counter()
        result = original(plan)
        steps.append((decodes, plan.num_tokens - decodes, time.perf_counter() - started))
        return result

    executor.execute = timed
    first_token, finish, arrival_of, lengths = {}, {}, {}, {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    index = 0
    while index < len(arrivals) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while index < len(arrivals) and arrivals[index][0] <= now:
            at, prompt, output_len = arrivals[index]
            request_id = f"{seed}-{index}"
            params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                                    output_kind=RequestOutputKind.DELTA)
            engine.add_request(request_id, {"prompt_token_ids": prompt}, params, arrival_time=time.time(), slo=slo)
            arrival_of[request_id], lengths[request_id] = start + at, output_len
            index += 1
        if not engine.has_unfinished_requests():
            time.sleep(0.0005)
            continue
        for output in engine.step():
            stamp = time.perf_counter()
            if output.request_id not in first_token and output.outputs and output.outputs[0].token_ids:
                first_token[output.request_id] = stamp
            if output.finished:
                finish[output.request_id] = stamp
    executor.execute = original
    ttft = [first_token[r] - arrival_of[r] for r in finish]
    tpot = [(finish[r] - first_token[r]) / (lengths[r] - 1) for r in finish if lengths[r] > 1]
    mixed = [s[2] for s in steps if s[1] > 0 and s[0] > 0]
    prefill_only = [s[2] for s in steps if s[1] > 0 and s[0] == 0]
    decode_only = [s[2] for s in steps if s[1] == 0]
    mixed_tokens = [s[1] for s in steps if s[1] > 0 and s[0] > 0]
    goodput = {}
    for ttft_slo, tpot_slo in GOODPUT_SLOS:
        met = sum(1 for r in finish if first_token[r] - arrival_of[r] <= ttft_slo
                  and (lengths[r] <= 1 or (finish[r] - first_token[r]) / (lengths[r] - 1) <= tpot_slo))
        goodput[(ttft_slo, tpot_slo)] = met / seconds
    return {
        "goodput": goodput,
        "requests": len(finish), "ttft_p50": percentile(ttft, 0.5), "ttft_p90": percentile(ttft, 0.9),
        "tpot_p50": percentile(tpot, 0.5), "tpot_p90": percentile(tpot, 0.9),
        "mixed": (len(mixed), percentile(mixed, 0.5), statistics.mean(mixed_tokens) if mixed_tokens else 0),
        "prefill_only": (len(prefill_only), percentile(prefill_only, 0.5)),
        "decode_only": (len(decode_only), percentile(decode_only, 0.5)),
        "wall": time.perf_counter() - start,
    }


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 6.0
    model = sys.argv[2] if len(sys.argv) > 2 else LLAMA_1B  # a tiny config checks the script on a CPU
    engine = LLMEngine.from_kwargs(model=model, load_format="dummy", dtype="bfloat16" if torch.cuda.is_available()
                                   else "float32", max_model_len=4096,
                                   decode_lookahead=False)  # steps timed one by one
    engine.core.step_observer = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(device, "KV tokens", engine.kv_capacity_tokens, flush=True)
    base = dict(max_num_seqs=256, max_model_len=engine.max_model_len)
    tight = RequestSLO(ttft_seconds=1.0, tpot_seconds=0.010)
    configs = [
        ("prefill-first 8192", SchedulerConfig(max_num_batched_tokens=8192, enable_chunked_prefill=False, **base), None),
        ("chunked 8192", SchedulerConfig(max_num_batched_tokens=8192, **base), None),
        ("chunked 2048", SchedulerConfig(max_num_batched_tokens=2048, **base), None),
        ("chunked 512", SchedulerConfig(max_num_batched_tokens=512, **base), None),
        ("deadline 8192, tpot 10 ms", SchedulerConfig(max_num_batched_tokens=8192, policy="deadline", **base), tight),
    ]
    rates = [float(rate) for rate in sys.argv[3].split(",")] if len(sys.argv) > 3 else [8.0, 24.0]
    wanted = sys.argv[4].split(",") if len(sys.argv) > 4 else None  # label prefixes to run
    if wanted:
        configs = [entry for entry in configs if any(entry[0].startswith(prefix) for prefix in wanted)]
    run(engine, configs[0][1], 8.0, 2.0, None, seed=99)  # warm-up: compiles mixed-step kernel variants
    for rate in rates:
        for label, config, slo in configs:
            result = run(engine, config, rate, seconds, slo, seed=int(rate))
            mixed, prefill_only, decode_only = result["mixed"], result["prefill_only"], result["decode_only"]
            print(f"rate {rate:4.0f} {label:28s} n={result['requests']:4d} "
                  f"TTFT p50/p90 {1e3 * result['ttft_p50']:7.1f}/{1e3 * result['ttft_p90']:7.1f} ms  "
                  f"TPOT p50/p90 {1e3 * result['tpot_p50']:6.2f}/{1e3 * result['tpot_p90']:6.2f} ms  "
                  f"mixed {mixed[0]:4d} x {1e3 * mixed[1]:6.2f} ms ({mixed[2]:5.0f} prompt tok)  "
                  f"prefill-only {prefill_only[0]:4d} x {1e3 * prefill_only[1]:6.2f} ms  "
                  f"decode {decode_only[0]:5d} x {1e3 * decode_only[1]:5.2f} ms  goodput " + " ".join(
                      f"tpot<={1e3 * tpot:.0f}ms:{value:.1f}" for (_, tpot), value in result["goodput"].items()),
                  flush=True)


if __name__ == "__main__":
    main()
