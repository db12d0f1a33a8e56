"""Does queuing prompt-chunk steps ahead (``SchedulerConfig.lookahead_prompts``) pay? Alternated rounds, one engine.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/lookahead_prompts_ab.py [rounds]
(It replaced w3_lookahead_ab.py, whose rounds always ran decode-only first, while runs still sped up round by round.)
Workload 3 (Llama-3.2-1B, 256 x (512 -> 128)) and workload 2 (Qwen3-0.6B, 256 requests, uniform [100, 1024]),
bf16, dummy weights, decode lookahead on; rounds alternate off-on and on-off (ABBA), so a machine that drifts or
warms up moves both alike.
"""

from __future__ import annotations

import statistics
import sys

sys.path.insert(0, "benchmarks/gpu")
from engine_bench import LLAMA_1B, QWEN3_06B, build, release, throughput  # noqa: E402

from joule.bench.workload import fixed_length_workload, uniform_length_workload  # noqa: E402


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    table = []
    for label, model, make in (("workload 3", LLAMA_1B, lambda vocab: fixed_length_workload(256, 512, 128, vocab, seed=2)),
                               ("workload 2", QWEN3_06B, lambda vocab: uniform_length_workload(256, 100, 1024, vocab,
                                                                                                seed=0))):
        engine, graphs, _ = build(model, dtype="bfloat16", max_model_len=4096)
        requests = make(engine.model_config.vocab_size)
        results = {False: [], True: []}
        for round_index in range(rounds):
            for prompts in ((False, True) if round_index % 2 == 0 else (True, False)):
                engine.core.scheduler.config.lookahead_prompts = prompts
                value = throughput(engine, requests)["output_tok_per_s"]
                results[prompts].append(value)
                print(f"{label} round {round_index} lookahead_prompts={prompts}: {value:.0f} tok/s", flush=True)
        table.append((label, results))
        engine = None
        release()
    print(f"\n{'workload':<12} {'lookahead_prompts':>18} {'runs':>5} {'median tok/s':>13} {'best':>8}")
    for label, results in table:
        for prompts, values in results.items():
            print(f"{label:<12} {str(prompts):>18} {len(values):>5} {statistics.median(values):>13.0f} {max(values):>8.0f}")


if __name__ == "__main__":
    main()
