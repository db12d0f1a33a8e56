"""What completions and chat share: the model check, prompt limits, sampling params, SSE plumbing."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from joule.engine.request import RequestSLO
from joule.outputs import Logprob
from joule.sampling_params import RequestOutputKind, SamplingParams
from joule.server.abuse_guard import AbuseGuard, OverBudgetError
from joule.server.async_engine import (
    AsyncEngine,
    EngineStepError,
    EngineStoppedError,
    QueueFullError,
)
from joule.server.errors import APIError, bad_request, from_value_error

_SAMPLING_FIELDS = {
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens", "max_tokens", "logprobs",
    "max_completion_tokens", "top_logprobs", "prompt", "prompt_token_ids", "messages", "priority", "prompt_logprobs",
    "logit_bias", "structured_outputs", "allowed_token_ids", "truncate_prompt_tokens",
}


# Inputs longer than this are tokenized on a worker thread so the event loop keeps serving streams.
_OFFLOAD_CHARS = 8192


async def off_loop_if_large(size: int, function, *args):
    """Run CPU-heavy request preparation (tokenizing, chat templates) off the event loop when it is big."""
    if size < _OFFLOAD_CHARS:
        return function(*args)
    return await asyncio.to_thread(function, *args)


@dataclass
class ServingContext:
    """Everything a handler needs, built once per app."""

    engine: AsyncEngine
    tokenizer: object | None
    served_model_names: list[str]
    max_model_len: int
    vocab_size: int
    retry_after_seconds: int = 1
    abuse_guard: AbuseGuard | None = None
    metrics: object | None = None  # a ServerMetrics, counting rejections
    tool_call_parser: str | None = None  # how tool_choice "auto" reads replies (joule.server.tool_calls)
    chat_template: str | None = None  # joule serve --chat-template: used instead of the model's
    reasoning_parser: str | None = None  # joule serve --reasoning-parser: thinking apart from the answer

    def limit_max_tokens(self, requested: int | None, param: str = "max_tokens", explicit: bool = True) -> int | None:
        """The max_tokens to generate with: ``requested`` if within the cap (else 400), the cap if omitted."""
        if self.abuse_guard is None:
            return requested
        try:
            return self.abuse_guard.limit_max_tokens(requested, param, explicit)
        except ValueError as error:
            raise bad_request(str(error), param=param) from None

    def check_tenant(self, user: str | None) -> None:
        """429 with Retry-After while the request's tenant is over a budget (checked before any work)."""
        if self.abuse_guard is None:
            return
        try:
            self.abuse_guard.check(self.abuse_guard.tenant_of(user))
        except OverBudgetError as error:
            raise self._reject(error.reason, str(error), error.retry_after_seconds) from None

    def _reject(self, reason: str, message: str, retry_after_seconds: int) -> APIError:
        if self.metrics is not None:
            self.metrics.on_rejected(reason)
        return APIError(429, message, code=reason, headers={"Retry-After": str(retry_after_seconds)})

    def check_model(self, requested: str | None) -> str:
        """The name to echo back; 404 for a model this server does not serve."""
        if requested is None:
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise APIError(
                404, f"The model `{requested}` does not exist. Served: {', '.join(self.served_model_names)}.",
                param="model", code="model_not_found",
            )
        return requested

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as token ids", param="prompt")
        return self.tokenizer

    def check_token_ids(self, token_ids: list[int], param: str = "prompt", keep_last: int | None = None) -> list[int]:
        """The prompt's ids (only the last ``keep_last``: ``truncate_prompt_tokens``), each in the vocabulary."""
        if keep_last is not None:
            token_ids = token_ids[-keep_last:]
        if not token_ids:
            raise bad_request(f"{param} is empty: it must contain at least one token", param=param)
        for token_id in token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise bad_request(
                    f"{param} contains token id {token_id}, outside the vocabulary [0, {self.vocab_size})", param=param
                )
        return token_ids

    def check_context(self, prompt_len: int, max_tokens: int | None, param: str = "max_tokens") -> None:
        """Reject prompt + max_tokens beyond the context, naming both numbers as OpenAI does."""
        if prompt_len >= self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt is "
                f"{prompt_len} tokens, which leaves no room for a completion.", param="prompt",
            )
        if max_tokens is not None and prompt_len + max_tokens > self.max_model_len:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion). "
                f"Please reduce the prompt or {param}.", param=param,
            )

    async def submit(
        self, prompts: list[list[int]], params: SamplingParams, request_id: str, priority: int, tenant: str | None,
        slo: RequestSLO | None = None, constraint_field: str | None = None,
    ):
        """Hand the request to the engine; 429 with Retry-After when the waiting queue is full. The engine names
        a bad constraint ``structured_outputs``; ``constraint_field`` is the request field it came from. Other
        ValueErrors (token ids outside the vocabulary, say) name their field first and become 400s for it."""
        try:
            return await self.engine.submit(prompts, params, request_id, priority, tenant, slo)
        except QueueFullError as error:
            raise self._reject("queue_full", str(error), self.retry_after_seconds) from None
        except EngineStoppedError as error:
            raise APIError(503, str(error)) from None
        except ValueError as error:
            api_error = from_value_error(error, _SAMPLING_FIELDS)
            if api_error.param == "structured_outputs" and constraint_field is not None:
                api_error.param = constraint_field
            raise api_error from None


