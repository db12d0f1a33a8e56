"""Batch-1 decode A/B of environment switches, alternating, in fresh processes: `joule bench latency` per variant.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/bs1_ab.py $OUT [rounds] [--w2|--w3] [VAR=a,b ...]
Default: JOULE_GEMV_L2_PREFETCH=0,1 over 2 rounds (Llama-3.2-1B shape, bf16, dummy weights, 128 -> 256).
``--w3``: workload 3 instead (`joule bench throughput`, 256 x (512 -> 128), output tok/s; the engine alone);
``--w2``: workload 2 (Qwen3-0.6B, 256 x uniform [100, 1024] in and out). ``--sampled``: batch 1 at temperature
0.8, seeded. A throughput run is the median of
``WARM_RUNS`` runs on one warm engine (`--repeat`): cold single runs moved up to ~25 % (2026-12-06 (j)). Each
variant's runs are interleaved with the others', so a machine that drifts (host speed varied ~2x between calls in
docs/benchmarks.md (f)) moves all of them alike; the table gives each variant's best and median tok/s.
``JOULE_TREE=.,DIR``: a code A/B instead of a switch: the variant runs from source tree DIR (holding ``joule/`` and
``benchmarks/configs/``, e.g. ``git archive OLD joule benchmarks/configs | tar -x -C DIR``), "." this checkout.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

COMMAND = [sys.executable, "-m", "joule.cli", "bench", "latency", "--model", "benchmarks/configs/llama-3.2-1b",
           "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096", "--input-len", "128",
           "--output-len", "256", "--batch-size", "1", "--num-iters", "3"]
WORKLOAD_THREE = [sys.executable, "-m", "joule.cli", "bench", "throughput", "--model", "benchmarks/configs/llama-3.2-1b",
                  "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096", "--num-prompts", "256",
                  "--input-len", "512", "--output-len", "128"]
WORKLOAD_TWO = [sys.executable, "-m", "joule.cli", "bench", "throughput", "--model", "benchmarks/configs/qwen3-0.6b",
                "--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", "4096", "--num-prompts", "256",
                "--input-len", "uniform:100:1024", "--output-len", "uniform:100:1024"]
WARM_RUNS = 3
TREE = "JOULE_TREE"  # not an environment variable: the source tree a variant runs from
THROUGHPUT = {"--w2": ("w2", [*WORKLOAD_TWO, "--repeat", str(WARM_RUNS)]),
              "--w3": ("w3", [*WORKLOAD_THREE, "--repeat", str(WARM_RUNS)])}
SAMPLED = "--sampled"  # batch 1 at temperature 0.8 (seeded), as engine_bench.py's "T=0.8" rows


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    workload = next((THROUGHPUT[flag] for flag in sys.argv[3:] if flag in THROUGHPUT), None)
    prefix, command = workload or (("latency_t08", [*COMMAND, "--temperature", "0.8"]) if SAMPLED in sys.argv[3:]
                                   else ("latency", COMMAND))
    switches = ([argument.split("=", 1) for argument in sys.argv[3:] if argument not in THROUGHPUT
                 and argument != SAMPLED]
                or [["JOULE_GEMV_L2_PREFETCH", "0,1"]])
    names = [name for name, _ in switches]
    variants = list(itertools.product(*(values.split(",") for _, values in switches)))
    results: dict[tuple, list[float]] = {variant: [] for variant in variants}
    for round_index in range(rounds):
        for variant in variants:
            label = ",".join(f"{name}={value}" for name, value in zip(names, variant))
            file_label = label.replace(",", "_").replace("=", "-").replace("+", "_").replace("/", "_")  # device names
            path = (out / f"{prefix}-{file_label}-{round_index}.json").resolve()
            env = {**os.environ, **dict(zip(names, variant))}
            tree = env.pop(TREE, ".")
            if tree != ".":  # `python -m` puts the working directory first on the path: run from the tree
                env["PYTHONPATH"] = os.path.abspath(tree)
            completed = subprocess.run([*command, "--output-json", str(path)], env=env, capture_output=True, text=True,
                                       cwd=None if tree == "." else tree)
            if completed.returncode != 0:
                print(label, "failed:", completed.stderr[-2000:], flush=True)
                continue
            with open(path) as handle:
                result = json.load(handle)
            if workload is not None:
                runs = result["results"][0].get("all_output_tok_per_s") or [result["results"][0]["output_tok_per_s"]]
                results[variant].append(statistics.median(runs))
                print(f"round {round_index}: {label}: {results[variant][-1]:.1f} output tok/s (median of "
                      + ", ".join(f"{run:.0f}" for run in runs) + ")", flush=True)
                continue
            results[variant].append(result["decode_tok_per_s"])
            print(f"round {round_index}: {label}: {result['decode_tok_per_s']:.1f} tok/s, "
                  f"{100 * result['roofline_fraction']:.1f} % of roofline", flush=True)
    print(f"\n{'variant':<40} {'runs':>5} {'best tok/s':>11} {'median':>8}")
    for variant, values in results.items():
        label = ",".join(f"{name}={value}" for name, value in zip(names, variant))
        if values:
            print(f"{label:<40} {len(values):>5} {max(values):>11.1f} {statistics.median(values):>8.1f}")


if __name__ == "__main__":
    main()
