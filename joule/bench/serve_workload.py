"""What `joule bench serve` sends: request-rate sweeps, tenants with their own traffic and SLOs, and prompts.

Tenant syntax (``--tenant``, repeatable): ``NAME[:KEY=VALUE,...]`` with keys

- ``rate=R``: the tenant's own requests per second (``inf``: all at once), fixed whatever the swept rate;
- ``share=W``: otherwise the tenant gets ``W / sum of shares`` of each swept ``--request-rate`` (default 1);
- ``num=N``: how many requests it sends per run (see ``request_counts`` for the default);
- ``input=DIST``, ``output=DIST``: its length distributions (``128``, ``uniform:32:512``,
  ``lognormal:256:1.0``, ``sharegpt``), otherwise ``--input-len`` / ``--output-len``;
- ``ttft=SECONDS``, ``tpot=SECONDS``, ``tbt=SECONDS`` (``ms`` suffix allowed): its SLOs, otherwise ``--slo``'s;
  ``tbt`` bounds a request's largest gap between two consecutive tokens.

Example: ``--tenant light:rate=0.5,ttft=1.0,tpot=0.05 --tenant heavy:share=1,input=uniform:512:1024``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from joule.bench.workload import (
    LengthDistribution,
    SharedPrefix,
    arrival_times,
    fit_lengths,
    random_token_prompts,
    validate_arrival,
)
from joule.perf.metrics import SLO

_TENANT_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_WORDS = ["time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye", "woman", "place", "work", "week", "case", "point", "government", "company", "number", "group", "problem", "fact", "energy", "power", "light", "river", "stone", "cloud", "music", "garden", "market", "window", "letter", "engine", "signal", "forest", "winter", "summer", "city", "story", "answer"]


def parse_rate(text: str) -> float:
    value = text.strip().lower()
    if value in ("inf", "infinity"):
        return math.inf
    try:
        rate = float(value)
    except ValueError:
        raise ValueError(f"request rate {text!r} is not a number or 'inf'") from None
    if not rate > 0 or math.isnan(rate):
        raise ValueError(f"request rate must be positive (or inf), got {text!r}")
    return rate


def parse_rates(text: str) -> list[float]:
    """``"1,2,4,inf"`` -> [1.0, 2.0, 4.0, inf]: one benchmark run per rate, in the order given."""
    items = [item for item in str(text).split(",") if item.strip()]
    if not items:
        raise ValueError("request_rate needs at least one rate, e.g. 4 or 1,2,4,inf")
    return [parse_rate(item) for item in items]


def parse_seconds(text: str, name: str) -> float:
    """``"0.5"``, ``"500ms"`` or ``"0.5s"`` -> seconds (positive)."""
    value = text.strip()
    scale = 1e-3 if value.endswith("ms") else 1.0
    try:
        seconds = float(value.removesuffix("ms").removesuffix("s")) * scale
    except ValueError:
        raise ValueError(f"{name} must be seconds (or NUMms), got {text!r}") from None
    if not seconds > 0:
        raise ValueError(f"{name} must be positive, got {text!r}")
    return seconds


@dataclass(frozen=True)
class TenantSpec:
    name: str
    rate: float | None = None  # own requests per second; None: a share of the swept rate
    share: float = 1.0
    num: int | None = None
    input_len: LengthDistribution | None = None
    output_len: LengthDistribution | None = None
    slo: SLO = field(default_factory=SLO)

    def __post_init__(self) -> None:
        if not _TENANT_NAME.match(self.name):
            raise ValueError(f"tenant name must be letters, digits, '_', '.' or '-', got {self.name!r}")
        if not self.share > 0:
            raise ValueError(f"tenant {self.name}: share must be positive, got {self.share}")
        if self.num is not None and self.num < 1:
            raise ValueError(f"tenant {self.name}: num must be at least 1, got {self.num}")

    @classmethod
    def parse(cls, text: str) -> TenantSpec:
        name, _, rest = text.strip().partition(":")
        values: dict = {}
        slo: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not value:
                raise ValueError(f"tenant {name!r}: bad item {item!r}, expected KEY=VALUE")
            try:
                if key == "rate":
                    values["rate"] = parse_rate(value)
                elif key == "share":
                    values["share"] = float(value)
                elif key == "num":
                    values["num"] = int(value)
                elif key in ("input", "output"):
                    values[f"{key}_len"] = LengthDistribution.parse(value, key)
                elif key in ("ttft", "tpot", "tbt"):
                    slo[f"{key}_s"] = parse_seconds(value, key)
                else:
                    raise ValueError(f"unknown key {key!r}; keys: rate, share, num, input, output, ttft, tpot, tbt")
            except ValueError as error:
                raise ValueError(f"tenant {name!r}: bad item {item!r}: {error}") from None
        if "rate" in values and "share" in values:
            raise ValueError(f"tenant {name!r}: give rate (its own) or share (of the swept rate), not both")
        return cls(name=name, slo=SLO(**slo), **values)


@dataclass
class PlannedRequest:
    """One request of a run: when it is sent (seconds from the start) and what it asks."""

    tenant: str | None
    send_at: float
    prompt: str | list[int]
    prompt_len: int
    output_len: int
    slo: SLO


@dataclass(frozen=True)
class DatasetEntry:
    prompt: str
    prompt_len: int
    output_len: int


def tenant_rates(tenants: list[TenantSpec], swept_rate: float) -> list[float]:
    """Each tenant's request rate in a run at ``swept_rate``: its own, or its share of the swept rate."""
    total_share = sum(t.share for t in tenants if t.rate is None)
    return [t.rate if t.rate is not None else swept_rate * t.share / total_share for t in tenants]


