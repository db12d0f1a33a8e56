"""One GPU call (<= 8 minutes): goodput of the stall-free chunked schedule vs prefill-first, tenant fairness, and
joules per output token against the request rate, all through `joule serve` over HTTP.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/serve_goodput.py   (results under $OUT or ./out)
CPU at tiny scale (what tests/bench runs): python benchmarks/gpu/serve_goodput.py --tiny [--model-dir DIR]
The workload (default per scale: on the GPU prompts uniform:1024:3072, outputs uniform:64:192, max_model_len 4096,
10 s per rate) can be changed with ``--input-len``, ``--output-len`` (LengthDistribution syntax), ``--max-model-len``
and ``--duration-s``; benchmarks/sim/goodput.py simulates the same sweep on the CPU first.

(a) Rate sweep with long prompts, once on the default stall-free chunked server (the engine's default token
    budget unless ``--chunk-budget``) and once on the prefill-first baseline (``--no-enable-chunked-prefill``:
    whole prompts, decodes wait). The TPOT SLO is tight: ``--tpot-slo-factor`` x the chunked server's p50 TPOT
    at the lowest rate (plus a TTFT SLO), applied to every request after the runs. Goodput = completed
    requests/s meeting both (DistServe); reported: each schedule's max goodput and their ratio, also for other
    SLO factors. A third sweep runs the chunked server with ``--scheduling-policy deadline`` and every request
    carrying the calibrated SLOs (``tpot_slo_ms``): the policy cuts prompt chunks to keep running decodes
    within their TPOT (Sarathi-Serve's rule); ``--no-deadline`` skips it. (On the H100, 2026-11-22, a fixed
    512-token budget did far worse than the default: chunks of long prompts ran slowly; ``--chunk-budget 512``.)
    The same table for a TBT SLO (time between tokens, Sarathi-Serve's measure): each request's largest gap
    between two tokens <= k x the calm chunked p50 TPOT, with the same TTFT SLO and no TPOT one. A prefill-first
    schedule stalls running decodes for a whole prompt, which the average TPOT hides and the TBT does not.
    ``--chunk-budgets 2048,8192`` sweeps the chunked server once per token budget (sweeps ``chunked-2048``,
    ``chunked-8192``; the first one calibrates the SLOs and hosts the fairness and deadline runs).
(b) Fairness: a light tenant alone (p99 TTFT), then the same light tenant while a heavy tenant floods at
    2x the chunked server's best throughput from (a) (or ``--heavy-rate``) from a client process of its own,
    under ``--scheduling-policy fcfs`` and ``fair``. ``--fairness-only`` runs just these.
(c) Joules per output token vs rate, from the server-reported energy of (a)'s requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from joule.bench.serve import ServeBenchConfig, SweepReport, run_sweep, run_sweep_async
from joule.bench.serve_metrics import format_rate
from joule.bench.server_pauses import format_pauses, scrape_pause_counters, summarize_pauses
from joule.bench.serve_workload import TenantSpec, WorkloadOptions
from joule.bench.workload import LengthDistribution
from joule.perf.metrics import SLO

STARTED = time.perf_counter()
PERCENTILES = [50.0, 90.0, 99.0]
FLOOD_LEAD_S = 2.0  # the flood runs this long before the light tenant's requests start


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", flush=True)


@dataclass
class Scale:
    """Everything that differs between the H100 run and the tiny CPU run."""

    engine_args: list[str]
    rates: list[float]
    duration_s: float
    input_len: str
    output_len: str
    max_model_len: int
    chunk_budget: int | None  # the chunked server's max_num_batched_tokens; None: the engine's default
    light_rate: float
    light_input: str
    light_output: str
    fairness_duration_s: float
    health_timeout_s: float
    warmup_requests: int  # the sweep's lengths at warmup_rate after each start, not measured: JIT compiles
    warmup_rate: float
    env: dict = field(default_factory=dict)


GPU = Scale(
    engine_args=["--model", "benchmarks/configs/llama-3.2-1b", "--load-format", "dummy", "--dtype", "bfloat16"],
    rates=[4, 8, 16, 24, 32, 40], duration_s=10.0, input_len="uniform:1024:3072", output_len="uniform:64:192",
    max_model_len=4096, chunk_budget=None, light_rate=4.0, light_input="256", light_output="32",
    fairness_duration_s=10.0, health_timeout_s=240.0, warmup_requests=96, warmup_rate=24.0,
)
TINY = Scale(
    engine_args=["--kv-cache-memory-bytes", str(16 * 2**20), "--dtype", "float32"],
    rates=[3, 8], duration_s=1.0, input_len="uniform:48:160", output_len="uniform:4:10", max_model_len=256,
    chunk_budget=32, light_rate=3.0, light_input="16", light_output="4", fairness_duration_s=1.0,
    health_timeout_s=90.0, warmup_requests=4, warmup_rate=math.inf, env={"OMP_NUM_THREADS": "1"},
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`joule serve` in a subprocess on a free loopback port; its log goes to LOGS/server-NAME.log (a temporary
    folder unless --logs: the device run returns at most 8 files)."""

    def __init__(self, name: str, args: list[str], logs: Path, scale: Scale):
        import httpx

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / f"server-{name}.log"
        command = [sys.executable, "-m", "joule.server.cli", "--host", "127.0.0.1", "--port", str(self.port),
                   "--max-model-len", str(scale.max_model_len), *args]
        log(f"starting server {name}: {' '.join(command[3:])}")
        env = {**os.environ, **scale.env, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.log_file = open(self.log_path, "w")  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + scale.health_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server {name} exited with {self.process.returncode}:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    log(f"server {name} healthy; warming up with {scale.warmup_requests} requests")
                    self.warm_up(scale)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server {name} not healthy within {scale.health_timeout_s} s")

    def warm_up(self, scale: Scale) -> None:
        """Unmeasured requests of the sweep's lengths at a moderate rate, so that mixed steps meet decodes of many
        context lengths: Triton compiles kernel variants on first use (~1 s stalls seen in a first H100 run)."""
        workload = WorkloadOptions(num_prompts=scale.warmup_requests, input_len=LengthDistribution.parse(
            scale.input_len), output_len=LengthDistribution.parse(scale.output_len, "output"),
            max_model_len=scale.max_model_len, seed=99)
        report = run_sweep(ServeBenchConfig(base_url=self.base_url, rates=[scale.warmup_rate], workload=workload))
        if report.failed:
            raise RuntimeError(f"warm-up failed: {report.runs[0].errors}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def sweep(server: Server, scale: Scale, rates: list[float], slo: SLO | None = None,
          timeout_s: float | None = None) -> SweepReport | None:
    """One run per rate; with ``slo`` every request carries it (ttft_slo_ms / tpot_slo_ms) for the server.
    With ``timeout_s``, None when the sweep has not finished by then (its requests are cancelled)."""
    workload = WorkloadOptions(num_prompts=1, input_len=LengthDistribution.parse(scale.input_len),
                               output_len=LengthDistribution.parse(scale.output_len, "output"),
                               duration_s=scale.duration_s, max_model_len=scale.max_model_len, seed=0)
    config = ServeBenchConfig(base_url=server.base_url, rates=rates, workload=workload, percentiles=PERCENTILES,
                              slo=slo or SLO(), send_slo=slo is not None)
    if timeout_s is None:
        return run_sweep(config, progress=log)
    try:
        return asyncio.run(asyncio.wait_for(run_sweep_async(config, progress=log), timeout_s))
    except TimeoutError:
        log(f"sweep cut off after {timeout_s:.0f} s")
        return None


@dataclass
class FairnessRun:
    """The light tenant's report, and how the flooding tenant (its own client process) fared."""

    light: SweepReport
    heavy_completed: int = 0
    heavy_failed: int = 0
    heavy_duration_s: float = 0.0  # from the flood's first request to its last token
    heavy_output_tokens: int = 0
    pauses: dict = field(default_factory=dict)  # the server's GC pauses and loop lag during the run


def fairness_run(server: Server, scale: Scale, heavy_rate: float | None) -> FairnessRun:
    """The light tenant alone (``heavy_rate`` None) or beside a heavy tenant flooding at ``heavy_rate``.

    The flood comes from its own `joule bench serve` process, started ``FLOOD_LEAD_S`` before the light
    tenant's requests: in one client process, reading hundreds of heavy streams would delay when the
    light tenant's first tokens are seen, and the measured TTFT would be the client's as much as the server's.
    """
    flood = None
    before, started = scrape_pause_counters(server.base_url), time.perf_counter()
    if heavy_rate is not None:
        flood_json = Path(tempfile.mkdtemp(prefix="serve-goodput-flood-")) / "flood.json"
        command = [sys.executable, "-m", "joule.cli", "bench", "serve", "--base-url", server.base_url,
                   "--tenant", f"heavy:rate={heavy_rate:g}", "--request-rate", "inf", "--num-prompts", "1",
                   "--duration", f"{scale.fairness_duration_s + FLOOD_LEAD_S:g}", "--input-len", scale.input_len,
                   "--output-len", scale.output_len, "--max-model-len", str(scale.max_model_len), "--seed", "2",
                   "--no-warmup", "--output-json", str(flood_json)]
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        flood = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                 cwd=REPO)
        time.sleep(FLOOD_LEAD_S)
    tenants = [TenantSpec("light", rate=scale.light_rate, input_len=LengthDistribution.parse(scale.light_input),
                          output_len=LengthDistribution.parse(scale.light_output, "output"))]
    workload = WorkloadOptions(num_prompts=1, input_len=LengthDistribution.parse(scale.input_len),
                               output_len=LengthDistribution.parse(scale.output_len, "output"),
                               duration_s=scale.fairness_duration_s, max_model_len=scale.max_model_len, seed=1)
    config = ServeBenchConfig(base_url=server.base_url, rates=[math.inf], workload=workload, tenants=tenants,
                              percentiles=PERCENTILES)
    run = FairnessRun(run_sweep(config, progress=log))
    if flood is not None:
        _, errors = flood.communicate()
        if flood.returncode != 0:
            raise RuntimeError(f"the flooding client failed ({flood.returncode}):\n{errors[-3000:]}")
        heavy = json.loads(flood_json.read_text())["runs"][0]["tenants"]["heavy"]
        run.heavy_completed, run.heavy_failed = heavy["completed"], heavy["failed"]
        run.heavy_duration_s, run.heavy_output_tokens = heavy["duration_s"], heavy["total_output_tokens"]
    run.pauses = summarize_pauses(before, scrape_pause_counters(server.base_url), time.perf_counter() - started)
    log(f"server pauses: {format_pauses(run.pauses)}")
    return run


