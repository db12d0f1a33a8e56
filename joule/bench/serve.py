"""`joule bench serve`: open-loop load against any OpenAI-compatible server (Joule, vLLM, ...).

Each run sends requests at one rate (``--request-rate 1,2,4,inf`` sweeps: one run per rate) as Poisson or
gamma arrivals (``--burstiness`` is the gaps' coefficient of variation), with lengths drawn from a
distribution or taken from a ShareGPT file, from one or several tenants with their own traffic and SLOs
(see ``joule.bench.serve_workload``). Every request is a streaming completion with ``ignore_eos``. Results per
run and per tenant: TTFT/TPOT/ITL/E2E percentiles, throughput, goodput (DistServe: requests/s meeting all their
SLOs), SLO attainment and the joules the server reported; JSON, plots, and a table printed last.

SLOs (``--slo``, tenants' keys): ``ttft``, ``tpot`` (the average gap) and ``tbt``, a bound on a request's largest
gap between two tokens (Sarathi-Serve's time-between-tokens: prefill stalls that the average hides). ``tbt`` is
judged here only: servers get ``ttft_slo_ms`` / ``tpot_slo_ms``, there is no field for it.

``--dataset`` reads a ShareGPT JSON file: each conversation's first human turn is the prompt and the first gpt
turn after it sets the output length. Lengths are counted by the server's ``/tokenize`` (vLLM and Joule have
it); a server without it gets lengths in whitespace-separated words, and the JSON's ``dataset_lengths`` says
which. Conversations that do not fit ``--max-model-len`` are dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace

from joule.bench.serve_client import (
    first_model,
    request_payload,
    parse_server_counters,
    scrape_metrics,
    send_request,
    token_counter,
)
from joule.bench.serve_metrics import (
    BenchmarkMetrics,
    RequestResult,
    compute_metrics,
    format_rate,
    format_sweep_table,
    format_table,
)
from joule.bench.serve_workload import (
    PlannedRequest,
    TenantSpec,
    WorkloadOptions,
    dataset_entries,
    parse_rates,
    plan_run,
    read_sharegpt,
    word_count,
)
from joule.bench.server_pauses import format_pauses, summarize_pauses
from joule.bench.workload import ARRIVAL_KINDS, LengthDistribution, SharedPrefix
from joule.perf.metrics import SLO


@dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None
    api_key: str | None = None
    rates: list[float] = field(default_factory=lambda: [float("inf")])
    workload: WorkloadOptions = field(default_factory=WorkloadOptions)
    tenants: list[TenantSpec] = field(default_factory=list)
    slo: SLO = field(default_factory=SLO)
    send_slo: bool | None = None  # None: send the SLO fields when any SLO is set
    dataset: str | None = None
    max_concurrency: int | None = None
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    warmup: bool = True

    def __post_init__(self) -> None:
        if not self.rates:
            raise ValueError("rates needs at least one request rate")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.dataset and any(t.input_len or t.output_len for t in self.tenants):
            raise ValueError("tenant input=/output= lengths cannot be combined with --dataset (lengths come from it)")
        self.percentiles = sorted(set(self.percentiles) | {50.0, 99.0})

    @property
    def sends_slo(self) -> bool:
        any_slo = self.slo.is_set or any(t.slo.is_set for t in self.tenants)
        return any_slo if self.send_slo is None else self.send_slo


@dataclass
class RunResult:
    """One run of a sweep: the rate, what every request saw and the metrics over all and per tenant."""

    rate: float
    metrics: BenchmarkMetrics
    tenant_metrics: dict[str, BenchmarkMetrics]
    results: list[RequestResult]
    server_energy: dict | None
    errors: list[str]
    server_pauses: dict = field(default_factory=dict)  # a Joule server's GC pauses and loop lag in the run

    def to_dict(self) -> dict:
        return {
            "request_rate": format_rate(self.rate),
            "metrics": self.metrics.to_dict(),
            "vllm_keys": self.metrics.to_vllm_keys(),
            "tenants": {name: metrics.to_dict() for name, metrics in self.tenant_metrics.items()},
            "server_energy": self.server_energy,
            "server_pauses": self.server_pauses,
            "errors": self.errors,
            "requests": [
                {"tenant": r.tenant, "success": r.success, "prompt_len": r.prompt_len, "output_tokens": r.output_tokens,
                 "ttft_s": r.ttft, "tpot_s": r.tpot, "max_itl_s": r.max_itl, "e2el_s": r.latency,
                 "energy_joules": r.energy_joules, "cached_tokens": r.cached_tokens,
                 "met_slo": r.meets_slo() if r.has_slo else None}
                for r in self.results
            ],
        }


@dataclass
class SweepReport:
    config: dict
    runs: list[RunResult]

    def to_dict(self) -> dict:
        return {"config": self.config, "runs": [run.to_dict() for run in self.runs]}

    def table(self, label: str = "", show_tbt: bool | None = None) -> str:
        """The sweep table; ``show_tbt`` adds the largest-gap columns (None: when a request had a TBT SLO)."""
        rows = []
        for run in self.runs:
            rows.append((label or "all", run.rate, run.metrics))
            rows += [(f"{label + '/' if label else ''}{name}", run.rate, m) for name, m in run.tenant_metrics.items()]
        return format_sweep_table(rows, show_tbt)

    def with_slo(self, slo: SLO, percentiles: list[float]) -> SweepReport:
        """The same requests judged against ``slo`` (goodput computed after the fact, e.g. from a calibrated
        TPOT or TBT); each run keeps its duration."""
        runs = []
        for run in self.runs:
            results = [replace(r, ttft_slo=slo.ttft_s, tpot_slo=slo.tpot_s, tbt_slo=slo.tbt_s) for r in run.results]
            duration = run.metrics.duration_s
            tenants = {name: compute_metrics([r for r in results if r.tenant == name], duration, percentiles)
                       for name in run.tenant_metrics}
            runs.append(RunResult(run.rate, compute_metrics(results, duration, percentiles), tenants, results,
                                  run.server_energy, run.errors))
        return SweepReport({**self.config, "slo": asdict(slo), "slo_applied_after_the_run": True}, runs)

    def max_goodput(self) -> float | None:
        values = [run.metrics.goodput for run in self.runs if run.metrics.goodput is not None]
        return max(values) if values else None

    @property
    def failed(self) -> int:
        return sum(run.metrics.failed for run in self.runs)


def add_serve_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    parser.add_argument("--endpoint", default="/v1/completions", help="completions endpoint path")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key, if required")
    parser.add_argument("--num-prompts", type=int, default=32, help="requests per run (split over tenants)")
    parser.add_argument("--request-rate", default="inf",
                        help="requests/s, or a comma-separated sweep (1,2,4,inf): one run per rate")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of traffic per run: finite-rate tenants send rate x duration requests")
    parser.add_argument("--arrival", choices=ARRIVAL_KINDS, default="poisson", help="arrival process")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma arrivals: coefficient of variation of the gaps (1 = Poisson, >1 burstier)")
    parser.add_argument("--input-len", default="128",
                        help="prompt tokens: N, uniform:LO:HI, lognormal:MEDIAN:SIGMA[:MAX] or sharegpt")
    parser.add_argument("--output-len", default="64", help="tokens to generate (same forms), sent with ignore_eos")
    parser.add_argument("--dataset", default=None,
                        help="ShareGPT JSON: first human turn as prompt, first gpt turn's length as output length "
                             "(tokens by the server's /tokenize, else words)")
    parser.add_argument("--tenant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="a tenant (repeatable): rate=, share=, num=, input=, output=, ttft=, tpot=, tbt=")
    parser.add_argument("--slo", default="",
                        help="SLOs for every request, e.g. ttft=1.0,tpot=50ms,tbt=200ms (tbt: a request's largest "
                             "gap between two tokens; judged by the client only)")
    parser.add_argument("--send-slo", action=argparse.BooleanOptionalAction, default=None,
                        help="send ttft_slo_ms / tpot_slo_ms with each request (default: when SLOs are set)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="the server's limit: lengths are trimmed so prompt + output fit")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts, lengths and arrival times")
    parser.add_argument("--prompt-kind", choices=["token-ids", "random-text"], default="token-ids")
    parser.add_argument("--shared-prefix-len", type=int, default=0,
                        help="every prompt opens with a shared prefix of this many tokens (words for random-text), "
                             "then --input-len of its own: what the prefix cache serves (as vLLM's "
                             "--random-prefix-len)")
    parser.add_argument("--prefix-groups", type=int, default=1,
                        help="distinct shared prefixes; request n of a tenant takes prefix n %% groups")
    parser.add_argument("--token-id-range", type=int, nargs=2, default=[1000, 10000], metavar=("LOW", "HIGH"),
                        help="token ids are drawn uniformly from [LOW, HIGH): valid for any vocab above HIGH")
    parser.add_argument("--percentiles", default="50,90,99", help="comma-separated latency percentiles")
    parser.add_argument("--no-warmup", action="store_true", help="skip the single warm-up request")
    parser.add_argument("--output-json", default=None, help="write the results here")
    parser.add_argument("--plot-dir", default=None, help="write latency, goodput, CDF and energy plots here")


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    workload = WorkloadOptions(
        num_prompts=args.num_prompts, input_len=LengthDistribution.parse(args.input_len, "input"),
        output_len=LengthDistribution.parse(args.output_len, "output"), arrival=args.arrival,
        burstiness=args.burstiness, duration_s=args.duration, max_model_len=args.max_model_len,
        prompt_kind=args.prompt_kind, token_id_range=tuple(args.token_id_range), seed=args.seed,
        prefix=SharedPrefix(args.shared_prefix_len, args.prefix_groups),
    )
    try:
        percentiles = [float(value) for value in args.percentiles.split(",") if value.strip()]
    except ValueError:
        raise ValueError(f"percentiles must be comma-separated numbers, got {args.percentiles!r}") from None
    return ServeBenchConfig(
        base_url=args.base_url, endpoint=args.endpoint, model=args.model, api_key=args.api_key,
        rates=parse_rates(args.request_rate), workload=workload,
        tenants=[TenantSpec.parse(text) for text in args.tenant], slo=SLO.parse(args.slo),
        send_slo=args.send_slo, dataset=args.dataset, max_concurrency=args.max_concurrency,
        percentiles=percentiles, warmup=not args.no_warmup,
    )


async def _run_one(session, config: ServeBenchConfig, url: str, headers: dict, model: str,
                   planned: list[PlannedRequest], rate: float) -> RunResult:
    base_url = config.base_url.rstrip("/")
    energy_before, pauses_before = parse_server_counters(await scrape_metrics(session, base_url, headers))
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    sends_slo = config.sends_slo

    async def scheduled(request: PlannedRequest) -> RequestResult:
        await asyncio.sleep(max(0.0, start + request.send_at - time.perf_counter()))
        payload = request_payload(model, request, sends_slo)
        if limit is None:
            result = await send_request(session, url, headers, payload, request)
        else:
            async with limit:
                result = await send_request(session, url, headers, payload, request)
        result.tbt_slo = request.slo.tbt_s  # judged here only: the payload has no TBT field
        return result

    start = time.perf_counter()
    results = list(await asyncio.gather(*(scheduled(request) for request in planned)))
    duration = time.perf_counter() - start
    energy_after, pauses_after = parse_server_counters(await scrape_metrics(session, base_url, headers))
    server_energy = None
    if energy_before is not None and energy_after is not None:
        server_energy = {"before": energy_before, "after": energy_after, "delta_joules":
                         energy_after["energy_joules_total"] - energy_before["energy_joules_total"]}
    tenants = sorted({r.tenant for r in results if r.tenant is not None})
    tenant_metrics = {name: compute_metrics([r for r in results if r.tenant == name], duration, config.percentiles)
                      for name in tenants}
    errors = sorted({result.error for result in results if not result.success})[:5]
    return RunResult(rate, compute_metrics(results, duration, config.percentiles), tenant_metrics, results,
                     server_energy, errors, summarize_pauses(pauses_before, pauses_after, duration))


async def run_sweep_async(config: ServeBenchConfig, progress=None) -> SweepReport:
    import aiohttp

    base_url = config.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = config.model or await first_model(session, base_url, headers)
        dataset, length_unit = None, None
        if config.dataset:
            pairs = read_sharegpt(config.dataset)
            count = await token_counter(session, base_url, headers, model)
            if count is None:
                length_unit = "words (the server has no /tokenize)"
                dataset = dataset_entries(pairs, word_count, config.workload.max_model_len)
            else:
                length_unit = "tokens (server /tokenize)"
                lengths = {text: await count(text) for pair in pairs for text in pair}
                dataset = dataset_entries(pairs, lengths.__getitem__, config.workload.max_model_len)
        url = base_url + config.endpoint
        plans = [plan_run(config.workload, config.tenants, rate, config.slo, dataset) for rate in config.rates]
        if config.warmup:
            first = plans[0][0]
            warm = await send_request(session, url, headers, request_payload(model, first, False), first)
            if not warm.success:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
        runs = []
        for rate, planned in zip(config.rates, plans):
            if progress:
                progress(f"rate {format_rate(rate)}: {len(planned)} requests")
            runs.append(await _run_one(session, config, url, headers, model, planned, rate))
    described = {
        "base_url": base_url, "endpoint": config.endpoint, "model": model,
        "request_rates": [format_rate(rate) for rate in config.rates],
        "workload": {**asdict(config.workload), "input_len": config.workload.input_len.describe(),
                     "output_len": config.workload.output_len.describe()},
        "tenants": [{"name": t.name, "rate": None if t.rate is None else format_rate(t.rate), "share": t.share,
                     "num": t.num, "input_len": t.input_len and t.input_len.describe(),
                     "output_len": t.output_len and t.output_len.describe(), "slo": asdict(t.slo)}
                    for t in config.tenants],
        "slo": asdict(config.slo), "send_slo": config.sends_slo, "dataset": config.dataset,
        "dataset_lengths": length_unit, "max_concurrency": config.max_concurrency,
        "client_machine": platform.machine(),
    }
    return SweepReport(described, runs)


def run_sweep(config: ServeBenchConfig, progress=None) -> SweepReport:
    return asyncio.run(run_sweep_async(config, progress))


def write_report(report: SweepReport, output_json: str | None, plot_dir: str | None, title: str = "") -> list[str]:
    """JSON of everything and the plots; returns the paths written."""
    written = []
    if output_json:
        with open(output_json, "w") as handle:
            json.dump(report.to_dict(), handle, indent=2)
        written.append(output_json)
    if plot_dir:
        from joule.bench.serve_plots import plot_report

        written += [str(path) for path in plot_report(report, plot_dir, title)]
    return written


def run_serve_bench(args: argparse.Namespace) -> int:
    """Run the sweep, write JSON and plots, print each run's table then the sweep table; nonzero on failures."""
    config = config_from_args(args)
    report = run_sweep(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    for run in report.runs:
        print(format_table(run.metrics, run.rate, config.max_concurrency))
        if run.server_pauses:
            print(f"server pauses: {format_pauses(run.server_pauses)}")
        for error in run.errors:
            print(f"error: {error}", file=sys.stderr)
    for path in write_report(report, args.output_json, args.plot_dir):
        print(f"wrote {path}", file=sys.stderr)
    print(report.table())
    return 0 if report.failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="joule bench serve", description=__doc__.splitlines()[0])
    add_serve_bench_arguments(parser)
    return run_serve_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
