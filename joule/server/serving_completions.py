"""POST /v1/completions: prompts (text, texts, token ids, lists of token ids) to OpenAI completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from joule.outputs import CompletionOutput, Logprob
from joule.server.errors import bad_request
from joule.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    OutputTally,
    UsageInfo,
    random_id,
)
from joule.server.serving_common import (
    SSE_DONE,
    EventStreamResponse,
    PlainChunks,
    ServingContext,
    build_sampling_params,
    check_request,
    off_loop_if_large,
    ranked_entries,
    sse,
    stream_error,
    unless_disconnected,
)


@dataclass
class _ChoiceState:
    """One choice being accumulated (non-streaming) or tracked (streaming)."""

    text: str = ""
    num_tokens: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    chars_before: int = 0
    done: bool = False
    last_logprobs: CompletionLogprobs | None = None


def _prompts(context: ServingContext, prompt) -> list[list[int]]:
    """Normalise the four prompt forms to lists of token ids."""
    if isinstance(prompt, str):
        texts_or_ids: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        texts_or_ids = [prompt]
    else:
        texts_or_ids = list(prompt)
    if not texts_or_ids:
        raise bad_request("prompt is empty: it must contain at least one prompt", param="prompt")
    prompts = []
    for item in texts_or_ids:
        ids = context.require_tokenizer().encode(item) if isinstance(item, str) else list(item)
        prompts.append(context.check_token_ids(ids))
    return prompts


def _completion_logprobs(entries: list[dict[int, Logprob]], limit: int, text_offset: int) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for entry in entries:
        token_id, sampled = next(iter(entry.items()))
        token = sampled.decoded_token if sampled.decoded_token is not None else str(token_id)
        result.tokens.append(token)
        result.token_logprobs.append(sampled.logprob)
        result.text_offset.append(text_offset)
        text_offset += len(token)
        top = {(lp.decoded_token or str(tid)): lp.logprob for tid, lp in ranked_entries(entry, limit)}
        top.setdefault(token, sampled.logprob)
        result.top_logprobs.append(top)
    return result


def _merge_logprobs(into: CompletionLogprobs | None, new: CompletionLogprobs) -> CompletionLogprobs:
    if into is None:
        return new
    into.tokens += new.tokens
    into.token_logprobs += new.token_logprobs
    into.text_offset += new.text_offset
    into.top_logprobs += new.top_logprobs
    return into


async def create_completion(context: ServingContext, body: CompletionRequest, http_request: Request) -> Response:
    model = context.check_model(body.model)
    check_request(body)
    context.check_tenant(body.user)
    max_tokens = context.limit_max_tokens(body.max_tokens, explicit="max_tokens" in body.model_fields_set)
    text_size = sum(len(item) for item in ([body.prompt] if isinstance(body.prompt, str) else body.prompt)
                    if isinstance(item, str))
    prompts = await off_loop_if_large(text_size, _prompts, context, body.prompt)
    for ids in prompts:
        context.check_context(len(ids), body.max_tokens)
    params = build_sampling_params(body, max_tokens, body.logprobs)
    request_id = random_id("cmpl")
    stream = await context.submit(prompts, params, request_id, body.priority, body.user, body.slo())
    handler = _Completion(context, body, model, request_id, prompts, stream)
    if body.stream:
        return EventStreamResponse(handler.stream())
    return await unless_disconnected(http_request, handler.collect())


class _Completion:
    """One completions call in flight: folds engine deltas into choices or SSE chunks."""

    def __init__(self, context, body: CompletionRequest, model: str, request_id: str, prompts, stream):
        self.context, self.body, self.model, self.request_id = context, body, model, request_id
        self.prompts, self.engine_stream = prompts, stream
        self.created = int(time.time())
        self.choices = [_ChoiceState() for _ in range(len(prompts) * body.n)]
        self.tally = OutputTally()

    def _update(self, prompt_index: int, completion: CompletionOutput) -> tuple[int, _ChoiceState, bool]:
        """Fold one delta in; returns the choice index, its state and whether anything new arrived."""
        index = prompt_index * self.body.n + completion.index
        choice = self.choices[index]
        if choice.done:
            return index, choice, False
        choice.chars_before = len(choice.text)
        choice.text += completion.text
        choice.num_tokens += len(completion.token_ids)
        new_logprobs = None
        if self.body.logprobs is not None and completion.logprobs:
            new_logprobs = _completion_logprobs(completion.logprobs, self.body.logprobs, choice.chars_before)
            choice.logprobs = _merge_logprobs(choice.logprobs, new_logprobs.model_copy(deep=True))
        choice.last_logprobs = new_logprobs
        if completion.finish_reason is not None:
            choice.finish_reason, choice.stop_reason, choice.done = (
                completion.finish_reason, completion.stop_reason, True
            )
        return index, choice, True

    def _usage(self) -> UsageInfo:
        return UsageInfo.of(sum(len(ids) for ids in self.prompts), sum(c.num_tokens for c in self.choices),
                            self.tally)

    async def collect(self) -> Response:
        try:
            async for prompt_index, output in self.engine_stream:
                self.tally.update(prompt_index, output)
                for completion in output.outputs:
                    self._update(prompt_index, completion)
        except Exception as error:
            return stream_error(error).response()
        finally:
            self.engine_stream.abort()
        choices = [
            CompletionChoice(
                index=index, text=choice.text, finish_reason=choice.finish_reason, stop_reason=choice.stop_reason,
                logprobs=choice.logprobs if self.body.logprobs is not None else None,
            )
            for index, choice in enumerate(self.choices)
        ]
        response = CompletionResponse(id=self.request_id, model=self.model, created=self.created, choices=choices,
                                      usage=self._usage())
        return JSONResponse(response.model_dump(), headers=self.tally.header())

    async def stream(self) -> AsyncIterator[str]:
        options = self.body.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and options.continuous_usage_stats
        plain = PlainChunks(self.request_id, "text_completion", self.created, self.model)
        try:
            async for prompt_index, output in self.engine_stream:
                self.tally.update(prompt_index, output)
                for completion in output.outputs:
                    index, choice, changed = self._update(prompt_index, completion)
                    if not changed:
                        continue
                    final = all(c.done for c in self.choices)  # the last content chunk carries the joules
                    if not final and not continuous and choice.last_logprobs is None:
                        yield plain.completion(index, completion.text, completion.finish_reason,
                                               completion.stop_reason)
                        continue
                    chunk = CompletionResponse(
                        id=self.request_id, model=self.model, created=self.created,
                        choices=[CompletionChoice(
                            index=index, text=completion.text, logprobs=choice.last_logprobs,
                            finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
                        )],
                        usage=self._usage() if continuous else None,
                        energy_joules=self.tally.joules if final else None,
                        energy_source=self.tally.source if final else None,
                    )
                    yield sse(chunk)
            if include_usage:
                yield sse(CompletionResponse(id=self.request_id, model=self.model, created=self.created, choices=[],
                                             usage=self._usage()))
        except Exception as error:
            yield stream_error(error).sse_payload()
        finally:
            self.engine_stream.abort()
        yield SSE_DONE
