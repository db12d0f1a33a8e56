"""Workloads shared by every benchmark and the simulator: seeded prompts, arrival processes, length distributions.

One generator serves ``joule bench serve`` (HTTP load), ``joule bench throughput`` and ``joule simulate``, so a
measured and a simulated run can see the very same requests.

Arrivals: ``poisson`` (exponential gaps), ``gamma`` (gaps with a chosen coefficient of variation, the
*burstiness*: cv > 1 is burstier than Poisson, cv < 1 smoother), ``fixed`` (equal gaps), or every request at
t = 0 when the rate is infinite (an offline batch).

Lengths: ``N`` or ``fixed:N``, ``uniform:LO:HI`` (inclusive) or ``lognormal:MEDIAN:SIGMA[:MAX]``. The
``sharegpt`` preset is a heavy-tailed ShareGPT-like shape, chosen rather than fitted to the dataset: prompts
lognormal with median 256 tokens and sigma 1.0 (p90 ~ 925), outputs lognormal with median 192 and sigma 0.9
(p90 ~ 610), both clipped to [4, 2048].

Shared prefixes (``SharedPrefix``): every prompt may open with one of a few common prefixes (a system prompt, a
few-shot preamble), as vLLM's ``--random-prefix-len`` and SGLang's generated-shared-prefix workloads do, so the
engine's prefix cache has something to find. The prompt's sampled length is the part after the prefix.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

ARRIVAL_KINDS = ("poisson", "gamma", "fixed")
LENGTH_KINDS = ("fixed", "uniform", "lognormal")


@dataclass
class SyntheticRequest:
    prompt_token_ids: list[int]
    output_len: int


def fixed_length_workload(
    num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0, avoid_ids=frozenset()
) -> list[SyntheticRequest]:
    """Random token prompts of one length; ids in ``avoid_ids`` (special tokens) are skipped."""
    generator = random.Random(seed)
    candidates = [token for token in range(vocab_size) if token not in avoid_ids] if avoid_ids else None
    return [SyntheticRequest(_random_prompt(generator, input_len, vocab_size, candidates), output_len)
            for _ in range(num_prompts)]


def _random_prompt(generator: random.Random, length: int, vocab_size: int, candidates: list[int] | None) -> list[int]:
    """``length`` token ids drawn from ``candidates`` (when some ids are to be avoided) or the whole vocabulary."""
    if candidates is not None:
        return [generator.choice(candidates) for _ in range(length)]
    return [generator.randrange(vocab_size) for _ in range(length)]


def uniform_length_workload(
    num_prompts: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0
) -> list[SyntheticRequest]:
    """Input and output lengths uniform in [min_len, max_len] (nano-vllm's published workload)."""
    generator = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        input_len = generator.randint(min_len, max_len)
        output_len = generator.randint(min_len, max_len)
        requests.append(SyntheticRequest([generator.randrange(vocab_size) for _ in range(input_len)], output_len))
    return requests


def distribution_workload(
    num_prompts: int, input_len: LengthDistribution, output_len: LengthDistribution, vocab_size: int, seed: int = 0,
    avoid_ids=frozenset(),
) -> list[SyntheticRequest]:
    """Random token prompts with lengths drawn from ``input_len`` and ``output_len`` (``joule bench throughput``).

    Fixed lengths give ``fixed_length_workload``'s requests, and equal uniform ranges with no ids to avoid give
    ``uniform_length_workload``'s (nano-vllm's workload, as the GPU benchmarks draw it), so the CLI and the
    scripts run the very same prompts; other shapes draw lengths from a seeded numpy generator.
    """
    if input_len.kind == "fixed" and output_len.kind == "fixed":
        return fixed_length_workload(num_prompts, int(input_len.low), int(output_len.low), vocab_size, seed, avoid_ids)
    if input_len.kind == output_len.kind == "uniform" and input_len == output_len and not avoid_ids:
        return uniform_length_workload(num_prompts, int(input_len.low), int(input_len.high), vocab_size, seed)
    lengths = np.random.default_rng(seed)
    inputs, outputs = input_len.sample(lengths, num_prompts), output_len.sample(lengths, num_prompts)
    generator = random.Random(seed)
    candidates = [token for token in range(vocab_size) if token not in avoid_ids] if avoid_ids else None
    return [SyntheticRequest(_random_prompt(generator, prompt_len, vocab_size, candidates), output)
            for prompt_len, output in zip(inputs.tolist(), outputs.tolist())]


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
        if self.low < 1:
            raise ValueError(f"{self.kind} length needs a first parameter >= 1, got {self.low}")
        if self.kind == "uniform" and self.high < self.low:
            raise ValueError(f"uniform lengths need LO <= HI, got {self.low}:{self.high}")
        if self.kind == "lognormal" and self.high < 0:
            raise ValueError(f"lognormal sigma must be non-negative, got {self.high}")

    @classmethod
    def parse(cls, text: str, role: str = "input") -> LengthDistribution:
        """``"128"``, ``"fixed:128"``, ``"uniform:32:512"``, ``"lognormal:256:1.0[:4096]"`` or ``"sharegpt"``.

        ``role`` (input or output) picks which side of the ``sharegpt`` preset a bare preset name means.
        """
        parts = text.strip().split(":")
        if len(parts) == 1 and parts[0] in LENGTH_PRESETS:
            if role not in ("input", "output"):
                raise ValueError(f"role must be 'input' or 'output', got {role!r}")
            return LENGTH_PRESETS[parts[0]][0 if role == "input" else 1]
        try:
            kind, numbers = (("fixed", [float(parts[0])]) if len(parts) == 1
                             else (parts[0], [float(part) for part in parts[1:]]))
        except ValueError:
            raise ValueError(
                f"cannot parse length distribution {text!r}: expected N, fixed:N, uniform:LO:HI, "
                f"lognormal:MEDIAN:SIGMA[:MAX] or {', '.join(LENGTH_PRESETS)}"
            ) from None
        if kind == "fixed" and len(numbers) == 1:
            return cls("fixed", numbers[0])
        if kind == "uniform" and len(numbers) == 2:
            return cls("uniform", numbers[0], numbers[1])
        if kind == "lognormal" and len(numbers) in (2, 3):
            maximum = int(numbers[2]) if len(numbers) == 3 else 2048
            return cls("lognormal", numbers[0], numbers[1], maximum=maximum)
        raise ValueError(
            f"cannot parse length distribution {text!r}: expected N, fixed:N, uniform:LO:HI, "
            f"lognormal:MEDIAN:SIGMA[:MAX] or {', '.join(LENGTH_PRESETS)}"
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

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{int(self.low)}"
        if self.kind == "uniform":
            return f"uniform:{int(self.low)}:{int(self.high)}"
        return f"lognormal:{self.low:g}:{self.high:g}:{self.maximum}"


# (input, output) pairs
LENGTH_PRESETS = {
    "sharegpt": (LengthDistribution("lognormal", 256, 1.0), LengthDistribution("lognormal", 192, 0.9)),
}
PRESETS = {
    **LENGTH_PRESETS,
    "fixed": (LengthDistribution("fixed", 128), LengthDistribution("fixed", 64)),
    "uniform": (LengthDistribution("uniform", 100, 1024), LengthDistribution("uniform", 100, 1024)),
}


def validate_arrival(arrival: str, cv: float) -> None:
    if arrival not in ARRIVAL_KINDS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVAL_KINDS)}, got {arrival!r}")
    if not cv > 0:
        raise ValueError(f"burstiness (cv) must be positive, got {cv}")