def calibrated_slo(calm: SweepReport, tpot_factor: float | None, ttft_factor: float,
                   tbt_factor: float | None = None) -> SLO:
    """SLOs as multiples of the p50 TTFT and TPOT of ``calm``'s first (lowest-rate) run; the TBT SLO (a
    request's largest gap between tokens) is also a multiple of that p50 TPOT. A factor of None sets no SLO."""
    metrics = calm.runs[0].metrics
    tpot_ms = metrics.tpot_ms.median
    return SLO(ttft_s=ttft_factor * metrics.ttft_ms.median / 1000.0,
               tpot_s=None if tpot_factor is None else tpot_factor * tpot_ms / 1000.0,
               tbt_s=None if tbt_factor is None else tbt_factor * tpot_ms / 1000.0)


def goodput_summary(sweeps: dict[str, SweepReport], factors: list[float], ttft_factor: float,
                    target: str = "tpot") -> dict:
    """Max goodput of every schedule for SLOs calibrated on the first (chunked) sweep, per factor of the calm
    p50 TPOT; ratios against prefill-first. ``target`` "tpot" judges TTFT + TPOT, "tbt" judges TTFT + each
    request's largest gap between tokens (no TPOT SLO)."""
    if target not in ("tpot", "tbt"):
        raise ValueError(f"target must be tpot or tbt, got {target!r}")
    calm = next(iter(sweeps.values()))
    rows = []
    for factor in factors:
        slo = (calibrated_slo(calm, factor, ttft_factor) if target == "tpot"
               else calibrated_slo(calm, None, ttft_factor, tbt_factor=factor))
        best = {name: report.with_slo(slo, PERCENTILES).max_goodput() for name, report in sweeps.items()}
        baseline = best.get("prefill-first")
        ratios = {name: (value / baseline if baseline else None) for name, value in best.items()
                  if name != "prefill-first"}
        limit_s = slo.tpot_s if target == "tpot" else slo.tbt_s
        rows.append({f"{target}_slo_factor": factor, f"{target}_slo_ms": 1000 * limit_s, "ttft_slo_s": slo.ttft_s,
                     "max_goodput": best, "ratio_vs_prefill_first": ratios})
    metrics = calm.runs[0].metrics
    return {"calm_p50_tpot_ms": metrics.tpot_ms.median, "calm_p50_ttft_ms": metrics.ttft_ms.median,
            "ttft_slo_factor": ttft_factor, "judged_on": f"ttft+{target}", "by_factor": rows}


