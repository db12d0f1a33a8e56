"""Goodput in simulation: stall-free chunked prefill vs prefill-first on the engine's own scheduler, no GPU needed.

Usage (repo root, CPU):
    PYTHONPATH=. python benchmarks/sim/goodput.py [--input-len uniform:1024:3072] [--output-len uniform:64:192] \
        [--rates 4,8,16,24,32,40] [--budgets 2048,8192] [--factors 1.5,2,3,5] [--ttft-slo-factor 10] \
        [--duration-s 10] [--max-model-len 4096] [--seed 0] [--hardware H200] [--profile PROFILE_JSON] [--json OUT] \
        [--deadline-factor 3] [--tables] [--quiet]

The same sweep as benchmarks/gpu/serve_goodput.py, on simulated time: for every rate, ``--duration-s`` seconds of
Poisson arrivals planned by ``joule bench serve``'s own generator (``plan_run``: same seed, same lengths and send
times as the GPU script's sweep), Llama-3.2-1B shape, replayed through ``ClusterSimulator`` (the engine's
``EngineCore`` + ``Scheduler`` with a ``SimulatedExecutor`` on the shipped calibrated profile of ``--hardware``).
Schedules, in this order (the first calibrates the SLOs, as the GPU script's first sweep does):

- ``chunked-B`` for each B in ``--budgets``: stall-free chunked prefill with ``max_num_batched_tokens`` B (the
  engine's default on a GPU is 8192, on a CPU 2048; ``ReplicaConfig`` alone would use 2048);
- ``prefill-first``: ``enable_chunked_prefill=False`` (what ``joule serve --no-enable-chunked-prefill`` sets),
  with the budget the engine gives it then, ``max(8192, max_model_len)``: whole prompts whenever one can be
  admitted, running decodes wait;
- with ``--deadline-factor K``, ``chunked-B+deadline`` (the first budget): the ``deadline`` policy, every
  request carrying the SLOs calibrated at TPOT factor K (Sarathi-Serve's rule cuts prompt chunks so running
  decodes keep their TPOT), as the GPU script's third sweep.

Each request's TTFT, average TPOT ((e2e - TTFT) / (output tokens - 1)) and largest gap between tokens are
judged after the runs with ``calibrated_slo`` / ``goodput_summary`` from the GPU script (TPOT SLO = factor x the
first chunked sweep's p50 TPOT at the lowest rate; TTFT SLO = ``--ttft-slo-factor`` x its p50 TTFT; goodput =
completed requests/s meeting every SLO over first arrival -> last completion, DistServe). Printed (``--tables``: one
table per schedule first): the max goodput of every schedule and its ratio to prefill-first per TPOT factor, and the
same for a TBT (largest gap) SLO. The simulator has no HTTP layer, client or host contention: its calm TTFT and
TPOT are the engine's alone, so SLOs calibrated here are tighter in absolute terms than the GPU run's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from joule.bench.serve import RunResult, SweepReport  # noqa: E402
from joule.bench.serve_metrics import RequestResult, compute_metrics  # noqa: E402
from joule.bench.serve_workload import WorkloadOptions, parse_rates, plan_run  # noqa: E402
from joule.bench.workload import LengthDistribution, SyntheticRequest  # noqa: E402
from joule.engine.request import RequestSLO  # noqa: E402
from joule.model.config import ModelConfig  # noqa: E402
from joule.perf.arrivals import TimedRequest  # noqa: E402
from joule.perf.metrics import SLO  # noqa: E402
from joule.perf.simulator import ClusterSimulator, ReplicaConfig  # noqa: E402

MODEL_CONFIG = REPO / "benchmarks" / "configs" / "llama-3.2-1b" / "config.json"
GPU_SCRIPT = REPO / "benchmarks" / "gpu" / "serve_goodput.py"
PERCENTILES = [50.0, 90.0, 99.0]
ENGINE_GPU_BUDGET = 8192  # the engine's default max_num_batched_tokens on a GPU (llm_engine._DEFAULT_BATCHED_TOKENS)


def _gpu_script():
    """benchmarks/gpu/serve_goodput.py as a module, for its SLO calibration and goodput summary."""
    name = "serve_goodput"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, GPU_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def schedules(budgets: list[int], max_model_len: int) -> dict[str, dict]:
    """Sweep label -> ReplicaConfig settings: one chunked schedule per budget, then prefill-first."""
    found = {f"chunked-{budget}": {"max_num_batched_tokens": budget, "enable_chunked_prefill": True}
             for budget in budgets}
    found["prefill-first"] = {"max_num_batched_tokens": max(ENGINE_GPU_BUDGET, max_model_len),
                              "enable_chunked_prefill": False}
    return found


def timed_requests(options: WorkloadOptions, rate: float) -> list[TimedRequest]:
    """What `joule bench serve` would send at ``rate`` (``plan_run``), as the simulator's timed requests."""
    planned = plan_run(options, [], rate, SLO())
    return [TimedRequest(f"r{index}", request.send_at, SyntheticRequest(request.prompt, request.output_len))
            for index, request in enumerate(planned)]


