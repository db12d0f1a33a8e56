"""Serving metrics: per-request latencies, percentiles, goodput against an SLO, energy and cost.

``SLO`` is shared with ``joule bench serve`` (global, per tenant and per request targets).

Definitions follow vLLM's benchmark: TTFT = first token - arrival; TPOT = (last
token - first token) / (output tokens - 1); ITL = gaps between consecutive
tokens of a request; e2e = last token - arrival. Goodput (DistServe) counts
requests that meet every SLO; an SLO also names the share of requests that
must meet it (attainment) for a configuration to count as serving the load.
TBT (time between tokens, Sarathi-Serve) is a request's largest ITL: a stall
behind another prompt's prefill that an average TPOT hides.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds (None: no target). ``tbt_s`` bounds a request's largest gap between two
    consecutive tokens; it comes after ``attainment`` so positional ``SLO(ttft, tpot, attainment)`` still works."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    attainment: float = 0.9
    tbt_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "tbt_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"SLO {name} must be positive, got {value}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"SLO attainment must be in (0, 1], got {self.attainment}")

    @classmethod
    def parse(cls, text: str) -> SLO:
        """``"ttft=0.5,tpot=0.05[,tbt=0.2][,attainment=0.9]"`` (seconds; ``ms`` suffix allowed)."""
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in ("ttft", "tpot", "tbt", "attainment"):
                raise ValueError(f"bad SLO item {item!r}: expected ttft=SECONDS, tpot=SECONDS, tbt=SECONDS or "
                                 "attainment=FRACTION")
            scale = 1e-3 if value.endswith("ms") else 1.0
            try:
                number = float(value.removesuffix("ms").removesuffix("s")) * scale
            except ValueError:
                raise ValueError(f"bad SLO value in {item!r}") from None
            values["attainment" if key == "attainment" else f"{key}_s"] = number
        return cls(**values)

    def met(self, ttft: float, tpot: float, max_itl: float | None = None) -> bool:
        """Whether a request's TTFT, TPOT and largest gap between tokens meet the targets. A TBT target needs
        ``max_itl`` (ValueError without it) rather than passing silently."""
        if self.tbt_s is not None and max_itl is None:
            raise ValueError("SLO tbt_s is set but the request's largest gap between tokens (max_itl) is unknown")
        return ((self.ttft_s is None or ttft <= self.ttft_s) and (self.tpot_s is None or tpot <= self.tpot_s)
                and (self.tbt_s is None or max_itl <= self.tbt_s))

    @property
    def is_set(self) -> bool:
        return self.ttft_s is not None or self.tpot_s is not None or self.tbt_s is not None

    def merged_over(self, default: SLO) -> SLO:
        """These targets, falling back to ``default``'s where unset (a tenant's SLO over the global one)."""
        return SLO(self.ttft_s if self.ttft_s is not None else default.ttft_s,
                   self.tpot_s if self.tpot_s is not None else default.tpot_s, self.attainment,
                   self.tbt_s if self.tbt_s is not None else default.tbt_s)


@dataclass
class RequestRecord:
    request_id: str
    arrival_time: float
    prompt_len: int
    replica: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_output_tokens: int = 0
    finish_time: float | None = None
    max_itl: float = 0.0  # largest gap between consecutive tokens, for a TBT SLO
    tenant: str | None = None
    slo: SLO | None = None  # its own targets (its tenant's), over the run's

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float:
        if self.num_output_tokens < 2:
            return 0.0
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def e2e(self) -> float:
        return self.finish_time - self.arrival_time


@dataclass
class ReplicaTotals:
    hardware: str
    hourly_usd: float
    idle_watts: float
    busy_seconds: float = 0.0
    busy_joules: float = 0.0
    num_steps: int = 0
    num_preemptions: int = 0


def percentiles(values, points=PERCENTILES) -> dict[str, float]:
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return {f"p{p}": math.nan for p in points} | {"mean": math.nan}
    result = {f"p{p}": float(np.percentile(data, p)) for p in points}
    result["mean"] = float(data.mean())
    return result


@dataclass
class SimulationResult:
    records: list[RequestRecord]
    replicas: list[ReplicaTotals]
    itl: array = field(default_factory=lambda: array("d"))

    @property
    def finished(self) -> list[RequestRecord]:
        return [record for record in self.records if record.finish_time is not None]

    @property
    def makespan(self) -> float:
        """Seconds from the first arrival to the last finish."""
        finished = self.finished
        if not finished:
            return 0.0
        return max(r.finish_time for r in finished) - min(r.arrival_time for r in self.records)

    @property
    def output_tokens(self) -> int:
        return sum(record.num_output_tokens for record in self.records)

    def energy_joules(self) -> float:
        """Busy energy from the step model plus idle power for each replica's idle time in the run."""
        span = self.makespan
        return sum(r.busy_joules + r.idle_watts * max(span - r.busy_seconds, 0.0) for r in self.replicas)

    def cost_usd(self) -> float:
        return sum(r.hourly_usd for r in self.replicas) * self.makespan / 3600.0

    def summary(self, slo: SLO | None = None) -> dict:
        finished = self.finished
        span = self.makespan or math.nan
        tokens = self.output_tokens
        result = {
            "num_requests": len(self.records),
            "num_finished": len(finished),
            "num_replicas": len(self.replicas),
            "hardware": [r.hardware for r in self.replicas],
            "makespan_s": span,
            "request_throughput": len(finished) / span,
            "output_throughput": tokens / span,
            "total_token_throughput": (tokens + sum(r.prompt_len for r in finished)) / span,
            "ttft_s": percentiles([r.ttft for r in finished]),
            "tpot_s": percentiles([r.tpot for r in finished if r.num_output_tokens > 1]),
            "itl_s": percentiles(self.itl),
            "e2e_s": percentiles([r.e2e for r in finished]),
            "num_steps": sum(r.num_steps for r in self.replicas),
            "num_preemptions": sum(r.num_preemptions for r in self.replicas),
            "energy_j": self.energy_joules(),
            "joules_per_output_token": self.energy_joules() / tokens if tokens else math.nan,
            "cost_usd": self.cost_usd(),
            "usd_per_million_output_tokens": self.cost_usd() / tokens * 1e6 if tokens else math.nan,
        }
        own_targets = any(r.slo is not None for r in self.records)
        if slo is not None or own_targets:
            run_slo = slo or SLO()
            good = [r for r in finished if _targets(r, run_slo).met(r.ttft, r.tpot, r.max_itl)]
            result["slo"] = {"ttft_s": run_slo.ttft_s, "tpot_s": run_slo.tpot_s, "tbt_s": run_slo.tbt_s,
                             "attainment": run_slo.attainment, "per_tenant": own_targets}
            result["slo_attainment"] = len(good) / len(self.records)
            result["goodput_requests_per_s"] = len(good) / span
            result["goodput_output_tokens_per_s"] = sum(r.num_output_tokens for r in good) / span
            result["meets_slo"] = result["slo_attainment"] >= run_slo.attainment
        tenants = sorted({r.tenant for r in self.records if r.tenant is not None})
        if tenants:
            result["tenants"] = {name: self._tenant_summary(name, slo or SLO()) for name in tenants}
        return result

    def request_rows(self, slo: SLO | None = None) -> list[dict]:
        """One row per request in arrival order, with `joule bench serve --output-json`'s per-request keys (plus
        its id, arrival and replica), so a simulated run can be set beside a measured one request by request."""
        run_slo = slo or SLO()
        rows = []
        for record in sorted(self.records, key=lambda r: r.arrival_time):
            done = record.finish_time is not None
            targets = _targets(record, run_slo)
            rows.append({
                "request_id": record.request_id, "arrival_s": record.arrival_time, "replica": record.replica,
                "tenant": record.tenant, "success": done, "prompt_len": record.prompt_len,
                "output_tokens": record.num_output_tokens,
                "ttft_s": record.ttft if record.first_token_time is not None else None,
                "tpot_s": record.tpot if done else None, "max_itl_s": record.max_itl,
                "e2el_s": record.e2e if done else None,
                "met_slo": targets.met(record.ttft, record.tpot, record.max_itl) if done and targets.is_set else None,
            })
        return rows

    def _tenant_summary(self, tenant: str, run_slo: SLO) -> dict:
        """One tenant's requests: latencies, throughput over the whole run, and SLO attainment (its own targets)."""
        records = [r for r in self.records if r.tenant == tenant]
        finished = [r for r in records if r.finish_time is not None]
        span = self.makespan or math.nan
        summary = {
            "num_requests": len(records), "num_finished": len(finished),
            "output_throughput": sum(r.num_output_tokens for r in finished) / span,
            "ttft_s": percentiles([r.ttft for r in finished]),
            "tpot_s": percentiles([r.tpot for r in finished if r.num_output_tokens > 1]),
            "e2e_s": percentiles([r.e2e for r in finished]),
        }
        if any(_targets(r, run_slo).is_set for r in records):
            good = [r for r in finished if _targets(r, run_slo).met(r.ttft, r.tpot, r.max_itl)]
            summary["slo_attainment"] = len(good) / len(records)
        return summary


def _targets(record: RequestRecord, run_slo: SLO) -> SLO:
    return record.slo.merged_over(run_slo) if record.slo is not None else run_slo
