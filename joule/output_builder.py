"""Sampled tokens to ``RequestOutput``s: text, stop strings, logprobs, deltas, metrics and joules.

``LLMEngine`` owns one ``OutputBuilder``. After each step it hands over the requests that progressed; this
turns each into what the user sees (vLLM's ``RequestOutput``), every step or only at the end (FINAL_ONLY).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from joule.detokenizer import IncrementalDetokenizer
from joule.energy import EnergyLedger
from joule.engine.request import Request, RequestStatus, SampledToken
from joule.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from joule.sampling_params import RequestOutputKind, SamplingParams
from joule.tokenizer import Tokenizer


@dataclass
class SampleState:
    """One of the n samples of a request, as the user will see it."""

    request: Request
    detokenizer: IncrementalDetokenizer | None
    text: str = ""
    num_tokens_seen: int = 0
    num_tokens_sent: int = 0
    num_chars_sent: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Running sum of the sampled tokens' logprobs over the first ``num_logprobs_summed`` tokens, so an output
    # per step does not re-add the whole history (same left-to-right additions as one sum()).
    cumulative_logprob: float = 0.0
    num_logprobs_summed: int = 0


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    samples: list[SampleState] = field(default_factory=list)
    # vLLM's ``RequestOutput.prompt_logprobs`` once every prompt token is scored (built once), and whether a
    # DELTA output carried it already (it goes out once).
    prompt_logprobs: list | None = None
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        for sample in self.samples:  # a loop, not all(generator): asked for every request every step
            if sample.finish_reason is None:
                return False
        return True


class OutputBuilder:
    """``finish_request(request_id, stop_string)`` ends a request whose text hit a stop string (the engine core's)."""

    def __init__(self, tokenizer: Tokenizer | None, energy_ledger: EnergyLedger,
                 finish_request: Callable[[str, str], None]):
        self.tokenizer = tokenizer
        self._energy_ledger = energy_ledger
        self._finish_request = finish_request

    def advance(self, state: RequestState, sample: SampleState, now: float) -> None:
        """Take the sample's new tokens in: text, stop strings, finish reason, first/last token times."""
        request = sample.request
        metrics = state.metrics
        if metrics.first_scheduled_time is None and request.first_scheduled_time is not None:
            metrics.first_scheduled_time = request.first_scheduled_time
            metrics.time_in_queue = request.first_scheduled_time - metrics.arrival_time
        output_ids = request.output_token_ids
        seen, sample.num_tokens_seen = sample.num_tokens_seen, len(output_ids)
        grew = sample.num_tokens_seen > seen
        if grew:
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            metrics.last_token_time = now
        if request.num_preemptions > metrics.num_preemptions:
            metrics.num_preemptions = request.num_preemptions
        stop_string = None
        if sample.detokenizer is not None and grew:
            new_ids = output_ids[seen:]
            # vLLM leaves the text of a final EOS / stop-id token out of the output.
            stop_terminated = (
                request.status == RequestStatus.FINISHED_STOPPED
                and not request.sampling_params.include_stop_str_in_output
            )
            update = sample.detokenizer.push(new_ids, stop_terminated=stop_terminated)
            sample.text += update.text_delta
            stop_string = update.stop_string
        if stop_string is not None:
            if not request.is_finished:
                self._finish_request(request.request_id, stop_string)
            sample.finish_reason, sample.stop_reason = "stop", stop_string
        elif request.is_finished:
            sample.finish_reason, sample.stop_reason = request.finish_reason, request.stop_reason
        if sample.finish_reason is not None and sample.detokenizer is not None:
            sample.text += sample.detokenizer.flush()

    def make_output(self, state: RequestState, finished: bool) -> RequestOutput:
        """The output ``step`` sends (FINAL_ONLY requests only once finished: the caller checks)."""
        delta = state.params.output_kind == RequestOutputKind.DELTA
        ledger = self._energy_ledger
        samples = state.samples
        if len(samples) == 1:
            state.metrics.energy_joules = ledger.joules_of(samples[0].request.request_id)
        else:
            state.metrics.energy_joules = sum(ledger.joules_of(sample.request.request_id) for sample in samples)
        state.metrics.energy_source = ledger.source
        completions = []
        for index, sample in enumerate(samples):
            seen = sample.num_tokens_seen
            token_start = sample.num_tokens_sent if delta else 0
            char_start = sample.num_chars_sent if delta else 0
            if delta and token_start == seen and char_start == len(sample.text) and not sample.finish_reason:
                continue
            completions.append(
                CompletionOutput(
                    index=index,
                    text=sample.text[char_start:],
                    token_ids=sample.request.output_token_ids[token_start:seen],  # a copy: only the new part
                    cumulative_logprob=self._cumulative_logprob(sample),
                    logprobs=self._logprobs(sample, token_start),
                    finish_reason=sample.finish_reason,
                    stop_reason=sample.stop_reason,
                )
            )
            sample.num_tokens_sent, sample.num_chars_sent = seen, len(sample.text)
        prompt_logprobs = self._prompt_logprobs(state)
        if delta and prompt_logprobs is not None:
            prompt_logprobs, state.prompt_logprobs_sent = (None if state.prompt_logprobs_sent else prompt_logprobs,
                                                           True)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=state.metrics,
            num_cached_tokens=max(state.samples[0].request.num_cached_tokens, 0),
            prompt_logprobs=prompt_logprobs,
        )

    def _prompt_logprobs(self, state: RequestState) -> list | None:
        """None for the first prompt token (nothing comes before it), then one entry per token, as vLLM's."""
        if state.prompt_logprobs is None and state.params.prompt_logprobs is not None:
            scored = state.samples[0].request.prompt_logprobs  # the first sample computes them for all n
            if len(scored) == len(state.prompt_token_ids) - 1:
                state.prompt_logprobs = [None, *(self._logprob_entry(token) for token in scored)]
        return state.prompt_logprobs

    @staticmethod
    def _cumulative_logprob(sample: SampleState) -> float | None:
        if sample.request.sampling_params.logprobs is None:
            return None
        logprobs = sample.request.output_logprobs
        total = sample.cumulative_logprob
        for position in range(sample.num_logprobs_summed, sample.num_tokens_seen):
            total += logprobs[position].logprob
        sample.cumulative_logprob, sample.num_logprobs_summed = total, max(sample.num_logprobs_summed,
                                                                           sample.num_tokens_seen)
        return float(total)

    def _logprobs(self, sample: SampleState, start: int) -> list[dict[int, Logprob]] | None:
        if sample.request.sampling_params.logprobs is None:
            return None
        return [self._logprob_entry(token) for token in sample.request.output_logprobs[start : sample.num_tokens_seen]]

    def _logprob_entry(self, token: SampledToken) -> dict[int, Logprob]:
        """The token itself first, then its top alternatives by rank."""
        entry = {token.token_id: Logprob(token.logprob, token.rank, self._decode_one(token.token_id))}
        for rank, (token_id, logprob) in enumerate(token.top or [], start=1):
            entry.setdefault(token_id, Logprob(logprob, rank, self._decode_one(token_id)))
        return entry

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer | None:
        """A fresh incremental detokenizer for one sample (None without a tokenizer: token ids only)."""
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop_strings,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )
