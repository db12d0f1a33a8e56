"""Serving-benchmark metrics as vLLM's ``bench serve`` defines them, kept pure so they are easy to test.

- TTFT: send to the first streamed chunk carrying a choice.
- ITL: every gap between consecutive such chunks, pooled over requests.
- Largest ITL of a request (``max_itl``): its time-between-tokens (TBT, Sarathi-Serve); a decode stalled behind
  another prompt's whole prefill shows here while an average TPOT hides it.
- TPOT: per request with more than one output token, (latency - TTFT) / (output tokens - 1).
- E2EL: send to the end of the stream.
- Throughputs divide by the benchmark's wall time (first send to last completion).
- Goodput (DistServe): completed requests per second that meet ALL their SLOs (TTFT, TPOT and TBT as above);
  SLO attainment: the share of all sent requests (failed ones miss) that met them.
- Energy: the joules the server reported per request (``usage.energy_joules``); never estimated here. Joules
  per output token divide the reported joules by the output tokens of the requests that reported them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestResult:
    """What one streamed request saw; times in seconds."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    generated_text: str = ""
    error: str = ""
    tenant: str | None = None
    ttft_slo: float | None = None  # seconds
    tpot_slo: float | None = None
    tbt_slo: float | None = None  # bound on the largest gap between two consecutive tokens
    energy_joules: float | None = None  # as reported by the server
    energy_source: str | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, where the server reports it

    @property
    def tpot(self) -> float:
        """(latency - TTFT) / (output tokens - 1); 0 with a single token."""
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0

    @property
    def max_itl(self) -> float:
        """The largest gap between two consecutive streamed tokens; 0 with fewer than two tokens."""
        return max(self.itl, default=0.0)

    @property
    def has_slo(self) -> bool:
        return self.ttft_slo is not None or self.tpot_slo is not None or self.tbt_slo is not None

    def meets_slo(self) -> bool:
        """Completed, and within every SLO it carries."""
        return self.success and (self.ttft_slo is None or self.ttft <= self.ttft_slo) and (
            self.tpot_slo is None or self.tpot <= self.tpot_slo) and (
            self.tbt_slo is None or self.max_itl <= self.tbt_slo)


@dataclass
class LatencyStats:
    """Milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[str, float]

    @classmethod
    def of(cls, seconds: list[float], percentiles: list[float]) -> LatencyStats:
        values = np.asarray(seconds or [0.0], dtype=np.float64) * 1000.0
        return cls(
            mean=float(values.mean()),
            median=float(np.median(values)),
            std=float(values.std()),
            percentiles={f"p{p:g}": float(np.percentile(values, p)) for p in percentiles},
        )


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2el_ms: LatencyStats
    goodput: float | None = None  # requests/s meeting all their SLOs; None when no request had an SLO
    slo_attainment: float | None = None  # share of sent requests meeting all their SLOs
    energy_joules: float | None = None  # sum of the joules the server reported; None when none did
    joules_per_request: float | None = None
    joules_per_output_token: float | None = None
    energy_source: str | None = None
    requests_with_energy: int = 0
    max_itl_ms: LatencyStats | None = None  # per request with 2+ tokens, its largest gap between tokens
    worst_itl_ms: float | None = None  # the largest gap between tokens of any request
    has_tbt_slo: bool = False  # some request carried a TBT SLO: tables show the largest gaps
    # Prompt tokens the server's prefix cache served, over the prompt tokens of the requests that said (None when
    # none did: a server that does not report ``prompt_tokens_details``).
    prefix_cache_hit_rate: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_vllm_keys(self) -> dict:
        """The flat keys vLLM's ``bench serve --save-result`` writes, so results compare side by side."""
        flat = {
            "completed": self.completed, "duration": self.duration_s, "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens, "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput, "total_token_throughput": self.total_token_throughput,
        }
        for name, stats in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("itl", self.itl_ms),
                            ("e2el", self.e2el_ms)):
            flat[f"mean_{name}_ms"], flat[f"median_{name}_ms"], flat[f"std_{name}_ms"] = (
                stats.mean, stats.median, stats.std)
            for label, value in stats.percentiles.items():
                flat[f"{label}_{name}_ms"] = value
        if self.goodput is not None:
            flat["request_goodput"] = self.goodput
        return flat


