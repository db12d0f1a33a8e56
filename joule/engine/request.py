"""A request as the scheduler sees it: token ids, progress, blocks and status.

Pure Python (no torch) so the simulator drives the very same objects.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from joule.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    # Members are singletons compared by identity: hash them by identity too, in C (Enum's own __hash__
    # is Python code, and the scheduler looks statuses up in FINISHED_STATUSES for every sequence).
    __hash__ = object.__hash__

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in FINISHED_STATUSES


# A set, not a tuple: the scheduler asks for every sequence of every step (a tuple's == chain costs 3x).
FINISHED_STATUSES = frozenset((RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                               RequestStatus.FINISHED_ABORTED))


@dataclass
class SampledToken:
    """One generated token with its raw-distribution logprob (when asked for)."""

    token_id: int
    logprob: float | None = None
    rank: int | None = None
    top: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class RequestSLO:
    """Latency targets a request may carry; the ``deadline`` policy schedules against them."""

    ttft_seconds: float | None = None  # time to first token
    tpot_seconds: float | None = None  # time per output token after the first

    def __post_init__(self) -> None:
        for name in ("ttft_seconds", "tpot_seconds"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}.")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    priority: int = 0
    tenant: str | None = None  # who is billed for fairness (the API's ``user``)
    cache_salt: str | None = None
    slo: RequestSLO | None = None
    # Siblings of an n > 1 request share a group; later siblings wait for the
    # first one's prompt so they reuse its cached blocks.
    group_id: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[SampledToken] = field(default_factory=list)
    # Where the output stands in its grammar (``sampling_params.structured_outputs``): a runtime object the
    # executor asks for allowed tokens and advances; the scheduler never looks at it.
    constraint: object | None = None
    # Entry i: prompt token i + 1 given the tokens before it (``sampling_params.prompt_logprobs``).
    prompt_logprobs: list[SampledToken] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first schedule; -1 until then
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    last_scheduled_step: int = -1  # the scheduler's step count when it last planned this request

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def stop_after(self, token_id: int, num_output_tokens: int,
                   max_model_len: int | None = None) -> tuple[RequestStatus, int | None] | None:
        """The stop rule: what sampling ``token_id`` as output number ``num_output_tokens`` does, as
        (finished status, stop reason), or None when the request goes on. EOS or a stop token ends it once
        past ``min_tokens`` (the sampler bans them before), else the length cap or ``max_model_len``.
        Shared by the scheduler and the simulator's executor, which predicts finishes to charge them."""
        params = self.sampling_params
        if num_output_tokens > params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED, None
            if token_id in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token_id
        if num_output_tokens >= self.max_tokens or (
                max_model_len is not None and len(self.prompt_token_ids) + num_output_tokens >= max_model_len):
            return RequestStatus.FINISHED_LENGTH, None
        return None

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt logprobs are asked for and not all known: every prompt position must be computed here, so no
        prefix-cache hit may skip any."""
        return (self.sampling_params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1)

    def prompt_logprob_positions(self, start: int, count: int) -> range:
        """Of the positions ``start .. start + count`` a step computes, those whose next prompt token's logprob
        is still missing (a recomputation after preemption scores nothing twice)."""
        if self.sampling_params.prompt_logprobs is None:
            return range(0)
        first = max(start, len(self.prompt_logprobs))
        return range(first, max(first, min(start + count, len(self.prompt_token_ids) - 1)))

    def token_id_at(self, position: int) -> int:
        prompt_length = len(self.prompt_token_ids)
        if position < prompt_length:
            return self.prompt_token_ids[position]
        return self.output_token_ids[position - prompt_length]

    def token_ids_between(self, start: int, end: int) -> list[int]:
        prompt_length = len(self.prompt_token_ids)
        if end <= prompt_length:
            return self.prompt_token_ids[start:end]
        if start >= prompt_length:
            return self.output_token_ids[start - prompt_length : end - prompt_length]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_length]

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def is_prefilling(self) -> bool:
        """Still computing prompt (or recomputing after preemption): no token comes out yet."""
        return self.num_tokens - self.num_computed_tokens > 1
