"""Re-simulate a saved CPU validation's offline and serving runs with other profiles (no measuring): the same
requests and engine settings as `joule perf validate`, the measured metrics read from the saved JSON.

Usage: PYTHONPATH=. python benchmarks/perf_analysis/cpu_resimulate.py VALIDATION.json.gz PROFILE [PROFILE ...]
(the validation's runs: --offline 32,128,64 --serving "input=fixed:128,output=fixed:32,rate=1.5,num=30,seed=2")
"""

from __future__ import annotations

import gzip
import json
import sys

from joule.bench.workload import fixed_length_workload
from joule.perf.arrivals import TimedRequest, WorkloadSpec, generate
from joule.perf.measure import build_engine
from joule.perf.profile import DeviceProfile
from joule.perf.validate import simulate_like_engine

SERVING = "input=fixed:128,output=fixed:32,rate=1.5,num=30,seed=2"


def main() -> None:
    with gzip.open(sys.argv[1], "rt", encoding="utf-8") as handle:
        report = json.load(handle)
    engine = build_engine(None, "float32", "auto")
    vocab = engine.model_config.vocab_size
    offline = [TimedRequest(f"offline-{i}", 0.0, request)
               for i, request in enumerate(fixed_length_workload(32, 128, 64, vocab, seed=0))]
    serving = generate(WorkloadSpec.parse(SERVING), vocab, engine.max_model_len)
    for path in sys.argv[2:]:
        profile = DeviceProfile.load(path)
        print(f"== {path}")
        for name, requests in (("offline", offline), ("serving", serving)):
            # As validated since 2026-12-05: the offline run takes FINAL_ONLY outputs, the serving run streams.
            simulated = simulate_like_engine(engine, profile, requests, streamed=name == "serving")
            errors = []
            for metric in ("output_throughput", "ttft_s_p50", "tpot_s_p50"):
                measured = report[name][metric]["measured"]
                value = simulated[metric] if metric == "output_throughput" else simulated[metric.rsplit("_p50", 1)[0]]["p50"]
                errors.append(f"{metric} {100 * (value / measured - 1):+.1f}%")
            print(f"  {name}: " + ", ".join(errors))


if __name__ == "__main__":
    main()