def compute_metrics(results: list[RequestResult], duration_s: float, percentiles: list[float]) -> BenchmarkMetrics:
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}.")
    done = [result for result in results if result.success]
    input_tokens = sum(result.prompt_len for result in done)
    output_tokens = sum(result.output_tokens for result in done)
    tpots = [r.tpot for r in done if r.output_tokens > 1]
    max_itls = [r.max_itl for r in done if r.itl]
    with_slo = any(result.has_slo for result in results)
    good = sum(1 for result in results if result.meets_slo())
    metered = [r for r in done if r.energy_joules is not None]
    joules = sum(r.energy_joules for r in metered) if metered else None
    metered_tokens = sum(r.output_tokens for r in metered)
    sources = sorted({r.energy_source for r in metered if r.energy_source})
    reported = [r for r in done if r.cached_tokens is not None]
    reported_prompt_tokens = sum(r.prompt_len for r in reported)
    return BenchmarkMetrics(
        completed=len(done),
        failed=len(results) - len(done),
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(done) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        ttft_ms=LatencyStats.of([r.ttft for r in done], percentiles),
        tpot_ms=LatencyStats.of(tpots, percentiles),
        itl_ms=LatencyStats.of([gap for r in done for gap in r.itl], percentiles),
        e2el_ms=LatencyStats.of([r.latency for r in done], percentiles),
        goodput=good / duration_s if with_slo else None,
        slo_attainment=good / len(results) if with_slo and results else None,
        energy_joules=joules,
        joules_per_request=joules / len(metered) if metered else None,
        joules_per_output_token=joules / metered_tokens if metered and metered_tokens else None,
        energy_source=",".join(sources) or None,
        requests_with_energy=len(metered),
        max_itl_ms=LatencyStats.of(max_itls, percentiles),
        worst_itl_ms=1000.0 * max(max_itls) if max_itls else None,
        has_tbt_slo=any(result.tbt_slo is not None for result in results),
        prefix_cache_hit_rate=(sum(r.cached_tokens for r in reported) / reported_prompt_tokens
                               if reported_prompt_tokens else None),
    )


