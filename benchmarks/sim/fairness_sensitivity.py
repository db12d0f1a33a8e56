"""How much the simulated fairness numbers move when every step time moves a few percent.

Usage: PYTHONPATH=. python benchmarks/sim/fairness_sensitivity.py [PROFILE_JSON] [RATES] [FACTORS]
(defaults: the shipped H200 profile, 20,40 heavy req/s, 0.95,1.0,1.05). Each factor scales the profile's
efficiency scales and per-step overheads; the workload, budget (2,048) and cap (128) are benchmarks/sim/fairness.py's.
Prints, per rate and factor, fcfs, fair keeping up, and fair with the fixed cap: the light tenant's TTFT p99 / p50 and
the heavy tenant's TTFT p50 and output tokens per second.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scaled_profile(profile: dict, factor: float) -> dict:
    scaled = dict(profile, scales={name: value * factor for name, value in profile["scales"].items()})
    for key, value in profile.items():
        if key.endswith("overhead_s") and isinstance(value, (int, float)):
            scaled[key] = value * factor
    return scaled


def main() -> None:
    profile_path = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else "joule/perf/profiles/h200-bfloat16.json"
    rates = [float(rate) for rate in (sys.argv[2] if len(sys.argv) > 2 else "20,40").split(",")]
    factors = [float(factor) for factor in (sys.argv[3] if len(sys.argv) > 3 else "0.95,1.0,1.05").split(",")]
    spec = importlib.util.spec_from_file_location("fairness", HERE / "fairness.py")
    fairness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fairness)
    base = json.loads(Path(profile_path).read_text())
    with tempfile.TemporaryDirectory() as directory:
        for rate in rates:
            for factor in factors:
                path = Path(directory) / f"x{factor}.json"
                path.write_text(json.dumps(scaled_profile(base, factor)))
                for label, policy, keep_up in (("fcfs", "fcfs", False), ("fair keep-up", "fair", True),
                                               ("fair fixed cap", "fair", False)):
                    p99, p50, _, heavy_p50, heavy_tokens = fairness.light_ttft(policy, rate, 2048, str(path), 128,
                                                                               keep_up)
                    print(f"{rate:5.1f} req/s, step times x{factor:.2f}, {label:14s}: light TTFT p99 {1e3 * p99:6.1f} "
                          f"/ p50 {1e3 * p50:5.1f} ms; heavy TTFT p50 {1e3 * heavy_p50:7.1f} ms, "
                          f"{heavy_tokens:6.0f} output tok/s", flush=True)


if __name__ == "__main__":
    main()
