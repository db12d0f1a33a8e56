"""`joule simulate`: a workload (or a server's request log) served on modelled hardware by the engine's own scheduler.

Imported by ``joule.perf.cli`` when the command runs, so the parser module stays small.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from joule.model.config import ModelConfig
from joule.perf.cli import csv_items, load_model_config


def replica_list(args, model: ModelConfig):
    from joule.perf.hardware import parse_price_overrides, with_price
    from joule.perf.simulator import ReplicaConfig

    prices = parse_price_overrides(args.price)
    if "=" in args.hardware:
        counts = {name: int(count) for name, count in (item.split("=") for item in csv_items(args.hardware))}
    else:
        counts = {args.hardware: args.replicas}
    replicas = []
    for name, count in counts.items():
        replica = ReplicaConfig.for_hardware(
            name, args.profile, args.dtype, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
            block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
            enable_prefix_caching=not args.no_prefix_caching,
            scheduling_policy=getattr(args, "scheduling_policy", "fcfs"),
            admission_policy=getattr(args, "admission_policy", "greedy"),
            enable_chunked_prefill=getattr(args, "enable_chunked_prefill", True),
            decode_lookahead=getattr(args, "decode_lookahead", None), metered=not getattr(args, "unmetered", False),
            fair_keep_up=getattr(args, "fair_keep_up", True),
        )
        if getattr(args, "host_scale", 1.0) != 1.0:
            replica.profile = replica.profile.with_host_scale(args.host_scale)
        if replica.hardware.name in prices:
            replica.hardware = with_price(replica.hardware, prices[replica.hardware.name])
        replicas += [replica] * count
    return replicas


def print_summary(summary: dict) -> None:
    print(f"{summary['num_finished']}/{summary['num_requests']} requests on {summary['num_replicas']} replica(s) "
          f"in {summary['makespan_s']:.2f} simulated s, {summary['num_steps']} steps, "
          f"{summary['num_preemptions']} preemptions")
    print(f"  throughput  {summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.1f} output tok/s")
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "e2e")):
        values = summary[key]
        print(f"  {label:<5} ms   p50 {values['p50'] * 1e3:9.2f}   p90 {values['p90'] * 1e3:9.2f}   "
              f"p99 {values['p99'] * 1e3:9.2f}")
    print(f"  energy      {summary['joules_per_output_token']:.4f} J/output token; "
          f"cost ${summary['usd_per_million_output_tokens']:.3f} per million output tokens")
    if "slo_attainment" in summary:
        print(f"  SLO         attainment {summary['slo_attainment']:.1%}, goodput "
              f"{summary['goodput_requests_per_s']:.2f} req/s ({'meets' if summary['meets_slo'] else 'misses'} SLO)")
    for name, tenant in summary.get("tenants", {}).items():
        attainment = f", SLO attainment {tenant['slo_attainment']:.1%}" if "slo_attainment" in tenant else ""
        print(f"  tenant {name}: {tenant['num_finished']}/{tenant['num_requests']} requests, "
              f"{tenant['output_throughput']:.1f} output tok/s, TTFT p50 {tenant['ttft_s']['p50'] * 1e3:.1f} / p99 "
              f"{tenant['ttft_s']['p99'] * 1e3:.1f} ms, TPOT p50 {tenant['tpot_s']['p50'] * 1e3:.2f} ms{attainment}")


def run_simulate(args: argparse.Namespace) -> int:
    from joule.engine.request import RequestSLO
    from joule.bench.serve_workload import TenantSpec
    from joule.perf.arrivals import WorkloadSpec, generate, tenant_requests
    from joule.perf.metrics import SLO
    from joule.perf.simulator import ClusterSimulator

    model = load_model_config(args.model)
    workload = WorkloadSpec.parse(args.workload)
    tenants = [TenantSpec.parse(text) for text in args.tenant]
    slo = SLO.parse(args.slo) if args.slo else None
    replicas = replica_list(args, model)
    request_slo = RequestSLO(ttft_seconds=slo.ttft_s, tpot_seconds=slo.tpot_s) if slo else None
    rates = [float(rate) for rate in csv_items(args.sweep_rates)] if args.sweep_rates else [workload.rate]
    if args.replay_log:
        return _replay_log(args, model, replicas, request_slo, slo)
    if args.step_log:
        raise ValueError("--step-log goes with --replay-log (the same server's request log)")
    rows, last = [], None
    for rate in rates:
        started = time.perf_counter()
        if tenants:
            requests = tenant_requests(workload.with_rate(rate), tenants, model.vocab_size, args.max_model_len, slo)
        else:
            requests = generate(workload.with_rate(rate), model.vocab_size, args.max_model_len)
        last = ClusterSimulator(model, replicas, args.router, request_slo=request_slo,
                                streamed_outputs=not args.final_only).run(requests, progress=True)
        summary = last.summary(slo)
        summary["offered_rate"] = rate
        summary["wall_s"] = time.perf_counter() - started
        if args.per_request:
            summary["requests"] = last.request_rows(slo)
        rows.append(summary)
        print(f"\n== offered load {rate} req/s (simulated in {summary['wall_s']:.1f} s wall)")
        print_summary(summary)
    if args.plot_dir:
        from joule.perf.plots import plot_run, plot_sweep

        directory = Path(args.plot_dir)
        directory.mkdir(parents=True, exist_ok=True)
        title = f"{Path(args.model).stem} on {args.hardware}"
        print(f"plot: {plot_run(last, directory / 'latency_cdf.png', title, slo)}")
        if len(rows) > 1:
            print(f"plot: {plot_sweep(rows, directory / 'sweep.png', title)}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return 0


def _replay_log(args, model: ModelConfig, replicas, request_slo, slo) -> int:
    from joule.perf.log_replay import comparison_lines, logged_latencies, read_request_log, replay_requests
    from joule.perf.simulator import ClusterSimulator

    if args.tenant or args.sweep_rates:
        raise ValueError("--replay-log takes its requests and tenants from the log: drop --tenant and --sweep-rates")
    log = read_request_log(args.replay_log)
    requests = replay_requests(log, model.vocab_size)
    started = time.perf_counter()
    simulator = ClusterSimulator(model, replicas, args.router, request_slo=request_slo,
                                 streamed_outputs=not args.final_only, record_plans=bool(args.step_log))
    result = simulator.run(requests, progress=True)
    summary = result.summary(slo)
    summary["wall_s"] = time.perf_counter() - started
    summary["logged"] = logged_latencies(log)
    summary["logged_requests_left_out"] = log.skipped
    print(f"\n== {len(requests)} requests of {args.replay_log}"
          + (f" ({log.skipped} aborted or incomplete left out)" if log.skipped else "")
          + f" (simulated in {summary['wall_s']:.1f} s wall)")
    print_summary(summary)
    print("\n" + "\n".join(comparison_lines(summary["logged"], summary)))
    if args.step_log:
        simulated_steps = [[sequence.num_tokens for sequence in plan] for plan in simulator.plans(0)]
        summary["logged_steps"] = _logged_steps(args.step_log, model, replicas[0].profile, simulated_steps)
    if args.per_request:
        summary["requests"] = result.request_rows(slo)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps([summary], indent=2, default=str) + "\n")
    return 0


def _logged_steps(path: str, model: ModelConfig, profile, simulated_steps: list[list[int]]) -> dict:
    """A server's logged steps, each predicted by the step model: are they slower than it says, or other steps?
    ``simulated_steps``: each simulated step's new tokens per sequence (the first replica's)."""
    from joule.perf.log_replay import prompt_work
    from joule.perf.step_log import read_step_log
    from joule.perf.step_model import StepModel
    from joule.perf.validate import recheck, summarize_checks

    checks = recheck(read_step_log(path), StepModel(model, profile))
    summary = summarize_checks(checks, keep_steps=False)
    summary.pop("by_scenario", None)
    summary["measured_s"] = sum(check.measured_s for check in checks)
    summary["predicted_s"] = sum(check.predicted_s for check in checks)
    kinds = ", ".join(f"{kind} {row['median_abs_error']:.1%} ({row['steps']})"
                      for kind, row in summary["by_kind"].items())
    print(f"\nlogged steps: {summary['steps']}, {summary['measured_s']:.2f} s, each predicted from its shape: "
          f"{summary['predicted_s']:.2f} s, median |error| {summary['median_abs_error']:.1%} [{kinds}]")
    summary["prompt_work"] = {"logged": prompt_work([[row[0] for row in check.sequences] for check in checks]),
                              "simulated": prompt_work(simulated_steps)}
    print(f"simulated steps: {len(simulated_steps)} (the server ran {summary['steps']})")
    for side, work in summary["prompt_work"].items():
        if work["steps"]:
            print(f"  {side:>9}: {work['steps']} steps carried prompt tokens, per step p50 {work['p50']} / "
                  f"p90 {work['p90']} / max {work['max']}")
    return summary
