"""`joule perf validate`: a profile against the real engine (a step grid, an offline and a serving run), or against
a saved validation's measurements with ``--recheck`` (no engine)."""

from __future__ import annotations

import argparse
from pathlib import Path

from joule.model.config import ModelConfig
from joule.perf.json_files import write_json


def run_validate(args: argparse.Namespace) -> int:
    from joule.perf.host_probe import describe as describe_probe
    from joule.perf.host_probe import host_probe_seconds
    from joule.perf.measure import build_engine
    from joule.perf.profile import DeviceProfile
    from joule.perf.resimulate import offline_requests, serving_requests
    from joule.perf.validate import compare_run, random_validation_grid, summarize_checks, validate_steps

    profile = DeviceProfile.load(args.profile).with_host_scale(getattr(args, "host_scale", 1.0))
    if args.recheck:
        return _recheck(args, profile)
    engine = build_engine(args.model, args.dtype, args.load_format, args.device)
    report: dict = {"profile": args.profile, "host_probe_s": host_probe_seconds()}
    print(describe_probe(report["host_probe_s"], profile.host_probe_s))
    if not args.skip_steps:
        scenarios = None
        if args.grid_seed is not None:
            scenarios = random_validation_grid(args.grid_seed, engine.device.type == "cuda")
            report["grid_seed"] = args.grid_seed
            print("step grid (seed %d): %s" % (args.grid_seed, "; ".join(scenario.name for scenario in scenarios)))
        checks = validate_steps(engine, profile, scenarios, repeats=args.repeats)
        report["steps"] = summarize_checks(checks)
        print(f"step latency: median |error| {report['steps']['median_abs_error']:.1%} over {len(checks)} steps")
        for name, row in report["steps"]["by_scenario"].items():
            print(f"  {name:<26} measured {row['median_measured_s'] * 1e3:8.1f} ms  predicted "
                  f"{row['median_predicted_s'] * 1e3:8.1f} ms  error {row['median_error']:+.1%}")
        report["steps"]["host_scale"] = _print_host_scale(checks, engine.model_config, profile)
    offline = "32,128,64" if args.offline is None else args.offline
    if offline:
        requests = offline_requests(offline, engine.model_config.vocab_size)
        # As LLM.generate asks: one output per request, at its end (the serving run below streams).
        report["offline"] = compare_run(engine, profile, requests, args.repeats,
                                        decode_lookahead=args.decode_lookahead, streamed=False)
        report["offline"]["workload"] = {"kind": "offline", "spec": offline}
        _print_comparison(f"offline {len(requests)} requests ({offline}), FINAL_ONLY outputs", report["offline"])
    if args.serving:
        requests = serving_requests(args.serving, engine.model_config.vocab_size, engine.max_model_len)
        report["serving"] = compare_run(engine, profile, requests, args.repeats,
                                        decode_lookahead=args.decode_lookahead)
        report["serving"]["workload"] = {"kind": "serving", "spec": args.serving}
        _print_comparison(f"serving {args.serving}, DELTA outputs", report["serving"])
    if args.output_json:
        write_json(args.output_json, report)
    if args.plot:
        from joule.perf.validate import checks_from_report

        step_checks = {"steps": checks_from_report(report["steps"]) if "steps" in report else []}
        for name in ("offline", "serving"):
            step_checks[name] = checks_from_report(report.get(name, {}).get("run_steps") or {})
        _plot(args, step_checks, {name: report.get(name) for name in ("offline", "serving")})
    return 0


