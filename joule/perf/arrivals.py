"""Timed synthetic workloads for the simulator: arrival processes and length distributions.

Arrivals: ``poisson`` (exponential gaps), ``gamma`` (gaps with a chosen
coefficient of variation: cv > 1 is burstier than Poisson), ``fixed`` (equal
gaps), or every request at t = 0 when the rate is infinite (an offline batch).

Lengths: ``fixed:N``, ``uniform:LO:HI`` (inclusive) or ``lognormal:MEDIAN:SIGMA[:MAX]``.
The ``sharegpt`` preset is a heavy-tailed ShareGPT-like shape, chosen rather
than fitted to the dataset: prompts lognormal with median 256 tokens and sigma
1.0 (p90 ~ 925), outputs lognormal with median 192 and sigma 0.9 (p90 ~ 610),
both clipped to [4, 2048]. Requests are ``joule.bench.workload.SyntheticRequest``s
so a simulated and a measured run can share the very same prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from joule.bench.workload import SyntheticRequest

ARRIVAL_KINDS = ("poisson", "gamma", "fixed")
LENGTH_KINDS = ("fixed", "uniform", "lognormal")
_MIN_LENGTH = 1


@dataclass(frozen=True)
class LengthDistribution:
    kind: str
    low: float  # fixed: the length; uniform: lowest; lognormal: median
    high: float = 0.0  # uniform: highest; lognormal: sigma
    maximum: int = 2048  # lognormal: clip
    minimum: int = 4  # lognormal: clip

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_KINDS:
            raise ValueError(f"length distribution must be one of {', '.join(LENGTH_KINDS)}, got {self.kind!r}")
        if self.low < _MIN_LENGTH:
            raise ValueError(f"{self.kind} length needs a first parameter >= 1, got {self.low}")
        if self.kind == "uniform" and self.high < self.low:
            raise ValueError(f"uniform lengths need LO <= HI, got {self.low}:{self.high}")
        if self.kind == "lognormal" and self.high < 0:
            raise ValueError(f"lognormal sigma must be non-negative, got {self.high}")

    @classmethod
    def parse(cls, text: str) -> "LengthDistribution":
        """``"128"``, ``"fixed:128"``, ``"uniform:32:512"`` or ``"lognormal:256:1.0[:4096]"``."""
        parts = text.strip().split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", float(parts[0]))
            kind, numbers = parts[0], [float(part) for part in parts[1:]]
        except ValueError:
            raise ValueError(f"cannot parse length distribution {text!r}") from None
        if kind == "fixed" and len(numbers) == 1:
            return cls("fixed", numbers[0])
        if kind == "uniform" and len(numbers) == 2:
            return cls("uniform", numbers[0], numbers[1])
        if kind == "lognormal" and len(numbers) in (2, 3):
            maximum = int(numbers[2]) if len(numbers) == 3 else 2048
            return cls("lognormal", numbers[0], numbers[1], maximum=maximum)
        raise ValueError(
            f"cannot parse length distribution {text!r}: expected fixed:N, uniform:LO:HI or lognormal:MEDIAN:SIGMA[:MAX]"
        )

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(count, int(self.low), dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(int(self.low), int(self.high) + 1, size=count)
        values = rng.lognormal(math.log(self.low), self.high, size=count)
        return np.clip(np.rint(values), self.minimum, self.maximum).astype(np.int64)

    def mean(self) -> float:
        """Expected length (ignoring lognormal clipping), for quick capacity estimates."""
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return (self.low + self.high) / 2.0
        return min(self.low * math.exp(self.high**2 / 2.0), float(self.maximum))


PRESETS = {
    "sharegpt": (LengthDistribution("lognormal", 256, 1.0), LengthDistribution("lognormal", 192, 0.9)),
    "fixed": (LengthDistribution("fixed", 128), LengthDistribution("fixed", 64)),
    "uniform": (LengthDistribution("uniform", 100, 1024), LengthDistribution("uniform", 100, 1024)),
}


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

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")
        if not self.rate > 0:
            raise ValueError(f"rate must be positive (inf for all at once), got {self.rate}")
        if self.arrival not in ARRIVAL_KINDS:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVAL_KINDS)}, got {self.arrival!r}")
        if self.cv <= 0:
            raise ValueError(f"cv must be positive, got {self.cv}")

    @classmethod
    def parse(cls, text: str) -> "WorkloadSpec":
        """``"sharegpt,rate=20,num=500"`` or ``"input=fixed:128,output=uniform:16:64,arrival=gamma,cv=2"``."""
        values: dict = {}
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
                    values["input_len"] = LengthDistribution.parse(value)
                elif key in ("output", "output_len"):
                    values["output_len"] = LengthDistribution.parse(value)
                else:
                    raise ValueError(f"unknown workload key {key!r}")
            except ValueError as error:
                raise ValueError(
                    f"bad workload item {item!r}: {error}. Keys: num, rate, arrival, cv, seed, input, output"
                ) from None
        return cls(**values)

    def with_rate(self, rate: float) -> "WorkloadSpec":
        return WorkloadSpec(self.num_requests, rate, self.arrival, self.cv, self.input_len, self.output_len, self.seed)


@dataclass
class TimedRequest:
    request_id: str
    arrival_time: float
    request: SyntheticRequest


def arrival_times(spec: WorkloadSpec, rng: np.random.Generator) -> np.ndarray:
    count = spec.num_requests
    if math.isinf(spec.rate):
        return np.zeros(count)
    mean_gap = 1.0 / spec.rate
    if spec.arrival == "fixed":
        gaps = np.full(count, mean_gap)
    elif spec.arrival == "poisson":
        gaps = rng.exponential(mean_gap, size=count)
    else:  # gamma with mean mean_gap and the asked coefficient of variation
        shape = 1.0 / spec.cv**2
        gaps = rng.gamma(shape, mean_gap / shape, size=count)
    gaps[0] = 0.0  # the first request opens the run
    return np.cumsum(gaps)


def generate(spec: WorkloadSpec, vocab_size: int, max_model_len: int | None = None) -> list[TimedRequest]:
    """The workload's requests in arrival order; prompts are random token ids (no shared prefixes).

    With ``max_model_len`` lengths are trimmed so every request fits (prompt + output <= limit).
    """
    rng = np.random.default_rng(spec.seed)
    times = arrival_times(spec, rng)
    inputs = spec.input_len.sample(rng, spec.num_requests)
    outputs = spec.output_len.sample(rng, spec.num_requests)
    if max_model_len is not None:
        inputs = np.minimum(inputs, max_model_len - 1)
        outputs = np.maximum(np.minimum(outputs, max_model_len - inputs), 1)
    tokens = rng.integers(0, vocab_size, size=int(inputs.sum())).tolist()
    requests, offset = [], 0
    for index in range(spec.num_requests):
        length = int(inputs[index])
        prompt = tokens[offset : offset + length]
        offset += length
        requests.append(TimedRequest(f"sim-{index}", float(times[index]), SyntheticRequest(prompt, int(outputs[index]))))
    return requests