def request_counts(tenants: list[TenantSpec], rates: list[float], num_prompts: int,
                   duration_s: float | None) -> list[int]:
    """Requests per tenant: ``num=`` if given; else rate x ``duration_s`` when both are finite; else the tenants
    left split ``num_prompts`` in proportion to their rates (equally when any of those rates is infinite)."""
    counts: list[int | None] = []
    for tenant, rate in zip(tenants, rates):
        if tenant.num is not None:
            counts.append(tenant.num)
        elif duration_s is not None and math.isfinite(rate):
            counts.append(max(1, round(rate * duration_s)))
        else:
            counts.append(None)
    left = [index for index, count in enumerate(counts) if count is None]
    if left:
        weights = [rates[i] for i in left]
        if any(math.isinf(w) for w in weights):
            weights = [1.0] * len(left)
        total = sum(weights)
        for index, weight in zip(left, weights):
            counts[index] = max(1, round(num_prompts * weight / total))
    return [int(count) for count in counts]


@dataclass
class WorkloadOptions:
    """Everything that shapes the prompts and arrivals of every run."""

    num_prompts: int = 32
    input_len: LengthDistribution = field(default_factory=lambda: LengthDistribution("fixed", 128))
    output_len: LengthDistribution = field(default_factory=lambda: LengthDistribution("fixed", 64))
    arrival: str = "poisson"
    burstiness: float = 1.0
    duration_s: float | None = None
    max_model_len: int | None = None
    prompt_kind: str = "token-ids"  # or random-text
    token_id_range: tuple[int, int] = (1000, 10000)
    seed: int = 0
    prefix: SharedPrefix = field(default_factory=SharedPrefix)  # prompts behind shared prefixes (none by default)

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be at least 1, got {self.num_prompts}")
        if self.prompt_kind not in ("token-ids", "random-text"):
            raise ValueError(f"prompt_kind must be token-ids or random-text, got {self.prompt_kind!r}")
        validate_arrival(self.arrival, self.burstiness)
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be positive, got {self.duration_s}")
        low, high = self.token_id_range
        if not 0 <= low < high:
            raise ValueError(f"token_id_range must satisfy 0 <= LOW < HIGH, got {low} {high}")