def format_table(metrics: BenchmarkMetrics, request_rate: float, max_concurrency: int | None) -> str:
    """A human-readable summary in the layout of vLLM's ``bench serve``."""
    rows: list[tuple[str, str]] = [
        ("Request rate (req/s)", "inf" if request_rate == float("inf") else f"{request_rate:g}"),
        ("Max concurrency", str(max_concurrency) if max_concurrency else "unbounded"),
        ("Successful requests", str(metrics.completed)),
        ("Failed requests", str(metrics.failed)),
        ("Benchmark duration (s)", f"{metrics.duration_s:.2f}"),
        ("Total input tokens", str(metrics.total_input_tokens)),
        ("Total generated tokens", str(metrics.total_output_tokens)),
        ("Request throughput (req/s)", f"{metrics.request_throughput:.2f}"),
        ("Output token throughput (tok/s)", f"{metrics.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{metrics.total_token_throughput:.2f}"),
    ]
    if metrics.goodput is not None:
        rows += [("Request goodput (req/s)", f"{metrics.goodput:.2f}"),
                 ("SLO attainment (%)", f"{100 * metrics.slo_attainment:.1f}")]
    if metrics.prefix_cache_hit_rate is not None:
        rows.append(("Prefix cache hit rate (%)", f"{100 * metrics.prefix_cache_hit_rate:.1f}"))
    rows.append(("Joules per output token", _or_none(metrics.joules_per_output_token, ".4f")))
    rows.append(("Joules per request", _or_none(metrics.joules_per_request, ".3f")))
    lines = ["{:=^60}".format(" Serving Benchmark Result ")]
    lines += [f"{name:<44}{value:>16}" for name, value in rows]
    for title, stats in (("Time to First Token", metrics.ttft_ms), ("Time per Output Token (excl. 1st token)",
                         metrics.tpot_ms), ("Inter-token Latency", metrics.itl_ms), ("End-to-end Latency",
                         metrics.e2el_ms)):
        lines.append("{:-^60}".format(f" {title} "))
        short = {"Time to First Token": "TTFT", "Inter-token Latency": "ITL", "End-to-end Latency": "E2EL"}
        label = short.get(title, "TPOT")
        lines.append(f"{'Mean ' + label + ' (ms)':<44}{stats.mean:>16.2f}")
        if "p50" not in stats.percentiles:
            lines.append(f"{'Median ' + label + ' (ms)':<44}{stats.median:>16.2f}")
        for name, value in stats.percentiles.items():
            lines.append(f"{name.upper() + ' ' + label + ' (ms)':<44}{value:>16.2f}")
    if metrics.max_itl_ms is not None and metrics.worst_itl_ms is not None:
        lines.append("{:-^60}".format(" Largest Gap Between Tokens per Request (TBT) "))
        lines.append(f"{'Median TBT (ms)':<44}{metrics.max_itl_ms.median:>16.2f}")
        if "p99" in metrics.max_itl_ms.percentiles:
            lines.append(f"{'P99 TBT (ms)':<44}{metrics.max_itl_ms.percentiles['p99']:>16.2f}")
        lines.append(f"{'Max TBT (ms)':<44}{metrics.worst_itl_ms:>16.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)


def _or_none(value: float | None, spec: str) -> str:
    return "none reported" if value is None else format(value, spec)


def format_rate(rate: float) -> str:
    return "inf" if rate == float("inf") else f"{rate:g}"


def format_sweep_table(rows: list[tuple[str, float, BenchmarkMetrics]], show_tbt: bool | None = None) -> str:
    """One line per (label, rate): throughput, goodput, attainment, p50/p99 TTFT and TPOT, J per token; with
    ``show_tbt`` (None: when any request carried a TBT SLO), also the p99 and max over requests of their largest
    gap between tokens."""
    if show_tbt is None:
        show_tbt = any(m.has_tbt_slo for _, _, m in rows)
    width = min(32, max([19, *(len(label) + 1 for label, _, _ in rows)]))  # run labels up to 31 characters
    header = (f"{'run':<{width}}{'rate':>7}{'done':>6}{'fail':>5}{'req/s':>8}{'good/s':>8}{'SLO%':>7}"
              f"{'TTFT p50':>10}{'p99':>9}{'TPOT p50':>10}{'p99':>8}"
              + (f"{'TBT p99':>9}{'max':>9}" if show_tbt else "") + f"{'J/tok':>9}")
    lines = [header, "-" * len(header)]
    for label, rate, m in rows:
        p99_ttft = m.ttft_ms.percentiles.get("p99", float("nan"))
        p99_tpot = m.tpot_ms.percentiles.get("p99", float("nan"))
        tbt = ""
        if show_tbt:
            p99_tbt = m.max_itl_ms.percentiles.get("p99") if m.max_itl_ms else None
            tbt = f"{_or_dash(p99_tbt, '.1f'):>9}{_or_dash(m.worst_itl_ms, '.1f'):>9}"
        lines.append(
            f"{label[:width - 1]:<{width}}{format_rate(rate):>7}{m.completed:>6}{m.failed:>5}"
            f"{m.request_throughput:>8.2f}"
            f"{_or_dash(m.goodput, '.2f'):>8}{_or_dash(m.slo_attainment and 100 * m.slo_attainment, '.1f'):>7}"
            f"{m.ttft_ms.median:>10.1f}{p99_ttft:>9.1f}{m.tpot_ms.median:>10.2f}{p99_tpot:>8.2f}{tbt}"
            f"{_or_dash(m.joules_per_output_token, '.4f'):>9}"
        )
    lines.append("(latencies in ms; good/s: requests/s meeting all their SLOs; J/tok: server-reported joules"
                 + ("; TBT: each request's largest gap between tokens" if show_tbt else "") + ")")
    return "\n".join(lines)


def _or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
