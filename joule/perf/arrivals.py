"""Timed synthetic workloads for the simulator, built on the generator the serving benchmark uses.

Arrival processes, length distributions and presets live in ``joule.bench.workload`` (one generator for
``joule bench serve`` and ``joule simulate``); this module adds the simulator's ``WorkloadSpec`` text form and
``TimedRequest``s carrying ``SyntheticRequest``s, so a simulated and a measured run can share prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

import joule.bench.workload as shared_workload
from joule.bench.workload import (  # noqa: F401  (re-exported for the simulator's callers)
    ARRIVAL_KINDS,
    LENGTH_KINDS,
    PRESETS,
    LengthDistribution,
    SharedPrefix,
    SyntheticRequest,
    fit_lengths,
    random_token_prompts,
    validate_arrival,
)
from joule.perf.metrics import SLO


@dataclass(frozen=True)
class WorkloadSpec:
    """How many requests, how they arrive and how long they are."""

    num_requests: int = 200
    rate: float = math.inf  # requests per second; inf: all at once (offline)
    arrival: str = "poisson"
    cv: float = 1.0  # gamma: coefficient of variation of the gaps
    input_len: LengthDistribution = field(default_factory=lambda: PRESETS["sharegpt"][0])
    output_len: LengthDistribution = field(default_factory=lambda: PRESETS["sharegpt"][1])
    seed: int = 0
    prefix: SharedPrefix = field(default_factory=SharedPrefix)  # none by default: every prompt its own

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")
        if not self.rate > 0:
            raise ValueError(f"rate must be positive (inf for all at once), got {self.rate}")
        validate_arrival(self.arrival, self.cv)

    @classmethod
    def parse(cls, text: str) -> WorkloadSpec:
        """``"sharegpt,rate=20,num=500"`` or ``"input=fixed:128,output=uniform:16:64,arrival=gamma,cv=2"``;
        ``prefix=N,prefix_groups=G``: prompts open with one of G shared N-token prefixes (then ``input`` tokens)."""
        values: dict = {}
        prefix: dict = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                if key not in PRESETS:
                    raise ValueError(f"unknown workload preset {key!r}; presets: {', '.join(PRESETS)}")
                values["input_len"], values["output_len"] = PRESETS[key]
                continue
            try:
                if key in ("num", "num_requests"):
                    values["num_requests"] = int(value)
                elif key == "rate":
                    values["rate"] = math.inf if value in ("inf", "offline") else float(value)
                elif key in ("arrival", "arrivals"):
                    values["arrival"] = value
                elif key == "cv":
                    values["cv"] = float(value)
                elif key == "seed":
                    values["seed"] = int(value)
                elif key in ("input", "input_len"):
                    values["input_len"] = LengthDistribution.parse(value, "input")
                elif key in ("output", "output_len"):
                    values["output_len"] = LengthDistribution.parse(value, "output")
                elif key in ("prefix", "prefix_len"):
                    prefix["length"] = int(value)
                elif key == "prefix_groups":
                    prefix["groups"] = int(value)
                else:
                    raise ValueError(f"unknown workload key {key!r}")
            except ValueError as error:
                raise ValueError(
                    f"bad workload item {item!r}: {error}. Keys: num, rate, arrival, cv, seed, input, output, "
                    "prefix, prefix_groups"
                ) from None
        if prefix:
            try:
                values["prefix"] = SharedPrefix(**prefix)
            except ValueError as error:
                given = ",".join(f"{'prefix' if key == 'length' else 'prefix_groups'}={value}"
                                 for key, value in prefix.items())
                raise ValueError(f"bad workload items {given!r}: {error}") from None
        return cls(**values)

    def with_rate(self, rate: float) -> WorkloadSpec:
        return replace(self, rate=rate)


@dataclass
class TimedRequest:
    request_id: str
    arrival_time: float
    request: SyntheticRequest
    tenant: str | None = None  # billed for fairness, as the API's ``user``
    slo: SLO | None = None  # its own targets (a tenant's), over any given to the whole run


def tenant_requests(spec: WorkloadSpec, tenants: list, vocab_size: int, max_model_len: int | None = None,
                    default_slo: SLO | None = None) -> list[TimedRequest]:
    """The requests ``joule bench serve`` would send for ``spec`` with these tenants (``TenantSpec``s, its
    ``--tenant``): each tenant's rate or share of ``spec.rate``, lengths and SLOs, built by the very same planner
    (``joule.bench.serve_workload.plan_run``), as token ids."""
    from joule.bench.serve_workload import WorkloadOptions, plan_run

    options = WorkloadOptions(
        num_prompts=spec.num_requests, input_len=spec.input_len, output_len=spec.output_len, arrival=spec.arrival,
        burstiness=spec.cv, max_model_len=max_model_len, token_id_range=(0, vocab_size), seed=spec.seed,
        prefix=spec.prefix)
    planned = plan_run(options, tenants, spec.rate, default_slo or SLO())
    return [TimedRequest(f"{request.tenant or 'request'}-{index}", request.send_at,
                         SyntheticRequest(list(request.prompt), request.output_len), request.tenant,
                         request.slo if request.slo.is_set else None)
            for index, request in enumerate(planned)]


def arrival_times(spec: WorkloadSpec, rng: np.random.Generator) -> np.ndarray:
    return shared_workload.arrival_times(spec.num_requests, spec.rate, spec.arrival, spec.cv, rng)


def generate(spec: WorkloadSpec, vocab_size: int, max_model_len: int | None = None) -> list[TimedRequest]:
    """The workload's requests in arrival order; prompts are random token ids, behind a shared prefix if the spec
    has one (drawn after everything else, so a spec without one gives the requests it always gave).

    With ``max_model_len`` lengths are trimmed so every request fits (prompt + output <= limit).
    """
    rng = np.random.default_rng(spec.seed)
    times = arrival_times(spec, rng)
    inputs = spec.input_len.sample(rng, spec.num_requests)
    outputs = spec.output_len.sample(rng, spec.num_requests)
    inputs, outputs = fit_lengths(inputs, outputs, max_model_len, spec.prefix.length)
    prompts = random_token_prompts(inputs, 0, vocab_size, rng)
    prompts = spec.prefix.apply(prompts, spec.prefix.prefixes(0, vocab_size, rng))
    return [
        TimedRequest(f"sim-{index}", float(times[index]), SyntheticRequest(prompts[index], int(outputs[index])))
        for index in range(spec.num_requests)
    ]