def plan_run(options: WorkloadOptions, tenants: list[TenantSpec], swept_rate: float, default_slo: SLO,
             dataset: list[DatasetEntry] | None = None) -> list[PlannedRequest]:
    """All requests of one run, sorted by send time. Tenant i's n-th request depends on (seed, i, n) only and
    its arrival pattern only scales with the rate, so the runs of a sweep differ by load alone."""
    named = bool(tenants)
    tenants = tenants or [TenantSpec("default")]
    rates = tenant_rates(tenants, swept_rate)
    counts = request_counts(tenants, rates, options.num_prompts, options.duration_s)
    planned: list[PlannedRequest] = []
    if dataset is not None and options.prefix.length:
        raise ValueError("a shared prefix applies to synthetic prompts, not to --dataset's")
    # One set of prefixes for every tenant and run (a service's system prompts); tenant i's n-th request takes
    # prefix n % groups.
    prefixes = _prefixes(options, np.random.default_rng([options.seed, 1 << 20]))
    for index, (tenant, rate, count) in enumerate(zip(tenants, rates, counts)):
        lengths_rng = np.random.default_rng([options.seed, index, 0])
        times = arrival_times(count, rate, options.arrival, options.burstiness,
                              np.random.default_rng([options.seed, index, 1]))
        slo = tenant.slo.merged_over(default_slo)
        if dataset is not None:
            picks = lengths_rng.choice(len(dataset), size=count, replace=count > len(dataset))
            entries = [dataset[int(pick)] for pick in picks]
            prompts: list = [entry.prompt for entry in entries]
            inputs = [entry.prompt_len for entry in entries]
            outputs = [entry.output_len for entry in entries]
        else:
            inputs_array, outputs_array = fit_lengths(
                (tenant.input_len or options.input_len).sample(lengths_rng, count),
                (tenant.output_len or options.output_len).sample(np.random.default_rng([options.seed, index, 2]),
                                                                 count), options.max_model_len, options.prefix.length)
            inputs, outputs = inputs_array.tolist(), outputs_array.tolist()
            prompts = [_behind(prefixes[number % len(prefixes)],
                               _prompt(options, length, np.random.default_rng([options.seed, index, 3, number])))
                       for number, length in enumerate(inputs)]
            inputs = [options.prefix.length + length for length in inputs]
        for send_at, prompt, prompt_len, output_len in zip(times.tolist(), prompts, inputs, outputs):
            planned.append(PlannedRequest(tenant.name if named else None, send_at, prompt, int(prompt_len),
                                          int(output_len), slo))
    planned.sort(key=lambda request: request.send_at)
    return planned


def _prefixes(options: WorkloadOptions, rng: np.random.Generator) -> list:
    """The shared prefixes: token ids, or words for random-text prompts ([""] or [[]] without a prefix)."""
    if not options.prefix.length:
        return ["" if options.prompt_kind == "random-text" else []]
    return [_prompt(options, options.prefix.length, rng) for _ in range(options.prefix.groups)]


def _behind(prefix, prompt):
    if not prefix:
        return prompt
    return f"{prefix} {prompt}" if isinstance(prompt, str) else prefix + prompt


def _prompt(options: WorkloadOptions, length: int, rng: np.random.Generator) -> str | list[int]:
    if options.prompt_kind == "token-ids":
        return random_token_prompts([length], *options.token_id_range, rng)[0]
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=length))


def read_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """(first human turn, first gpt turn after it) of each conversation in a ShareGPT JSON file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"dataset {path}: cannot read a ShareGPT JSON file: {error}") from None
    if not isinstance(data, list):
        raise ValueError(f"dataset {path}: expected a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        human = next((i for i, turn in enumerate(turns) if isinstance(turn, dict) and turn.get("from") == "human"),
                     None)
        if human is None:
            continue
        reply = next((turn for turn in turns[human + 1:] if isinstance(turn, dict) and turn.get("from") == "gpt"),
                     None)
        prompt, answer = turns[human].get("value"), reply.get("value") if reply else None
        if isinstance(prompt, str) and isinstance(answer, str) and prompt.strip() and answer.strip():
            pairs.append((prompt, answer))
    if not pairs:
        raise ValueError(f"dataset {path}: no conversation with a human turn followed by a gpt turn")
    return pairs


def dataset_entries(pairs: list[tuple[str, str]], count_tokens, max_model_len: int | None) -> list[DatasetEntry]:
    """Entries with token lengths from ``count_tokens(text)``; pairs that do not fit ``max_model_len`` are
    dropped, output lengths are at least 1."""
    entries = []
    for prompt, answer in pairs:
        prompt_len, output_len = count_tokens(prompt), max(1, count_tokens(answer))
        if prompt_len < 1 or (max_model_len is not None and prompt_len + output_len > max_model_len):
            continue
        entries.append(DatasetEntry(prompt, prompt_len, output_len))
    if not entries:
        raise ValueError("no dataset conversation fits max_model_len")
    return entries


def word_count(text: str) -> int:
    """Length by whitespace-separated words: the fallback when the server has no /tokenize."""
    return len(text.split())