def _recheck(args: argparse.Namespace, profile) -> int:
    """Saved measured steps against another profile's predictions (e.g. after a --refit), and the saved offline and
    serving runs simulated again with it."""
    from joule.model.loader import resolve_model_path
    from joule.perf.json_files import read_json
    from joule.perf.host_probe import describe as describe_probe
    from joule.perf.resimulate import resimulate
    from joule.perf.step_model import StepModel
    from joule.perf.validate import checks_from_report, recheck, summarize_checks

    report = read_json(args.recheck)
    model_config = ModelConfig.from_file(resolve_model_path(args.model) / "config.json")
    model = StepModel(model_config, profile)
    rechecked: dict = {"profile": args.profile, "recheck_of": args.recheck}
    if report.get("host_probe_s"):  # the host the saved runs were measured on, against the profile's
        print("measured on a host with a " + describe_probe(report["host_probe_s"], profile.host_probe_s))
    step_checks, runs = {}, {}
    for name in ("steps", "offline", "serving"):
        section = report.get(name)
        steps = section if name == "steps" else (section or {}).get("run_steps")
        checks = step_checks[name] = recheck(checks_from_report(steps or {}), model)
        if checks:
            summary = summarize_checks(checks, keep_steps=False)
            print(f"{name}: median |error| {summary['median_abs_error']:.1%} over {len(checks)} steps "
                  f"[{_by_kind(summary)}]")
            rechecked[name] = {"steps": summary}
            if name == "steps":
                summary["host_scale"] = _print_host_scale(checks, model_config, profile)
        if name != "steps" and section:
            comparison = resimulate(section, name, model_config, profile, getattr(args, name))
            guessed = f" (inferred: {', '.join(comparison['inferred'])})" if comparison["inferred"] else ""
            _print_comparison(f"{name} {comparison['workload']['spec']}, simulated again{guessed}", comparison)
            rechecked[name] = rechecked.get(name, {}) | {"run": comparison}
            runs[name] = comparison
    if args.output_json:
        write_json(args.output_json, rechecked)
    if args.plot:
        _plot(args, step_checks, runs)
    return 0


def _print_host_scale(checks, model_config: ModelConfig, profile) -> dict:
    """The factor on the profile's host terms that fits these steps (this host against the calibration's)."""
    from joule.perf.host_scale import fit_host_scale

    fit = fit_host_scale(checks, model_config, profile)
    print("  " + fit.describe())
    return {"scale": fit.scale, "median_abs_error": fit.median_abs_error,
            "unscaled_median_abs_error": fit.unscaled_median_abs_error}


def _plot(args: argparse.Namespace, step_checks: dict, runs: dict) -> None:
    from joule.perf.validation_plots import plot_validation

    title = f"{Path(args.profile).name} against {Path(args.recheck).name if args.recheck else 'this machine'}"
    print(f"plot: {plot_validation(step_checks, runs, args.plot, title)}")


def _print_comparison(title: str, comparison: dict) -> None:
    print(title)
    for key in ("output_throughput", "ttft_s_p50", "tpot_s_p50", "energy_j"):
        if key not in comparison:  # energy only where a hardware meter measured the runs
            continue
        row = comparison[key]
        print(f"  {key:<18} measured {row['measured']:10.4g}  simulated {row['simulated']:10.4g}  "
              f"error {row['error']:+.1%}")
    runs = comparison.get("runs", [])
    if runs:
        print("  runs (used ones starred): " + ", ".join(
            f"{'*' if run['used'] else ''}{run['output_throughput']:.1f} tok/s, TPOT {run['tpot_s_p50'] * 1e3:.1f} ms, "
            f"copy {run.get('host_copy_gbps_before', float('nan')):.1f} GB/s" for run in runs))
    steps = comparison.get("run_steps")
    if steps:
        print(f"  steps of the measured run: median |error| {steps['median_abs_error']:.1%} [{_by_kind(steps)}]; "
              f"total measured {steps['measured_total_s']:.2f} s vs predicted {steps['predicted_total_s']:.2f} s")


def _by_kind(summary: dict) -> str:
    """``summarize_checks``' per-kind errors on one line: "prefill 6.7% (9), decode 5.8% (44), ..."."""
    return ", ".join(f"{kind} {row['median_abs_error']:.1%} ({row['steps']})" for kind, row in summary["by_kind"].items())
