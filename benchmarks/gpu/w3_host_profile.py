"""Workload 3's host side under cProfile on the GPU machine: which Python work a decode step of 256 rows pays.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/w3_host_profile.py [out.txt]
Why: decode steps of workload 3 took 4.3-4.5 ms in some runs and 3.3 ms in others on the H100 (2026-12-05 (d),
w3_runs_probe.py after-bs1) with the GPU drawing less power in the slow ones: the host, not the GPU, sets the
step there. Builds the engine as engine_bench.py does (NVML metering off, as its workload-3 runs), runs workload 3
twice plain and once under cProfile (which slows the host: read the shares, not the times).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys

sys.path.insert(0, "benchmarks/gpu")
from engine_bench import LLAMA_1B, build, generate  # noqa: E402

from joule.bench.workload import fixed_length_workload  # noqa: E402


def warmed_workload_three(plain_runs: int = 2):
    """The engine as engine_bench.py builds it (metering off, as its workload-3 runs) and workload 3's prompts and
    output lengths, after a warm-up and ``plain_runs`` plain runs (printed)."""
    engine, _, _ = build(LLAMA_1B, dtype="bfloat16", max_model_len=4096)
    engine.core.step_observer = None
    requests = fixed_length_workload(256, 512, 128, engine.model_config.vocab_size, seed=2)
    prompts, lengths = [r.prompt_token_ids for r in requests], [r.output_len for r in requests]
    generate(engine, [prompts[0][:32]] * 4, [4] * 4)
    for _ in range(plain_runs):
        print(f"plain run: {sum(lengths) / generate(engine, prompts, lengths)[1]:.0f} tok/s", flush=True)
    return engine, prompts, lengths


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else "w3_host_profile.txt"
    engine, prompts, lengths = warmed_workload_three()
    profiler = cProfile.Profile()
    profiler.enable()
    _, seconds = generate(engine, prompts, lengths)
    profiler.disable()
    print(f"profiled run: {sum(lengths) / seconds:.0f} tok/s", flush=True)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(45)
    with open(out_path, "w") as file:
        file.write(text.getvalue())
    print(text.getvalue()[:6000])


if __name__ == "__main__":
    main()
