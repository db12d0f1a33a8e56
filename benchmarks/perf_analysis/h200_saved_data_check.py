"""How a profile predicts the H200's saved measurements: calibration steps, validation steps and runs, and the
engine_bench workloads simulated against their measured throughput. No GPU: everything read from the repo.

Usage: PYTHONPATH=. python benchmarks/perf_analysis/h200_saved_data_check.py [PROFILE ...]
(default: the shipped joule/perf/profiles/h200-bfloat16.json)
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys

from joule.perf.arrivals import WorkloadSpec, generate
from joule.perf.calibrate import Measurements
from joule.perf.cli import load_model_config
from joule.perf.profile import DeviceProfile
from joule.perf.simulator import ClusterSimulator, ReplicaConfig
from joule.perf.step_model import StepModel
from joule.perf.validate import checks_from_report, recheck

MEASUREMENTS = "joule/perf/profiles/h200-bfloat16.measurements.json"
VALIDATIONS = ["benchmarks/gpu/h200_2026-12-04f/h200-bfloat16.validation-seed17.json.gz",
               "benchmarks/gpu/h200_2026-12-04f/h200-bfloat16.validation-seed19.json.gz"]
# engine_bench.py, H200, docs/benchmarks.md (f): measured output tok/s ranges over calls (lookahead decode-only).
MEASURED_RUNS = {"workload 3, 256 x (512 -> 128), Llama-3.2-1B": (31465, 34331),
                 "workload 2, 256 x U[100, 1024], Qwen3-0.6B": (24404, 25464)}


def median_error(model: StepModel, samples) -> float:
    return statistics.median(abs(model.predict(s.shape).elapsed_seconds / s.seconds - 1) for s in samples)


def main() -> None:
    paths = sys.argv[1:] or ["joule/perf/profiles/h200-bfloat16.json"]
    llama = load_model_config("llama-3.2-1b")
    with open(MEASUREMENTS, encoding="utf-8") as handle:
        measured = Measurements.from_dict(json.load(handle))
    workloads = {
        "workload 3, 256 x (512 -> 128), Llama-3.2-1B": (
            llama, WorkloadSpec.parse("input=fixed:512,output=fixed:128,num=256")),
        "workload 2, 256 x U[100, 1024], Qwen3-0.6B": (
            load_model_config("qwen3-0.6b"), WorkloadSpec.parse("input=uniform:100:1024,output=uniform:100:1024,num=256")),
    }
    for path in paths:
        profile = DeviceProfile.load(path)
        model = StepModel(llama, profile)
        print(f"== {path}")
        print(f"  calibration steps ({len(measured.steps)}): median |error| {100 * median_error(model, measured.steps):.1f}%")
        for validation in VALIDATIONS:
            with gzip.open(validation, "rt", encoding="utf-8") as handle:
                report = json.load(handle)
            parts = []
            for section, runs in (("steps", False), ("offline", True), ("serving", True)):
                block = report[section] if section == "steps" else report[section]["run_steps"]
                checks = recheck(checks_from_report(block, runs), model)
                parts.append(f"{section} {100 * statistics.median(abs(c.error) for c in checks):.1f}%")
            print(f"  {validation.rsplit('/', 1)[1]}: " + ", ".join(parts))
        for name, (config, spec) in workloads.items():
            requests = generate(spec, config.vocab_size)
            # As engine_bench ran them: FINAL_ONLY outputs (LLM.generate's), the energy ledger off.
            replica = ReplicaConfig.for_hardware("H200", profile_path=path, max_num_batched_tokens=8192,
                                                 decode_lookahead=True, lookahead_prompts=False, metered=False)
            simulated = ClusterSimulator(config, [replica], streamed_outputs=False).run(requests).summary()[
                "output_throughput"]
            low, high = MEASURED_RUNS[name]
            print(f"  {name}: simulated {simulated:,.0f} tok/s, measured {low:,}-{high:,} "
                  f"({100 * (simulated / ((low + high) / 2) - 1):+.1f}% vs their middle)")


if __name__ == "__main__":
    main()
