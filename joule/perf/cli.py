"""Commands `joule simulate`, `joule plan` and `joule perf calibrate|validate`.

``joule/cli.py`` wires them in with ``add_perf_commands(subparsers)`` and
dispatches to ``run_perf_command(args)`` (each parser sets ``perf_handler``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from joule.model.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"


def load_model_config(text: str) -> ModelConfig:
    """A config.json path, a directory holding one, or a name from benchmarks/configs (e.g. llama-3.2-1b)."""
    path = Path(text)
    if path.exists():
        return ModelConfig.from_file(path)
    named = CONFIG_DIR / text.lower()
    if (named / "config.json").is_file():
        return ModelConfig.from_file(named)
    known = ", ".join(sorted(p.parent.name for p in CONFIG_DIR.glob("*/config.json"))) or "none"
    raise ValueError(f"model config {text!r} not found: give a config.json path or directory, or one of: {known}")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def csv_items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="config.json, a directory with one, or a benchmarks/configs name")
    parser.add_argument("--workload", default="sharegpt,rate=10,num=300",
                        help="preset and/or keys: sharegpt|fixed|uniform, rate=REQ_PER_S|inf, num=N, "
                             "arrival=poisson|gamma|fixed, cv=X, input=DIST, output=DIST, seed=S "
                             "(DIST: fixed:N, uniform:LO:HI, lognormal:MEDIAN:SIGMA[:MAX])")
    parser.add_argument("--slo", default=None,
                        help="ttft=SECONDS,tpot=SECONDS[,tbt=SECONDS][,attainment=0.9] ('ms' suffix ok; tbt: a "
                             "request's largest gap between tokens)")
    parser.add_argument("--price", default=None, help="hourly price overrides, e.g. H100=2.1,L4=0.55")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--output-json", default=None)


def add_perf_commands(subparsers) -> None:
    """Register `simulate`, `plan` and `perf` on the top-level `joule` subparsers."""
    simulate = subparsers.add_parser("simulate", help="simulate serving a workload on modelled hardware")
    _add_workload_arguments(simulate)
    simulate.add_argument("--hardware", default="H100",
                          help="a catalog kind, or a mix like H100=2,L4=4 (counts per kind)")
    simulate.add_argument("--replicas", type=int, default=1, help="data-parallel replicas (single kind)")
    simulate.add_argument("--profile", default=None, help="DeviceProfile JSON (default: shipped or catalog)")
    simulate.add_argument("--dtype", default=None)
    simulate.add_argument("--host-scale", type=_positive_float, default=1.0,
                          help="the profile's host terms times this: a host this many times as slow as the "
                               "calibration's (`joule perf validate` prints the factor that fits a machine's step "
                               "grid; runs with the decode lookahead follow it less)")
    simulate.add_argument("--router", default="least_loaded", choices=["least_loaded", "round_robin"])
    simulate.add_argument("--max-num-seqs", type=int, default=256)
    simulate.add_argument("--max-num-batched-tokens", type=int, default=8192)
    simulate.add_argument("--block-size", type=int, default=16)
    simulate.add_argument("--num-kv-blocks", type=int, default=None)
    simulate.add_argument("--no-prefix-caching", action="store_true")
    simulate.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "fair", "deadline"],
                          help="deadline schedules against --slo, which every request then carries")
    simulate.add_argument("--admission-policy", default="greedy", choices=["greedy", "predicted"])
    simulate.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                          help="--no-enable-chunked-prefill: the prefill-first baseline")
    simulate.add_argument("--decode-lookahead", action=argparse.BooleanOptionalAction, default=None,
                          help="the engine's --decode-lookahead: greedy decode steps queued ahead, host work hidden "
                          "(default: as the engine, on for a GPU, off for a CPU)")
    simulate.add_argument("--tenant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                          help="a tenant (repeatable), as `joule bench serve --tenant`: rate=, share=, num=, input=, "
                               "output=, ttft=, tpot=, tbt=; requests are billed to it (the fair policy) and judged by "
                               "its SLOs, and the summary has a line per tenant")
    simulate.add_argument("--fair-keep-up", action=argparse.BooleanOptionalAction, default=True,
                          help="the fair policy cuts the other tenants' prompt chunks no shorter than they need to "
                               "keep up (default, as the engine's --fair-keep-up); --no-fair-keep-up: the fixed cap")
    simulate.add_argument("--final-only", action="store_true",
                          help="clients take one output per request at its end, as LLM.generate (default: they "
                               "stream, as a server's clients do: host work for an output every step)")
    simulate.add_argument("--unmetered", action="store_true",
                          help="the engine's energy ledger is off, as in benchmarks that time the engine alone")
    simulate.add_argument("--sweep-rates", default=None, help="comma-separated request rates to sweep")
    simulate.add_argument("--replay-log", default=None, metavar="FILE",
                          help="a `joule serve --request-log` file (.gz ok): simulate its requests (arrivals, "
                               "tenants, lengths, prefix-cache hits) instead of --workload/--tenant, and print the "
                               "logged latencies beside the simulated ones; give the server's engine flags too")
    simulate.add_argument("--step-log", default=None, metavar="FILE",
                          help="with --replay-log: the same server's `--step-log`; every logged step is predicted "
                               "with the profile (median error by kind, total time), beside the simulated steps")
    simulate.add_argument("--per-request", action="store_true",
                          help="--output-json also lists every request (arrival, TTFT, TPOT, end-to-end), with "
                               "`joule bench serve --output-json`'s per-request keys")
    simulate.add_argument("--plot-dir", default=None, help="write PNG plots here")
    simulate.set_defaults(perf_handler=run_simulate)

    plan = subparsers.add_parser("plan", help="cheapest / most efficient hardware plan meeting an SLO")
    _add_workload_arguments(plan)
    plan.add_argument("--objective", default="cost", choices=["cost", "energy"])
    plan.add_argument("--hardware", default=None, help="kinds to consider (default: every GPU in the catalog)")
    plan.add_argument("--batched-tokens", default="2048,8192", help="max_num_batched_tokens values to try")
    plan.add_argument("--max-seqs", default="256", help="max_num_seqs values to try")
    plan.add_argument("--no-mixed", action="store_true", help="only plans of one hardware kind")
    plan.add_argument("--search-requests", type=int, default=150, help="requests per capacity probe")
    plan.add_argument("--top", type=int, default=5)
    plan.add_argument("--catalog-only", action="store_true",
                      help="catalog-default profiles for every kind, ignoring shipped calibrated ones")
    plan.set_defaults(perf_handler=run_plan)

    perf = subparsers.add_parser("perf", help="performance model tools")
    perf_commands = perf.add_subparsers(dest="perf_command", required=True)
    calibrate = perf_commands.add_parser("calibrate", help="measure this device and fit a profile")
    validate = perf_commands.add_parser("validate", help="compare a profile with real engine steps and runs")
    for parser in (calibrate, validate):
        parser.add_argument("--model", default=None, help="engine model (default: SmolLM2-135M)")
        parser.add_argument("--dtype", default="auto")
        parser.add_argument("--device", default="auto")
        parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
        parser.add_argument("--repeats", type=int, default=3)
    calibrate.add_argument("--hardware", default=None, help="catalog kind (default: detected)")
    calibrate.add_argument("--output", default=None, help="profile path (default: joule/perf/profiles/KIND-DTYPE.json)")
    calibrate.add_argument("--measurements", default=None, help="also save raw measurements (JSON)")
    calibrate.add_argument("--refit", default=None,
                           help="comma-separated saved measurement files: merge (fastest of each) and fit, no measuring")
    calibrate.set_defaults(perf_handler=run_calibrate)
    validate.add_argument("--profile", required=True)
    validate.add_argument("--offline", default=None,
                          help="NUM_PROMPTS,INPUT_LEN,OUTPUT_LEN ('' to skip; default 32,128,64, or with --recheck "
                               "the saved run's own)")
    validate.add_argument("--serving", default="", help="WORKLOAD spec served in real time ('' to skip)")
    validate.add_argument("--skip-steps", action="store_true")
    validate.add_argument("--decode-lookahead", action=argparse.BooleanOptionalAction, default=None,
                          help="the offline and serving runs with the engine's decode lookahead (default: as the "
                          "engine, on with CUDA); the step grid is timed step by step either way")
    validate.add_argument("--grid-seed", type=int, default=None,
                          help="check steps on a fresh random grid of compositions drawn from this seed "
                               "(default: the fixed grid of validate.py)")
    validate.add_argument("--recheck", default=None,
                          help="a saved validation JSON (.gz ok): re-predict its measured steps and re-simulate its "
                               "offline and serving runs with --profile, no engine")
    validate.add_argument("--host-scale", type=_positive_float, default=1.0,
                          help="--profile's host terms times this (a host this many times as slow as the "
                               "calibration's); the step grid's best-fitting factor is printed either way")
    validate.add_argument("--output-json", default=None, help="the report (JSON; gzip-compressed if it ends in .gz)")
    validate.add_argument("--plot", default=None, help="PNG: steps predicted vs measured, run errors vs targets")
    validate.set_defaults(perf_handler=run_validate)


def run_perf_command(args: argparse.Namespace) -> int:
    return args.perf_handler(args)


# -- simulate ----------------------------------------------------------------------------------
def run_simulate(args: argparse.Namespace) -> int:
    from joule.perf.simulate_command import run_simulate as run

    return run(args)


# -- plan --------------------------------------------------------------------------------------
def run_plan(args: argparse.Namespace) -> int:
    from joule.perf.arrivals import WorkloadSpec
    from joule.perf.hardware import parse_price_overrides
    from joule.perf.metrics import SLO
    from joule.perf.planner import Planner, PlannerConfig

    if not args.slo:
        raise ValueError("joule plan needs --slo ttft=SECONDS,tpot=SECONDS[,tbt=SECONDS]")
    model = load_model_config(args.model)
    workload = WorkloadSpec.parse(args.workload)
    if math.isinf(workload.rate):
        raise ValueError("joule plan needs a target rate in --workload (rate=REQ_PER_S)")
    config = PlannerConfig(
        objective=args.objective, allow_mixed=not args.no_mixed, search_requests=args.search_requests,
        batched_tokens=tuple(int(v) for v in csv_items(args.batched_tokens)),
        max_seqs=tuple(int(v) for v in csv_items(args.max_seqs)), prices=parse_price_overrides(args.price),
        max_model_len=args.max_model_len, use_calibrated_profiles=not args.catalog_only,
    )
    if args.hardware:
        config.hardware = tuple(csv_items(args.hardware))
    started = time.perf_counter()
    planner = Planner(model, workload, SLO.parse(args.slo), config, log=lambda message: print(message, flush=True))
    print(f"planning for {workload.rate} req/s, mean output {planner.mean_output_tokens:.0f} tokens, "
          f"objective {args.objective}")
    plans = planner.run()
    print(f"\nsearched in {time.perf_counter() - started:.0f} s; top plans:")
    # Goodput at the offered load: attainment x rate (a finite run's makespan includes its drain tail).
    print(f"{'plan':<52}{'$/h':>8}{'$/M tok':>9}{'J/tok':>8}{'goodput r/s':>12}{'SLO':>6}")
    for plan in plans[: args.top]:
        attainment = plan.verified.get("slo_attainment")
        goodput = attainment * workload.rate if attainment is not None else None
        status = ("ok" if plan.meets_slo else "miss") if plan.verified else "est"
        print(f"{plan.label:<52}{plan.hourly_usd:>8.2f}{plan.usd_per_million_tokens:>9.3f}"
              f"{plan.joules_per_token:>8.3f}{(f'{goodput:.2f}' if goodput is not None else '-'):>12}{status:>6}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps([p.to_dict() for p in plans[: args.top]], indent=2, default=str))
    return 0


# -- perf calibrate / validate -----------------------------------------------------------------
def run_calibrate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from joule.perf.calibrate import calibrate
    from joule.perf.profile import PROFILE_DIR, shipped_profile_path

    started = time.perf_counter()
    if args.refit:
        from joule.perf.calibrate import refit

        profile, measured = refit(csv_items(args.refit), args.model)
    else:
        profile, measured = calibrate(args.model, args.dtype, args.device, args.load_format, args.hardware,
                                      args.repeats)
    output = Path(args.output) if args.output else shipped_profile_path(profile.hardware, profile.dtype)
    if not args.output:
        PROFILE_DIR.mkdir(exist_ok=True)
    profile.save(output)
    print(f"profile written to {output} ({time.perf_counter() - started:.0f} s)")
    print(json.dumps(profile.to_dict(), indent=2))
    if args.measurements:
        Path(args.measurements).write_text(json.dumps(asdict(measured), indent=1, default=str))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from joule.perf.validate_command import run_validate as run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (python -m joule.perf.cli ...) until joule/cli.py wires the commands in."""
    parser = argparse.ArgumentParser(prog="joule")
    add_perf_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run_perf_command(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
