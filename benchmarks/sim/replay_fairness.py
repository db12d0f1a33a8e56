"""A fairness probe's server log (`benchmarks/gpu/fairness_probe.py` writes OUT/requests.jsonl.gz) replayed in the
simulator under the current scheduler: the light tenant's TTFT while the heavy tenant floods, against its solo run.

Usage: PYTHONPATH=. python benchmarks/sim/replay_fairness.py PROBE_DIR [HARDWARE (H100)] [joule simulate flags ...]
e.g. benchmarks/gpu/h100_2026-12-05/fair_67 H100 --no-fair-keep-up. Same arrivals, lengths, tenants and prefix-cache
hits as the measured run, fair policy, token budget 2048 (the probe's), the shipped profile of HARDWARE.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from joule.perf.cli import main as perf_main


def main() -> None:
    probe = Path(sys.argv[1])
    hardware = sys.argv[2] if len(sys.argv) > 2 else "H100"
    extra = sys.argv[3:]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "replay.json"
        perf_main(["simulate", "--model", "benchmarks/configs/llama-3.2-1b", "--hardware", hardware, "--dtype",
                   "bfloat16", "--scheduling-policy", "fair", "--max-num-batched-tokens", "2048", "--max-model-len",
                   "4096", "--replay-log", str(probe / "requests.jsonl.gz"), "--per-request", "--output-json",
                   str(out), *extra])
        simulated = json.loads(out.read_text())[0]["requests"]
    logged = [json.loads(line) for line in gzip.open(probe / "requests.jsonl.gz")]
    start = min(request["arrival"] for request in logged)
    flood_start = min(request["arrival"] for request in logged if request["tenant"] == "heavy") - start
    light = [request for request in simulated if request["tenant"] == "light"]
    solo = np.array([request["ttft_s"] for request in light if request["arrival_s"] < flood_start]) * 1e3
    flooded = [request for request in light if request["arrival_s"] >= flood_start]
    ttft = np.array([request["ttft_s"] for request in flooded]) * 1e3
    heavy = [request for request in simulated if request["tenant"] == "heavy"]
    finished = max(request["arrival_s"] + request["e2el_s"] for request in heavy)
    heavy_tokens = sum(request["output_tokens"] for request in heavy) / (finished - flood_start)
    print(f"\nlight tenant, simulated: solo p99 {np.percentile(solo, 99):.1f} ms; flooded ({len(ttft)} requests) p50 "
          f"{np.percentile(ttft, 50):.1f} / p99 {np.percentile(ttft, 99):.1f} ms = "
          f"{np.percentile(ttft, 99) / np.percentile(solo, 99):.2f}x solo; heavy TTFT p50 "
          f"{np.median([request['ttft_s'] for request in heavy]):.2f} s, {heavy_tokens:.0f} output tok/s")
    worst = sorted(flooded, key=lambda request: -request["ttft_s"])[:5]
    print("slowest light requests (s after the flood began, TTFT ms):",
          ", ".join(f"{request['arrival_s'] - flood_start:.2f}: {1e3 * request['ttft_s']:.1f}" for request in worst))


if __name__ == "__main__":
    main()
