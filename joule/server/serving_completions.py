"""POST /v1/completions: prompts (text, texts, token ids, lists of token ids) to OpenAI completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from joule.outputs import CompletionOutput, Logprob
from joule.server.errors import bad_request
from joule.server.protocol import CompletionRequest, random_id
from joule.server.responses import CompletionChoice, CompletionLogprobs, CompletionResponse, OutputTally, UsageInfo
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
    echoed: bool = False  # echo: the prompt went out ahead of the first delta


def _prompt_items(prompt) -> list:
    """The four prompt forms as a list of texts or token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _prompts(context: ServingContext, prompt, keep_last: int | None = None) -> list[list[int]]:
    """Normalise the four prompt forms to lists of token ids (each cut to its last ``keep_last``)."""
    texts_or_ids = _prompt_items(prompt)
    if not texts_or_ids:
        raise bad_request("prompt is empty: it must contain at least one prompt", param="prompt")
    prompts = []
    for item in texts_or_ids:
        ids = context.require_tokenizer().encode(item) if isinstance(item, str) else list(item)
        prompts.append(context.check_token_ids(ids, keep_last=keep_last))
    return prompts


def _completion_logprobs(entries: list[dict[int, Logprob]], limit: int, text_offset: int,
                         into: CompletionLogprobs | None = None) -> CompletionLogprobs:
    result = CompletionLogprobs() if into is None else into
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


