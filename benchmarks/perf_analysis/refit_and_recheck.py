"""Refit shipped profiles from their saved calibration measurements and re-predict saved validation grids.

Offline, torch-free (numpy only) except for locating the default CPU model's config. The fit sees only the
calibration measurements; the validation grids (steps of compositions calibration never ran) are only
predicted. Prints the median absolute error of the shipped profile and of the refit one, overall, per kind
and per scenario.

    python benchmarks/perf_analysis/refit_and_recheck.py            # H200, H100, CPU
    python benchmarks/perf_analysis/refit_and_recheck.py --only H200 --steps   # every step of the grid
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from joule.model.config import ModelConfig  # noqa: E402
from joule.perf.calibrate import Measurements, fit_profile  # noqa: E402
from joule.perf.profile import DeviceProfile  # noqa: E402
from joule.perf.step_model import StepModel  # noqa: E402
from joule.perf.validate import checks_from_report, recheck, summarize_checks  # noqa: E402

LLAMA_1B = ROOT / "benchmarks/configs/llama-3.2-1b/config.json"
PROFILES = ROOT / "joule/perf/profiles"
CASES = {
    # name: (profile, calibration measurements, validation report, model config)
    "H200": (PROFILES / "h200-bfloat16.json", PROFILES / "h200-bfloat16.measurements.json",
             ROOT / "benchmarks/gpu/h200_2026-12-04d/h200-bfloat16.validation-seed11.json.gz", LLAMA_1B),
    "H100": (PROFILES / "h100-bfloat16.json", PROFILES / "h100-bfloat16.measurements.json",
             ROOT / "benchmarks/gpu/h100_calibration/session3/run6.validation.json.gz", LLAMA_1B),
    "CPU": (PROFILES / "cpu-2core-float32.json", PROFILES / "cpu-2core-float32.measurements.json",
            PROFILES / "cpu-2core-float32.validation.json.gz", None),
}


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def default_model_config() -> ModelConfig:
    from joule.model.loader import resolve_model_path  # imports torch: only for the CPU case

    return ModelConfig.from_file(resolve_model_path(None) / "config.json")


def summary_line(label: str, checks) -> str:
    summary = summarize_checks(checks, keep_steps=False)
    kinds = ", ".join(f"{kind} {row['median_abs_error']:.1%}" for kind, row in summary["by_kind"].items())
    return f"{label:<10} median |error| {summary['median_abs_error']:.1%} over {len(checks)} steps ({kinds})"


def run_case(name: str, show_steps: bool, sections: tuple[str, ...]) -> dict:
    profile_path, measurements_path, report_path, config_path = CASES[name]
    config = ModelConfig.from_file(config_path) if config_path else default_model_config()
    with _open(measurements_path) as handle:
        measured = Measurements.from_dict(json.load(handle))
    with _open(report_path) as handle:
        report = json.load(handle)
    shipped = DeviceProfile.load(profile_path)
    refit = fit_profile(config, measured)
    print(f"== {name}: fit on {len(measured.steps)} calibration steps ({measurements_path.name}), "
          f"checked on {report_path.name}")
    result = {}
    for section in sections:
        saved = report.get(section) if section == "steps" else (report.get(section) or {}).get("run_steps")
        checks = checks_from_report(saved or {})
        if not checks:
            continue
        before = recheck(checks, StepModel(config, shipped))
        after = recheck(checks, StepModel(config, refit))
        print(f" [{section}]")
        print("  " + summary_line("shipped", before))
        print("  " + summary_line("refit", after))
        result[section] = (summarize_checks(before, False)["median_abs_error"],
                           summarize_checks(after, False)["median_abs_error"])
        if section == "steps":
            by_before = summarize_checks(before, False)["by_scenario"]
            by_after = summarize_checks(after, False)["by_scenario"]
            for scenario, row in by_after.items():
                print(f"    {scenario:<28} measured {row['median_measured_s'] * 1e3:8.2f} ms  shipped "
                      f"{by_before[scenario]['median_error']:+6.1%}  refit {row['median_error']:+6.1%}")
        if show_steps and section == "steps":
            model = StepModel(config, refit)
            for check in after:
                cost = model.predict(check.shape)
                print(f"      {check.scenario:<26} n={check.num_sequences:3d} T={check.num_tokens:5d} "
                      f"measured {check.measured_s * 1e3:7.3f} "
                      f"predicted {check.predicted_s * 1e3:7.3f} ({check.error:+.1%}) host "
                      f"{cost.overhead_seconds * 1e3:.3f} fin={check.shape.num_finished} idle={int(check.shape.after_idle)} eager={int(model.is_eager_chunk_step(check.shape))}")
    if show_steps:
        print("  refit profile:", json.dumps({k: v for k, v in refit.to_dict().items()
                                                if k not in ("gemm_curve", "lm_head_curve")}, indent=None))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated cases (H200, H100, CPU)")
    parser.add_argument("--steps", action="store_true", help="print every step of the validation grid")
    parser.add_argument("--runs", action="store_true", help="also the offline/serving runs' steps")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CASES)
    sections = ("steps", "offline", "serving") if args.runs else ("steps",)
    for name in names:
        run_case(name, args.steps, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