def simulate_run(model: ModelConfig, replica: ReplicaConfig, requests: list[TimedRequest], rate: float,
                 request_slo: RequestSLO | None = None) -> RunResult:
    """One rate on one schedule, as the GPU script's ``RunResult``. Each request's ``itl`` holds only its
    largest gap (the simulator keeps no per-request gaps): enough for the TBT SLO, not for ITL percentiles.
    ``request_slo``: what every request carries to the server (the ``deadline`` policy schedules against it)."""
    result = ClusterSimulator(model, [replica], request_slo=request_slo).run(requests)
    results = []
    for record in result.records:
        done = record.finish_time is not None and record.first_token_time is not None
        results.append(RequestResult(
            success=done, prompt_len=record.prompt_len, output_tokens=record.num_output_tokens,
            ttft=record.ttft if done else 0.0, latency=record.e2e if done else 0.0,
            itl=[record.max_itl] if done and record.num_output_tokens > 1 else [],
        ))
    finished = [record.finish_time for record in result.records if record.finish_time is not None]
    start = min(record.arrival_time for record in result.records)
    duration = max(max(finished, default=start) - start, 1e-9)
    return RunResult(rate, compute_metrics(results, duration, PERCENTILES), {}, results, None, [])


def simulate_sweeps(input_len: str, output_len: str, rates: list[float], budgets: list[int], duration_s: float,
                    max_model_len: int, seed: int = 0, hardware: str = "H200", profile: str | None = None,
                    max_num_seqs: int = 256, progress=print, deadline_factor: float | None = None,
                    ttft_factor: float = 10.0) -> dict[str, SweepReport]:
    """Every schedule's sweep over ``rates``, in ``schedules`` order (the first chunked one first). With
    ``deadline_factor``, one more sweep as the GPU script's ``chunked-B+deadline``: the first budget, the
    ``deadline`` policy, every request carrying the SLOs calibrated on the first sweep at that TPOT factor."""
    model = ModelConfig.from_file(MODEL_CONFIG)
    options = WorkloadOptions(num_prompts=1, input_len=LengthDistribution.parse(input_len),
                              output_len=LengthDistribution.parse(output_len, "output"), duration_s=duration_s,
                              max_model_len=max_model_len, seed=seed)
    workloads = {rate: timed_requests(options, rate) for rate in rates}
    sweeps = {}
    plans = [(label, settings, None) for label, settings in schedules(budgets, max_model_len).items()]
    if deadline_factor is not None:
        plans.append((f"chunked-{budgets[0]}+deadline", {"max_num_batched_tokens": budgets[0],
                                                         "enable_chunked_prefill": True,
                                                         "scheduling_policy": "deadline"}, deadline_factor))
    for label, settings, factor in plans:
        request_slo = None
        if factor is not None:
            slo = _gpu_script().calibrated_slo(next(iter(sweeps.values())), factor, ttft_factor)
            request_slo = RequestSLO(ttft_seconds=slo.ttft_s, tpot_seconds=slo.tpot_s)
            progress(f"  {label}: requests carry TTFT {1e3 * slo.ttft_s:.1f} ms, TPOT {1e3 * slo.tpot_s:.2f} ms")
        runs = []
        for rate in rates:
            started = time.perf_counter()
            replica = ReplicaConfig.for_hardware(hardware, profile_path=profile, max_model_len=max_model_len,
                                                 max_num_seqs=max_num_seqs, **settings)
            run = simulate_run(model, replica, workloads[rate], rate, request_slo)
            runs.append(run)
            m = run.metrics
            progress(f"  {label:<14} rate {rate:6g}: {m.completed:5d} requests, {m.request_throughput:6.2f} req/s, "
                     f"TTFT p50 {m.ttft_ms.median:8.1f} ms, TPOT p50 {m.tpot_ms.median:6.2f} ms "
                     f"p99 {m.tpot_ms.percentiles['p99']:6.2f} ms ({time.perf_counter() - started:.1f} s)")
        sweeps[label] = SweepReport({"schedule": label, **settings, "simulated": True, "hardware": hardware,
                                     "input_len": input_len, "output_len": output_len, "duration_s": duration_s,
                                     "max_model_len": max_model_len, "seed": seed}, runs)
    return sweeps


def summarize(sweeps: dict[str, SweepReport], factors: list[float], ttft_factor: float,
              tbt_factors: list[float]) -> dict:
    """The GPU script's goodput tables (average TPOT and TBT) for these sweeps."""
    script = _gpu_script()
    return {"goodput": script.goodput_summary(sweeps, factors, ttft_factor),
            "goodput_tbt": script.goodput_summary(sweeps, tbt_factors, ttft_factor, target="tbt")}