def _echoed_prompt_logprobs(first_token: str, entries: list, limit: int) -> CompletionLogprobs:
    """An echoed prompt's part of ``logprobs``: its first token has none (nothing comes before it), as OpenAI's."""
    result = CompletionLogprobs(tokens=[first_token], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
    return _completion_logprobs(entries[1:], limit, len(first_token), into=result)


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
    echo_only = body.echo and body.max_tokens == 0  # vLLM's: the prompt and its logprobs, nothing generated
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
    max_tokens = context.limit_max_tokens(1 if echo_only else body.max_tokens,
                                          explicit="max_tokens" in body.model_fields_set)
    text_size = sum(len(item) for item in ([body.prompt] if isinstance(body.prompt, str) else body.prompt)
                    if isinstance(item, str))
    prompts = await off_loop_if_large(text_size, _prompts, context, body.prompt, body.truncate_prompt_tokens)
    for ids in prompts:
        context.check_context(len(ids), body.max_tokens)
    scored = [k for k in (body.prompt_logprobs, body.logprobs if body.echo else None) if k is not None]
    params = build_sampling_params(body, max_tokens, body.logprobs, max(scored) if scored else None)
    request_id = random_id("cmpl")
    echoes = _echo_texts(context, body.prompt, prompts, body.truncate_prompt_tokens is not None) if body.echo else None
    stream = await context.submit(prompts, params, request_id, body.priority, body.user, body.slo(),
                                  constraint_field=body.structured_outputs_spec()[1])
    handler = _Completion(context, body, model, request_id, prompts, stream, echoes, echo_only)
    if body.stream:
        return EventStreamResponse(handler.stream())
    return await unless_disconnected(http_request, handler.collect())


def _echo_texts(context: ServingContext, prompt, prompts: list[list[int]], truncated: bool = False) -> list[str]:
    """What ``echo`` puts ahead of each completion: a text prompt as sent, token ids (or a cut prompt) decoded."""
    return [item if isinstance(item, str) and not truncated else context.require_tokenizer().decode(ids)
            for item, ids in zip(_prompt_items(prompt), prompts)]


class _Completion:
    """One completions call in flight: folds engine deltas into choices or SSE chunks."""

    def __init__(self, context, body: CompletionRequest, model: str, request_id: str, prompts, stream,
                 echoes: list[str] | None = None, echo_only: bool = False):
        self.context, self.body, self.model, self.request_id = context, body, model, request_id
        self.prompts, self.engine_stream = prompts, stream
        self.echoes, self.echo_only = echoes, echo_only
        self.created = int(time.time())
        self.choices = [_ChoiceState() for _ in range(len(prompts) * body.n)]
        self.tally = OutputTally()
        self.prompt_logprobs: dict[int, list] = {}  # by prompt: RequestOutput.prompt_logprobs, once it came

    def _take(self, prompt_index: int, output) -> None:
        self.tally.update(prompt_index, output)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = output.prompt_logprobs

    def _update(self, prompt_index: int, completion: CompletionOutput) -> tuple[int, _ChoiceState, str | None]:
        """Fold one delta in; returns the choice index, its state and the new text (None: nothing new arrived)."""
        index = prompt_index * self.body.n + completion.index
        choice = self.choices[index]
        if choice.done:
            return index, choice, None
        text, token_ids, logprobs = completion.text, completion.token_ids, completion.logprobs
        if self.echo_only:  # the one token generated to finish the prompt's forward is not shown
            text, token_ids, logprobs = "", [], None
        echoed = self._echo(prompt_index, choice)
        choice.chars_before = len(choice.text) + len(echoed)
        choice.text += echoed + text
        choice.num_tokens += len(token_ids)
        new_logprobs = None
        if self.body.logprobs is not None and (logprobs or echoed):
            new_logprobs = choice.last_logprobs if echoed else None  # the echo's part, set by _echo
            if logprobs:
                new_logprobs = _completion_logprobs(logprobs, self.body.logprobs, choice.chars_before,
                                                    into=new_logprobs)
            choice.logprobs = _merge_logprobs(choice.logprobs, new_logprobs.model_copy(deep=True))
        choice.last_logprobs = new_logprobs
        if completion.finish_reason is not None:
            finish_reason = "length" if self.echo_only else completion.finish_reason
            choice.finish_reason, choice.stop_reason, choice.done = (
                finish_reason, None if self.echo_only else completion.stop_reason, True
            )
        return index, choice, echoed + text

    def _echo(self, prompt_index: int, choice: _ChoiceState) -> str:
        """The prompt's text the first time its choice moves (with ``echo``), its logprobs in ``last_logprobs``."""
        if self.echoes is None or choice.echoed:
            return ""
        choice.echoed = True
        if self.body.logprobs is not None:
            prompt_ids = self.prompts[prompt_index]
            first_token = self.context.require_tokenizer().decode([prompt_ids[0]])
            entries = self.prompt_logprobs.get(prompt_index) or [None]
            choice.last_logprobs = _echoed_prompt_logprobs(first_token, entries, self.body.logprobs)
        return self.echoes[prompt_index]

    def _usage(self) -> UsageInfo:
        return UsageInfo.of(sum(len(ids) for ids in self.prompts), sum(c.num_tokens for c in self.choices),
                            self.tally)

    async def collect(self) -> Response:
        try:
            async for prompt_index, output in self.engine_stream:
                self._take(prompt_index, output)
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
                prompt_logprobs=(CompletionChoice.of(self.prompt_logprobs.get(index // self.body.n),
                                                     self.body.prompt_logprobs)
                                 if self.body.prompt_logprobs is not None else None),
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
                self._take(prompt_index, output)
                for completion in output.outputs:
                    index, choice, text = self._update(prompt_index, completion)
                    if text is None:
                        continue
                    final = all(c.done for c in self.choices)  # the last content chunk carries the joules
                    finish_reason = choice.finish_reason if choice.done else None
                    stop_reason = choice.stop_reason if choice.done else None
                    if not final and not continuous and choice.last_logprobs is None:
                        yield plain.completion(index, text, finish_reason, stop_reason)
                        continue
                    chunk = CompletionResponse(
                        id=self.request_id, model=self.model, created=self.created,
                        choices=[CompletionChoice(
                            index=index, text=text, logprobs=choice.last_logprobs,
                            finish_reason=finish_reason, stop_reason=stop_reason,
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