def check_request(request) -> None:
    """400 for features this server does not implement, and stream_options without stream."""
    unsupported = request.unsupported_fields()
    if unsupported:
        raise bad_request(f"{unsupported[0]} is not supported by this server", param=unsupported[0])
    if request.stream_options is not None and not request.stream:
        raise bad_request("stream_options can only be set when stream is true", param="stream_options")
    if request.prompt_logprobs is not None and request.stream:
        raise bad_request("prompt_logprobs are not available when stream is true", param="prompt_logprobs")


def build_sampling_params(request, max_tokens: int | None, logprobs: int | None,
                          prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's sampling fields as SamplingParams (DELTA outputs: the server accumulates)."""
    values = dict(
        n=request.n, presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        seed=request.seed, stop=request.stop, stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        logit_bias=request.logit_bias, truncate_prompt_tokens=request.truncate_prompt_tokens,
        allowed_token_ids=request.allowed_token_ids,
        skip_special_tokens=request.skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output, output_kind=RequestOutputKind.DELTA,
    )
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        value = getattr(request, name)
        if value is not None:
            values[name] = value
    try:
        values["structured_outputs"], _ = request.structured_outputs_spec()
    except ValueError as error:
        raise bad_request(str(error), param=str(error).split(" ", 1)[0]) from None
    if max_tokens is not None and request.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({request.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
    try:
        return SamplingParams(**values)
    except ValueError as error:
        raise from_value_error(error, _SAMPLING_FIELDS) from None


def ranked_entries(entry: dict[int, Logprob], limit: int) -> list[tuple[int, Logprob]]:
    """The ``limit`` best alternatives of one position, best first."""
    ranked = sorted(entry.items(), key=lambda item: (item[1].rank if item[1].rank is not None else 1 << 30))
    return ranked[:limit]


def sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class PlainChunks:
    """Renders a stream's plain chunks (one choice, no logprobs, no usage, no energy) without pydantic.

    Such chunks are nearly every event of a stream, and a loaded server writes one per stream per step;
    building and dumping the pydantic models was about a quarter of the event loop's time. The JSON
    equals the models' dump (tests compare them); anything richer still goes through the models.
    """

    def __init__(self, request_id: str, obj: str, created: int, model: str):
        head = json.dumps({"id": request_id, "object": obj, "created": created, "model": model},
                          ensure_ascii=False, separators=(",", ":"))
        self._prefix = "data: " + head[:-1] + ',"choices":[{"index":'

    def completion(self, index: int, text: str, finish_reason: str | None, stop_reason: int | str | None) -> str:
        return (f'{self._prefix}{index},"text":{_json(text)},"logprobs":null,"finish_reason":{_json(finish_reason)},'
                f'"stop_reason":{_json(stop_reason)}}}],"usage":null}}\n\n')

    def chat(self, index: int, content: str, finish_reason: str | None, stop_reason: int | str | None) -> str:
        return (f'{self._prefix}{index},"delta":{{"role":null,"content":{_json(content)}}},"logprobs":null,'
                f'"finish_reason":{_json(finish_reason)},"stop_reason":{_json(stop_reason)}}}],"usage":null}}\n\n')


def _json(value: str | int | None) -> str:
    return json.dumps(value, ensure_ascii=False)


def stream_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, EngineStoppedError):
        return APIError(503, str(error))
    if isinstance(error, EngineStepError):
        return APIError(500, str(error))
    return APIError(500, "internal server error")


class EventStreamResponse(StreamingResponse):
    """SSE response that always closes its generator, so a gone client's requests are aborted at once."""

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Run a non-streaming handler, cancelling it (and so aborting its requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return Response(status_code=499)