def arrival_times(count: int, rate: float, arrival: str, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds from the start at which each of ``count`` requests arrives; the first opens the run at 0.

    Gamma gaps have mean 1/rate and coefficient of variation ``cv`` (cv = 1 is Poisson). For one seed the
    times at two rates differ only by a scale, so a sweep loads the server with the same pattern.
    """
    validate_arrival(arrival, cv)
    if not rate > 0:
        raise ValueError(f"rate must be positive (inf for all at once), got {rate}")
    if count < 1:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(count)
    mean_gap = 1.0 / rate
    if arrival == "fixed":
        gaps = np.full(count, mean_gap)
    elif arrival == "poisson":
        gaps = rng.exponential(mean_gap, size=count)
    else:
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, mean_gap / shape, size=count)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def random_token_prompts(lengths, low: int, high: int, rng: np.random.Generator) -> list[list[int]]:
    """One prompt of random token ids in [low, high) per length (no shared prefixes)."""
    if not 0 <= low < high:
        raise ValueError(f"token id range must satisfy 0 <= LOW < HIGH, got {low} {high}")
    tokens = rng.integers(low, high, size=int(np.sum(lengths))).tolist()
    prompts, offset = [], 0
    for length in lengths:
        prompts.append(tokens[offset : offset + int(length)])
        offset += int(length)
    return prompts


def fit_lengths(inputs: np.ndarray, outputs: np.ndarray, max_model_len: int | None,
                prefix_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Trim so every prompt (``prefix_len`` shared tokens + its own) + output fits ``max_model_len`` (the prompt's
    own part first, keeping at least one token of it and one output token)."""
    if max_model_len is None:
        return inputs, outputs
    if max_model_len < prefix_len + 2:
        raise ValueError(f"max_model_len must be at least the shared prefix + 2 = {prefix_len + 2}, "
                         f"got {max_model_len}")
    inputs = np.minimum(inputs, max_model_len - 1 - prefix_len)
    outputs = np.maximum(np.minimum(outputs, max_model_len - prefix_len - inputs), 1)
    return inputs, outputs


@dataclass(frozen=True)
class SharedPrefix:
    """``groups`` prefixes of ``length`` random tokens; request ``n`` opens with prefix ``n % groups``."""

    length: int = 0
    groups: int = 1

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError(f"shared prefix length must be non-negative, got {self.length}")
        if self.groups < 1:
            raise ValueError(f"prefix groups must be at least 1, got {self.groups}")

    def prefixes(self, low: int, high: int, rng: np.random.Generator) -> list[list[int]]:
        """The groups' prefixes: token ids in [low, high)."""
        return random_token_prompts([self.length] * self.groups, low, high, rng) if self.length else [[]]

    def apply(self, prompts: list[list[int]], prefixes: list[list[int]]) -> list[list[int]]:
        """Each prompt behind its group's prefix."""
        if not self.length:
            return prompts
        return [prefixes[index % len(prefixes)] + prompt for index, prompt in enumerate(prompts)]