def parse_budgets(text: str) -> list[int]:
    """``"2048,8192"`` -> [2048, 8192]: one chunked sweep per max_num_batched_tokens."""
    try:
        budgets = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"chunk_budgets must be comma-separated integers, got {text!r}") from None
    if not budgets or any(budget < 1 for budget in budgets) or len(set(budgets)) != len(budgets):
        raise ValueError(f"chunk_budgets must be distinct positive integers, got {text!r}")
    return budgets


def light_ttft(run: FairnessRun) -> dict:
    metrics = run.light.runs[0].tenant_metrics["light"]
    return {"light_p99_ttft_ms": metrics.ttft_ms.percentiles["p99"], "light_p50_ttft_ms": metrics.ttft_ms.median,
            "light_completed": metrics.completed, "light_failed": metrics.failed,
            "heavy_completed": run.heavy_completed, "heavy_failed": run.heavy_failed, "server_pauses": run.pauses}


def plot_light_ttft(runs: dict[str, FairnessRun], path: Path) -> Path:
    """CDF of the light tenant's TTFT alone and beside the flood, per policy."""
    from joule.perf.plots import plot_cdf, pyplot_module, save_figure

    pyplot = pyplot_module()
    figure, axis = pyplot.subplots(figsize=(6, 3.8))
    for label, run in runs.items():
        ttfts = [r.ttft for r in run.light.runs[0].results if r.tenant == "light" and r.success]
        plot_cdf(axis, ttfts, "light tenant TTFT (s)", line_label=label)
    axis.set_xscale("log")
    return save_figure(pyplot, figure, path, "fairness: light tenant's TTFT while a heavy tenant floods")