def best_rates(sweeps: dict[str, SweepReport], slo: SLO) -> dict[str, float | None]:
    """The swept rate at which each schedule's goodput peaks under ``slo``."""
    found = {}
    for name, report in sweeps.items():
        judged = report.with_slo(slo, PERCENTILES)
        best = max(judged.runs, key=lambda run: run.metrics.goodput or 0.0)
        found[name] = best.rate if best.metrics.goodput else None
    return found


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(sweeps: dict[str, SweepReport], summary: dict, ttft_factor: float, tables: bool = False) -> None:
    script = _gpu_script()
    calm = next(iter(sweeps.values()))
    for row in summary["goodput"]["by_factor"]:
        slo = script.calibrated_slo(calm, row["tpot_slo_factor"], ttft_factor)
        row["best_rate"] = best_rates(sweeps, slo)
    slo = script.calibrated_slo(calm, summary["goodput"]["by_factor"][0]["tpot_slo_factor"], ttft_factor)
    if tables:  # judged at the first (tightest) TPOT factor
        for name, report in sweeps.items():
            print(report.with_slo(slo, PERCENTILES).table(name, show_tbt=True))
    script.print_goodput_table(summary["goodput"], "tpot")
    script.print_goodput_table(summary["goodput_tbt"], "tbt")
    print("rates at which each schedule's goodput peaks (TPOT factor: schedule rate):")
    for row in summary["goodput"]["by_factor"]:
        print(f"  factor {row['tpot_slo_factor']:>4g}: " +
              "  ".join(f"{name} {_fmt(rate, 'g')}" for name, rate in row["best_rate"].items()))


def parse_floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-len", default="uniform:1024:3072", help="prompt lengths (LengthDistribution syntax)")
    parser.add_argument("--output-len", default="uniform:64:192", help="output lengths (LengthDistribution syntax)")
    parser.add_argument("--rates", default="4,8,16,24,32,40", help="comma-separated request rates (req/s)")
    parser.add_argument("--budgets", default="2048,8192", help="chunked schedules' max_num_batched_tokens")
    parser.add_argument("--factors", default="1.5,2,3,5", help="TPOT SLO factors (x calm p50 TPOT)")
    parser.add_argument("--tbt-factors", default="2,3,5,10", help="TBT SLO factors (x calm p50 TPOT)")
    parser.add_argument("--ttft-slo-factor", type=float, default=10.0, help="TTFT SLO / calm p50 TTFT")
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds of arrivals per rate")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="workload seed (the GPU script's sweep uses 0)")
    parser.add_argument("--hardware", default="H200", help="catalog name; its shipped calibrated profile is used")
    parser.add_argument("--profile", default=None, help="a profile JSON instead of the shipped one")
    parser.add_argument("--json", default=None, help="write the summary (and per-run metrics) here")
    parser.add_argument("--deadline-factor", type=float, default=None,
                        help="also sweep chunked (first budget) + the deadline policy, every request carrying the "
                             "SLOs calibrated at this TPOT factor (the GPU script uses its --tpot-slo-factor, 3)")
    parser.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    parser.add_argument("--tables", action="store_true",
                        help="print every schedule's sweep table (judged at the first TPOT factor)")
    args = parser.parse_args(argv)
    rates = parse_rates(args.rates)
    if any(math.isinf(rate) for rate in rates):
        parser.error("rates must be finite")
    budgets = [int(budget) for budget in args.budgets.split(",") if budget.strip()]
    started = time.perf_counter()
    print(f"workload: input {args.input_len}, output {args.output_len}, {args.duration_s:g} s per rate, "
          f"max_model_len {args.max_model_len}, seed {args.seed}; {args.hardware} profile"
          f"{' ' + args.profile if args.profile else ''}", flush=True)
    sweeps = simulate_sweeps(args.input_len, args.output_len, rates, budgets, args.duration_s, args.max_model_len,
                             args.seed, args.hardware, args.profile, args.max_num_seqs,
                             progress=(lambda _: None) if args.quiet else (lambda line: print(line, flush=True)),
                             deadline_factor=args.deadline_factor, ttft_factor=args.ttft_slo_factor)
    summary = summarize(sweeps, parse_floats(args.factors), args.ttft_slo_factor, parse_floats(args.tbt_factors))
    print_report(sweeps, summary, args.ttft_slo_factor, args.tables)
    summary["workload"] = {key: getattr(args, key) for key in ("input_len", "output_len", "duration_s",
                                                               "max_model_len", "seed", "hardware", "profile")}
    summary["rates"] = rates
    summary["runs"] = {name: [{"rate": run.rate, **{key: value for key, value in asdict(run.metrics).items()
                                                     if key in ("completed", "duration_s", "request_throughput",
                                                                "output_throughput")},
                               "ttft_p50_ms": run.metrics.ttft_ms.median, "tpot_p50_ms": run.metrics.tpot_ms.median,
                               "tpot_p99_ms": run.metrics.tpot_ms.percentiles["p99"]}
                              for run in report.runs] for name, report in sweeps.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"simulated in {time.perf_counter() - started:.0f} s", flush=True)
    return summary


if __name__ == "__main__":
    main()
