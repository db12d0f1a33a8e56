"""Outputs in vLLM's shapes, so code written against vLLM reads them unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.time()``) of a request's life; None until reached."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    time_in_queue: float | None = None
    num_preemptions: int = 0
    energy_joules: float | None = None
    energy_source: str | None = None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def end_to_end_latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    error: Exception | None = None
    prompt_logprobs: list | None = field(default=None, repr=False)


def merge_delta_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One DELTA output equal to ``earlier`` followed by ``later`` (the same request): texts, token ids and
    logprobs joined per sample, everything else from ``later``. A server whose clients fall behind sends
    the merge as one chunk instead of one chunk per step."""
    merged = {completion.index: completion for completion in earlier.outputs}
    for completion in later.outputs:
        before = merged.get(completion.index)
        if before is None:
            merged[completion.index] = completion
            continue
        logprobs = None
        if before.logprobs is not None or completion.logprobs is not None:
            logprobs = [*(before.logprobs or []), *(completion.logprobs or [])]
        merged[completion.index] = CompletionOutput(
            index=completion.index, text=before.text + completion.text,
            token_ids=[*before.token_ids, *completion.token_ids],
            cumulative_logprob=completion.cumulative_logprob, logprobs=logprobs,
            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
        )
    return RequestOutput(
        request_id=later.request_id, prompt=later.prompt, prompt_token_ids=later.prompt_token_ids,
        outputs=[merged[index] for index in sorted(merged)], finished=later.finished,
        metrics=later.metrics if later.metrics is not None else earlier.metrics,
        num_cached_tokens=later.num_cached_tokens, error=later.error or earlier.error,
        prompt_logprobs=earlier.prompt_logprobs if earlier.prompt_logprobs is not None else later.prompt_logprobs,
    )