FAIRNESS_RUNS = (("solo", "light alone"), ("fcfs", "light + heavy, fcfs"), ("fair", "light + heavy, fair"))


def fairness_summary(light_runs: dict[str, FairnessRun]) -> dict:
    """The light tenant's TTFT per run, and p99 under each flood relative to p99 alone."""
    fairness = {key: light_ttft(light_runs[label]) for key, label in FAIRNESS_RUNS if label in light_runs}
    for policy in ("fcfs", "fair"):
        fairness[policy]["p99_ttft_vs_solo"] = (fairness[policy]["light_p99_ttft_ms"]
                                                / fairness["solo"]["light_p99_ttft_ms"])
    return fairness


def print_fairness(fairness: dict) -> None:
    print(f"\nfairness (light tenant's TTFT; heavy floods at {fairness['heavy_rate']:.1f} req/s):")
    for key, _ in FAIRNESS_RUNS:
        row = fairness[key]
        vs = f"  ({row['p99_ttft_vs_solo']:.2f}x solo)" if "p99_ttft_vs_solo" in row else ""
        print(f"  {key:<5} p99 {row['light_p99_ttft_ms']:9.1f} ms  p50 {row['light_p50_ttft_ms']:8.1f} ms  "
              f"light done {row['light_completed']}  heavy done {row['heavy_completed']}{vs}")


