"""`joule plan`: the cheapest (or most energy-efficient) deployment that meets a latency SLO.

For every GPU kind and engine setting (max_num_batched_tokens x max_num_seqs)
the planner finds one replica's capacity: the highest Poisson request rate at
which the SLO attainment still holds, by bisection over simulated runs. A
target rate R then needs ceil(R / capacity) replicas of that kind. Mixed plans
(as Mélange does) pair two kinds, routing by capacity, when that is cheaper.
The best candidates are verified by simulating the whole cluster at R; a plan
that misses the SLO gets one more replica of its best kind and is re-checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from joule.model.config import ModelConfig
from joule.perf.arrivals import WorkloadSpec, generate
from joule.perf.hardware import CATALOG, get_hardware, with_price
from joule.perf.metrics import SLO
from joule.perf.simulator import ClusterSimulator, ReplicaConfig

OBJECTIVES = ("cost", "energy")
DEFAULT_BATCHED_TOKENS = (2048, 8192)
DEFAULT_MAX_SEQS = (256,)


@dataclass(frozen=True)
class EngineSettings:
    max_num_batched_tokens: int
    max_num_seqs: int


@dataclass
class KindCapacity:
    """One replica of a kind with some settings: how much load it carries within the SLO."""

    hardware: str
    settings: EngineSettings
    requests_per_s: float
    joules_per_token: float  # at the capacity load
    hourly_usd: float


@dataclass
class Plan:
    counts: dict[str, int]  # hardware -> replicas
    settings: EngineSettings
    capacities: dict[str, float]
    hourly_usd: float
    usd_per_million_tokens: float
    joules_per_token: float
    verified: dict = field(default_factory=dict)  # cluster simulation summary at the target rate

    @property
    def label(self) -> str:
        kinds = " + ".join(f"{count}x {name}" for name, count in self.counts.items())
        return f"{kinds} (tokens={self.settings.max_num_batched_tokens}, seqs={self.settings.max_num_seqs})"

    @property
    def meets_slo(self) -> bool:
        return bool(self.verified.get("meets_slo", False))

    def to_dict(self) -> dict:
        return {
            "plan": self.label, "counts": self.counts, "settings": vars(self.settings),
            "capacity_requests_per_s": self.capacities, "hourly_usd": self.hourly_usd,
            "usd_per_million_output_tokens": self.usd_per_million_tokens, "joules_per_output_token": self.joules_per_token,
            "meets_slo": self.meets_slo, "verified": self.verified,
        }


@dataclass
class PlannerConfig:
    hardware: tuple[str, ...] = tuple(name for name, spec in CATALOG.items() if spec.kind == "gpu")
    batched_tokens: tuple[int, ...] = DEFAULT_BATCHED_TOKENS
    max_seqs: tuple[int, ...] = DEFAULT_MAX_SEQS
    objective: str = "cost"
    allow_mixed: bool = True
    search_requests: int = 150  # requests per capacity probe
    bisection_steps: int = 6
    verify_top: int = 3
    prices: dict[str, float] = field(default_factory=dict)
    profile_paths: dict[str, str] = field(default_factory=dict)
    max_model_len: int = 4096
    # Shipped calibrated profiles measure Joule's own host overheads on that device; kinds without
    # one get catalog defaults. False gives every kind the defaults (like-for-like hardware).
    use_calibrated_profiles: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")


class Planner:
    def __init__(self, model: ModelConfig, workload: WorkloadSpec, slo: SLO, config: PlannerConfig | None = None,
                 log=lambda message: None):
        if math.isinf(workload.rate):
            raise ValueError("planning needs a target request rate: give the workload a rate=REQ_PER_S")
        self.model = model
        self.workload = workload
        self.slo = slo
        self.config = config or PlannerConfig()
        self.log = log
        self.mean_output_tokens = self._mean_output_tokens()

    def _mean_output_tokens(self) -> float:
        requests = generate(self.workload, self.model.vocab_size, self.config.max_model_len)
        return sum(r.request.output_len for r in requests) / len(requests)

    def replica_config(self, hardware: str, settings: EngineSettings) -> ReplicaConfig:
        replica = ReplicaConfig.for_hardware(
            hardware, self.config.profile_paths.get(hardware), calibrated=self.config.use_calibrated_profiles,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens, max_model_len=self.config.max_model_len,
        )
        price = self.config.prices.get(replica.hardware.name)
        if price is not None:
            replica.hardware = with_price(replica.hardware, price)
        return replica

    def _probe(self, replica: ReplicaConfig, rate: float, num_replicas: int = 1, num_requests: int | None = None,
               weights=None, replicas=None) -> dict:
        spec = WorkloadSpec(num_requests or self.config.search_requests, rate, self.workload.arrival, self.workload.cv,
                            self.workload.input_len, self.workload.output_len, self.workload.seed)
        requests = generate(spec, self.model.vocab_size, self.config.max_model_len)
        cluster = replicas or [replica] * num_replicas
        return ClusterSimulator(self.model, cluster, router_weights=weights).run(requests).summary(self.slo)

    def capacity(self, hardware: str, settings: EngineSettings) -> KindCapacity | None:
        """Highest per-replica rate meeting the SLO; None if the model does not fit or even light load fails."""
        try:
            replica = self.replica_config(hardware, settings)
            replica.kv_blocks(self.model)
        except ValueError as error:
            self.log(f"  skip {hardware}: {error}")
            return None
        offline = self._probe(replica, math.inf)
        high = offline["request_throughput"] * 1.2
        low = high * 0.02
        light = self._probe(replica, low)
        if not light["meets_slo"]:
            self.log(f"  {hardware} {settings}: misses the SLO even at {low:.3g} req/s")
            return None
        best = light
        for _ in range(self.config.bisection_steps):
            middle = math.sqrt(low * high)
            summary = self._probe(replica, middle)
            if summary["meets_slo"]:
                low, best = middle, summary
            else:
                high = middle
        self.log(f"  {hardware} {settings}: {low:.3g} req/s per replica")
        return KindCapacity(hardware, settings, low, best["joules_per_output_token"], replica.hardware.hourly_usd)

    def _plan_from(self, counts: dict[str, int], caps: dict[str, KindCapacity], settings: EngineSettings) -> Plan:
        hourly = sum(caps[name].hourly_usd * count for name, count in counts.items())
        tokens_per_hour = self.workload.rate * self.mean_output_tokens * 3600
        served = {name: min(count * caps[name].requests_per_s, self.workload.rate) for name, count in counts.items()}
        # Energy estimate before verification: each kind's J/token at capacity, weighted by the load it takes.
        total = sum(served.values()) or 1.0
        joules = sum(caps[name].joules_per_token * share / total for name, share in served.items())
        return Plan(dict(counts), settings, {name: caps[name].requests_per_s for name in counts}, hourly,
                    hourly / tokens_per_hour * 1e6, joules)

    def candidates(self, capacities: list[KindCapacity]) -> list[Plan]:
        rate = self.workload.rate
        plans = []
        by_settings: dict[EngineSettings, dict[str, KindCapacity]] = {}
        for cap in capacities:
            by_settings.setdefault(cap.settings, {})[cap.hardware] = cap
        for settings, caps in by_settings.items():
            for name, cap in caps.items():
                plans.append(self._plan_from({name: math.ceil(rate / cap.requests_per_s)}, caps, settings))
            if not self.config.allow_mixed:
                continue
            names = sorted(caps)
            for i, first in enumerate(names):
                for second in names[i + 1:]:
                    for count in range(1, math.ceil(rate / caps[first].requests_per_s)):
                        rest = rate - count * caps[first].requests_per_s
                        other = math.ceil(rest / caps[second].requests_per_s)
                        if other >= 1:
                            plans.append(self._plan_from({first: count, second: other}, caps, settings))
        return plans

    def _key(self, plan: Plan):
        if self.config.objective == "energy":
            return (plan.joules_per_token, plan.hourly_usd)
        return (plan.hourly_usd, plan.joules_per_token)

    def verify(self, plan: Plan, caps: dict[str, KindCapacity], attempts: int = 3) -> Plan:
        """Simulate the whole cluster at the target rate; add replicas of the best kind until the SLO holds."""
        for _ in range(attempts):
            replicas, weights = [], []
            for name, count in plan.counts.items():
                config = self.replica_config(name, plan.settings)
                replicas += [config] * count
                weights += [plan.capacities[name]] * count
            num_requests = max(self.workload.num_requests, 40 * len(replicas))
            summary = self._probe(replicas[0], self.workload.rate, num_requests=num_requests, weights=weights,
                                  replicas=replicas)
            plan.verified = summary
            plan.joules_per_token = summary["joules_per_output_token"]
            if summary["meets_slo"]:
                return plan
            best = max(plan.counts, key=lambda name: plan.capacities[name] / caps[name].hourly_usd)
            counts = dict(plan.counts)
            counts[best] += 1
            plan = self._plan_from(counts, caps, plan.settings)
        return plan

    def run(self) -> list[Plan]:
        """Plans sorted by the objective, verified ones that meet the SLO first."""
        capacities = []
        for hardware in self.config.hardware:
            for tokens in self.config.batched_tokens:
                for seqs in self.config.max_seqs:
                    cap = self.capacity(get_hardware(hardware).name, EngineSettings(tokens, seqs))
                    if cap is not None:
                        capacities.append(cap)
        if not capacities:
            raise ValueError("no hardware in the search meets the SLO even at light load; relax the SLO")
        plans = sorted(self.candidates(capacities), key=self._key)
        caps_by_settings: dict[EngineSettings, dict[str, KindCapacity]] = {}
        for cap in capacities:
            caps_by_settings.setdefault(cap.settings, {})[cap.hardware] = cap
        verified = [self.verify(plan, caps_by_settings[plan.settings]) for plan in plans[: self.config.verify_top]]
        verified.sort(key=lambda plan: (not plan.meets_slo, *self._key(plan)))
        return verified + plans[self.config.verify_top:]