def run_fairness_only(scale: Scale, label: str, chunked_args: list[str], heavy_rate: float, logs: Path,
                      out: Path, fair_variants: list[str] = ()) -> int:
    """The three fairness runs alone (two server starts): the light tenant alone and beside the flood under
    fcfs on one server, beside the flood under fair on another; then one more fair run per variant (more
    `joule serve` flags). Every server writes its request log (``--request-log``) under ``out``."""
    light_runs: dict[str, FairnessRun] = {}

    def logged(name: str, args: list[str]) -> list[str]:
        return [*args, "--request-log", str(out / f"requests-{name}.jsonl")]

    with Server(f"{label}-fcfs", logged("fcfs", chunked_args), logs, scale) as server:
        log("fairness: light tenant alone")
        light_runs["light alone"] = fairness_run(server, scale, None)
        log(f"fairness: light + heavy flooding at {heavy_rate:.1f} req/s, fcfs")
        light_runs["light + heavy, fcfs"] = fairness_run(server, scale, heavy_rate)
    with Server(f"{label}-fair", logged("fair", [*chunked_args, "--scheduling-policy", "fair"]), logs, scale) as server:
        log(f"fairness: light + heavy flooding at {heavy_rate:.1f} req/s, fair")
        light_runs["light + heavy, fair"] = fairness_run(server, scale, heavy_rate)
    variants = {}
    for index, variant in enumerate(fair_variants, start=1):
        args = [*chunked_args, "--scheduling-policy", "fair", *shlex.split(variant)]
        with Server(f"{label}-fair-{index}", logged(f"fair-{index}", args), logs, scale) as server:
            log(f"fairness: light + heavy flooding at {heavy_rate:.1f} req/s, fair {variant}")
            variants[variant] = fairness_run(server, scale, heavy_rate)
    fairness = {"heavy_rate": heavy_rate, "server_args": chunked_args, **fairness_summary(light_runs)}
    solo_p99 = fairness["solo"]["light_p99_ttft_ms"]
    for run_label, run in [("fcfs", light_runs["light + heavy, fcfs"]), ("fair", light_runs["light + heavy, fair"]),
                           *[(f"fair {variant}", run) for variant, run in variants.items()]]:
        row = fairness.setdefault(run_label, light_ttft(run))
        row["p99_ttft_vs_solo"] = row["light_p99_ttft_ms"] / solo_p99
        row["heavy_output_tok_s"] = run.heavy_output_tokens / run.heavy_duration_s if run.heavy_duration_s else None
    light_runs.update({f"light + heavy, fair {variant}": run for variant, run in variants.items()})
    # every light request's TTFT in send order, to tell outliers at the start from ones spread over the run
    fairness["light_ttfts_ms"] = {label: [round(1000 * r.ttft, 2) for r in run.light.runs[0].results
                                          if r.tenant == "light" and r.success] for label, run in light_runs.items()}
    plot = plot_light_ttft(light_runs, out / "fairness_light_ttft_cdf.png")
    (out / "fairness.json").write_text(json.dumps({"fairness": fairness, "plot": str(plot)}, indent=2))
    print_fairness(fairness)
    for key in [key for key in fairness if key.startswith("fair ") or key in ("fcfs", "fair")]:
        row = fairness[key]
        heavy = row.get("heavy_output_tok_s")
        print(f"  {key:<28} p99 {row['light_p99_ttft_ms']:8.1f} ms ({row['p99_ttft_vs_solo']:.2f}x)  p50 "
              f"{row['light_p50_ttft_ms']:7.1f} ms  heavy {heavy or 0:8.0f} output tok/s")
    print(f"SUMMARY fair light p99 TTFT {fairness['fair']['light_p99_ttft_ms']:.1f} ms = "
          f"{fairness['fair']['p99_ttft_vs_solo']:.2f}x solo; wall {time.perf_counter() - STARTED:.0f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU, at tiny scale")
    parser.add_argument("--model-dir", default=None, help="--tiny: the tiny model (built under OUT when absent)")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="results folder (default $OUT or ./out)")
    parser.add_argument("--rates", default=None, help="comma-separated sweep rates (default: per scale)")
    parser.add_argument("--input-len", default=None,
                        help="sweep (and flood) prompt lengths, e.g. uniform:2048:6144 (default: per scale)")
    parser.add_argument("--output-len", default=None,
                        help="sweep (and flood) output lengths, e.g. uniform:16:64 (default: per scale)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="every server's --max-model-len and the workload's cap (default: per scale)")
    parser.add_argument("--duration-s", type=float, default=None,
                        help="seconds of traffic per swept rate (default: per scale, 10 on the GPU)")
    parser.add_argument("--chunk-budget", type=int, default=None, help="chunked server's max_num_batched_tokens")
    parser.add_argument("--chunk-budgets", default=None,
                        help="comma list (2048,8192): one chunked sweep per max_num_batched_tokens, labelled "
                             "chunked-BUDGET; the first calibrates the SLOs (instead of --chunk-budget)")
    parser.add_argument("--tpot-slo-factor", type=float, default=3.0, help="TPOT SLO / calm p50 TPOT")
    parser.add_argument("--tbt-slo-factor", type=float, default=5.0,
                        help="TBT SLO (a request's largest gap between tokens) / calm p50 TPOT, for the summary")
    parser.add_argument("--ttft-slo-factor", type=float, default=10.0, help="TTFT SLO / calm p50 TTFT")
    parser.add_argument("--skip-fairness", action="store_true")
    parser.add_argument("--fairness-only", action="store_true",
                        help="only the fairness runs (light alone, + flood under fcfs and fair), at --heavy-rate")
    parser.add_argument("--fairness-duration-s", type=float, default=None,
                        help="seconds of light-tenant traffic per fairness run (default: per scale, 10 on the GPU)")
    parser.add_argument("--heavy-rate", type=float, default=None,
                        help="the flooding tenant's rate (default: 2x the chunked server's best throughput)")
    parser.add_argument("--time-budget-s", type=float, default=420.0,
                        help="skip the optional deadline sweep when it would end past this many seconds")
    parser.add_argument("--no-deadline", action="store_true",
                        help="skip the chunked + deadline-policy sweep (requests carry the calibrated SLOs)")
    parser.add_argument("--fair-variant", action="append", default=[], metavar="FLAGS",
                        help="--fairness-only: one more fair run with these `joule serve` flags (repeatable), "
                             "e.g. '--fair-prompt-cap 256'")
    parser.add_argument("--server-args", default="",
                        help="more `joule serve` flags for every server, e.g. '--no-engine-process'")
    parser.add_argument("--logs", default=None, help="keep the servers' logs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    scale = TINY if args.tiny else GPU
    if args.fairness_duration_s is not None:
        scale = replace(scale, fairness_duration_s=args.fairness_duration_s)
    try:
        for text, role in ((args.input_len, "input"), (args.output_len, "output")):
            if text is not None:
                LengthDistribution.parse(text, role)
    except ValueError as error:
        parser.error(str(error))
    if args.max_model_len is not None and args.max_model_len < 2:
        parser.error("--max-model-len must be at least 2")
    if args.duration_s is not None and not args.duration_s > 0:
        parser.error("--duration-s must be positive")
    scale = replace(scale, input_len=args.input_len or scale.input_len, output_len=args.output_len or scale.output_len,
                    max_model_len=args.max_model_len or scale.max_model_len,
                    duration_s=args.duration_s or scale.duration_s)
    if args.chunk_budgets and args.chunk_budget:
        parser.error("give --chunk-budget or --chunk-budgets, not both")
    if args.chunk_budgets:
        try:
            budgets = {f"chunked-{b}": b for b in parse_budgets(args.chunk_budgets)}
        except ValueError as error:
            parser.error(str(error))
    else:
        budgets = {"chunked": args.chunk_budget or scale.chunk_budget}  # None: the engine's default budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs or tempfile.mkdtemp(prefix="serve-goodput-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [float(r) for r in scale.rates]
    engine_args = list(scale.engine_args)
    if args.tiny:
        model_dir = Path(args.model_dir) if args.model_dir else out / "tiny-model"
        if not (model_dir / "config.json").exists():
            sys.path.insert(0, str(REPO / "tests"))
            from server.tiny_server_model import build_tiny_chat_model

            model_dir.mkdir(parents=True, exist_ok=True)
            build_tiny_chat_model(model_dir)
        engine_args = ["--model", str(model_dir), *engine_args]
    engine_args += shlex.split(args.server_args)

    def budget_args(budget: int | None) -> list[str]:
        return [*engine_args, *(["--max-num-batched-tokens", str(budget)] if budget else [])]

    first_label, first_budget = next(iter(budgets.items()))
    chunked_args = budget_args(first_budget)  # the fairness and deadline runs use the first budget
    results: dict = {"scale": "tiny-cpu" if args.tiny else "gpu", "rates": [format_rate(r) for r in rates],
                     "chunk_budget": first_budget or "engine default",
                     "chunk_budgets": {label: budget or "engine default" for label, budget in budgets.items()},
                     "tpot_slo_factor": args.tpot_slo_factor, "tbt_slo_factor": args.tbt_slo_factor,
                     "workload": {"input_len": scale.input_len, "output_len": scale.output_len,
                                  "duration_s": scale.duration_s, "max_model_len": scale.max_model_len}}
    if args.fairness_only:
        if args.heavy_rate is None:
            parser.error("--fairness-only needs --heavy-rate")
        return run_fairness_only(scale, first_label, chunked_args, args.heavy_rate, logs, out, args.fair_variant)
    sweeps: dict[str, SweepReport] = {}
    fairness: dict = {}
    light_runs: dict[str, FairnessRun] = {}
    with Server(f"{first_label}-fcfs", chunked_args, logs, scale) as server:
        sweeps[first_label] = sweep(server, scale, rates)
        slo = calibrated_slo(sweeps[first_label], args.tpot_slo_factor, args.ttft_slo_factor)
        log(f"SLO from the calm run: TTFT {1000 * slo.ttft_s:.1f} ms, TPOT {1000 * slo.tpot_s:.2f} ms")
        best = max(run.metrics.request_throughput for run in sweeps[first_label].runs)
        heavy_rate = args.heavy_rate or max(2.0 * best, 4.0 * scale.light_rate)
        fairness["heavy_rate"] = heavy_rate
        if not args.skip_fairness:
            log("fairness: light tenant alone")
            light_runs["light alone"] = fairness_run(server, scale, None)
            log(f"fairness: light + heavy flooding at {heavy_rate:.1f} req/s, fcfs")
            light_runs["light + heavy, fcfs"] = fairness_run(server, scale, heavy_rate)
    for label, budget in list(budgets.items())[1:]:
        with Server(f"{label}-fcfs", budget_args(budget), logs, scale) as server:
            sweeps[label] = sweep(server, scale, rates)
    with Server("prefill-first", [*engine_args, "--no-enable-chunked-prefill"], logs, scale) as server:
        sweeps["prefill-first"] = sweep(server, scale, rates)
    sweep_seconds = time.perf_counter() - STARTED
    if not args.skip_fairness:
        with Server(f"{first_label}-fair", [*chunked_args, "--scheduling-policy", "fair"], logs, scale) as server:
            log(f"fairness: light + heavy flooding at {heavy_rate:.1f} req/s, fair")
            light_runs["light + heavy, fair"] = fairness_run(server, scale, heavy_rate)
    # the optional last sweep goes last, only when it fits (about as long as one of those before), and is
    # cut off at the time budget
    needed = sweep_seconds / len(sweeps) + 30
    if not args.no_deadline and time.perf_counter() - STARTED + needed > args.time_budget_s:
        log(f"skipping the deadline sweep: ~{needed:.0f} s more would pass the {args.time_budget_s:.0f} s budget")
        results["deadline_sweep"] = "skipped: no time left"
    elif not args.no_deadline:
        with Server(f"{first_label}-deadline", [*chunked_args, "--scheduling-policy", "deadline"], logs, scale) as server:
            left = args.time_budget_s - (time.perf_counter() - STARTED)
            deadline = sweep(server, scale, rates, slo, timeout_s=max(left, 10.0))
        if deadline is None:
            results["deadline_sweep"] = "cut off at the time budget"
        else:
            sweeps[f"{first_label}+deadline"] = deadline
    if light_runs:
        fairness.update(fairness_summary(light_runs))
    results["fairness"] = fairness
    results["goodput"] = goodput_summary(sweeps, sorted({1.5, 2.0, 3.0, 5.0, args.tpot_slo_factor}),
                                         args.ttft_slo_factor)
    results["goodput_tbt"] = goodput_summary(sweeps, sorted({2.0, 3.0, 5.0, 10.0, args.tbt_slo_factor}),
                                             args.ttft_slo_factor, target="tbt")
    judged = {name: report.with_slo(slo, PERCENTILES) for name, report in sweeps.items()}
    results["energy"] = {name: [{"rate": format_rate(run.rate), "joules_per_output_token":
                                 run.metrics.joules_per_output_token, "energy_source": run.metrics.energy_source,
                                 "server_delta_joules": (run.server_energy or {}).get("delta_joules")}
                                for run in report.runs] for name, report in judged.items()}
    (out / "sweeps.json").write_text(json.dumps({name: report.to_dict() for name, report in judged.items()}))
    from joule.bench.serve_plots import plot_sweeps

    plots = plot_sweeps(judged, out / "plots", f"{'tiny CPU' if args.tiny else 'Llama-3.2-1B'}: schedules, "
                        f"TPOT SLO {1000 * slo.tpot_s:.1f} ms")
    if light_runs:
        plots.append(plot_light_ttft(light_runs, out / "plots" / "fairness_light_ttft_cdf.png"))
    results["plots"] = [str(path) for path in plots]
    (out / "serve_goodput.json").write_text(json.dumps(results, indent=2))
    print_summary(results, judged, out)
    return 0


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_goodput_table(summary: dict, target: str) -> None:
    """One line per SLO factor: every sweep's max goodput and its ratio to prefill-first."""
    label = target.upper()
    what = "TPOT" if target == "tpot" else "TBT (each request's largest gap between tokens)"
    print(f"\nmax goodput (req/s) by {what} SLO factor (x calm p50 TPOT {summary['calm_p50_tpot_ms']:.2f} ms; "
          f"TTFT SLO {summary['ttft_slo_factor']:g} x calm p50 TTFT {summary['calm_p50_ttft_ms']:.1f} ms):")
    for row in summary["by_factor"]:
        cells = "  ".join(f"{name} {_fmt(value)}" for name, value in row["max_goodput"].items())
        ratios = "  ".join(f"{name}/prefill-first {_fmt(value)}x" for name, value in row["ratio_vs_prefill_first"].items())
        print(f"  factor {row[f'{target}_slo_factor']:>4g} ({label} <= {row[f'{target}_slo_ms']:6.2f} ms): {cells}  |  "
              f"{ratios}")


def summary_line(summary: dict, target: str, factor: float) -> str:
    """``SUMMARY TPOT SLO 9.94 ms: max goodput ...; ratios`` for the row of ``factor``."""
    chosen = next(row for row in summary["by_factor"] if row[f"{target}_slo_factor"] == factor)
    best, ratios = chosen["max_goodput"], chosen["ratio_vs_prefill_first"]
    return (f"SUMMARY {target.upper()} SLO {chosen[f'{target}_slo_ms']:.2f} ms: max goodput " +
            ", ".join(f"{name} {_fmt(value)} req/s" for name, value in best.items()) + "; " +
            ", ".join(f"{name}/prefill-first {_fmt(value)}x" for name, value in ratios.items()))


def print_summary(results: dict, judged: dict[str, SweepReport], out: Path) -> None:
    print("\n" + "=" * 100)
    for name, report in judged.items():
        print(report.table(name, show_tbt=True))
    print_goodput_table(results["goodput"], "tpot")
    print_goodput_table(results["goodput_tbt"], "tbt")
    if "solo" in results["fairness"]:
        print_fairness(results["fairness"])
    print("\njoules per output token vs rate (server-reported):")
    width = max(17, *(len(name) for name in results["energy"]))
    for name, rows in results["energy"].items():
        print(f"  {name:<{width}} " + "  ".join(f"{row['rate']}: {_fmt(row['joules_per_output_token'], '.4f')}"
                                               for row in rows))
    # the TPOT line stays last: runs are read from the tail of their output
    print("\n" + summary_line(results["goodput_tbt"], "tbt", results["tbt_slo_factor"]))
    print(summary_line(results["goodput"], "tpot", results["tpot_slo_factor"]) +
          f"; wall {time.perf_counter() - STARTED:.0f} s; results in {out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
