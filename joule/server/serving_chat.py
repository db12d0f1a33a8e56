"""POST /v1/chat/completions: messages through the model's chat template, replies in OpenAI's shape."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from joule.outputs import CompletionOutput, Logprob
from joule.server.errors import bad_request
from joule.server.protocol import ChatCompletionRequest, ChatMessage, random_id
from joule.server.responses import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    OutputTally,
    ToolCall,
    ToolCallDelta,
    ToolCallFunction,
    TopLogprob,
    UsageInfo,
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
from joule.server.chat_replies import ReplyParts, ReplySplitter
from joule.server.reasoning import make_reasoning_parser
from joule.server.tool_calls import ParsedToolCall, ToolMode, arguments_for_template, tool_mode


def _template_message(message: ChatMessage) -> dict:
    """One message as chat templates read it: tool calls' arguments as objects, a tool reply's call id."""
    entry = {"role": message.role, "content": message.text()}
    if message.tool_calls:
        entry["tool_calls"] = arguments_for_template(message.tool_calls)
        if message.content is None:
            entry["content"] = None
    for name in ("tool_call_id", "name"):
        if getattr(message, name) is not None:
            entry[name] = getattr(message, name)
    return entry


_RESERVED_TEMPLATE_NAMES = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                            "chat_template", "tokenize"}


def render_chat_prompt(
    context: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool = True,
    continue_final_message: bool = False, tools: list[dict] | None = None, keep_last: int | None = None,
    chat_template: str | None = None, template_kwargs: dict | None = None,
) -> list[int]:
    """The conversation as token ids via the chat template (the request's, the server's or the model's);
    template errors are 400s."""
    tokenizer = context.require_tokenizer()
    conversation = [_template_message(message) for message in messages]
    reserved = sorted(_RESERVED_TEMPLATE_NAMES & set(template_kwargs or {}))
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
    try:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, tools=tools or None,
            chat_template=chat_template or context.chat_template, **(template_kwargs or {}),
        )
    except (ValueError, TypeError, jinja2.TemplateError) as error:
        raise bad_request(f"cannot apply the chat template: {error}", param="messages") from None
    return context.check_token_ids(tokenizer.encode(text, add_special_tokens=False), param="messages",
                                   keep_last=keep_last)


def _token_logprobs(entries: list[dict[int, Logprob]], top: int) -> list[ChatTokenLogprob]:
    def described(token_id: int, logprob: Logprob) -> dict:
        token = logprob.decoded_token if logprob.decoded_token is not None else str(token_id)
        return {"token": token, "logprob": logprob.logprob, "bytes": list(token.encode("utf-8"))}

    result = []
    for entry in entries:
        token_id, sampled = next(iter(entry.items()))
        alternatives = [TopLogprob(**described(tid, lp)) for tid, lp in ranked_entries(entry, top)]
        result.append(ChatTokenLogprob(**described(token_id, sampled), top_logprobs=alternatives))
    return result


@dataclass
class _ChatChoiceState:
    text: str = ""
    num_tokens: int = 0
    logprobs: list[ChatTokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    done: bool = False
    sent_role: bool = False


async def create_chat_completion(
    context: ServingContext, body: ChatCompletionRequest, http_request: Request
) -> Response:
    model = context.check_model(body.model)
    check_request(body)
    context.check_tenant(body.user)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
    tools = _tool_mode(context, body)
    text_size = sum(len(message.text()) for message in body.messages)
    prompt_ids = await off_loop_if_large(text_size, render_chat_prompt, context, body.messages,
                                         body.add_generation_prompt, body.continue_final_message, body.tools,
                                         body.truncate_prompt_tokens, body.chat_template, body.chat_template_kwargs)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    context.check_context(len(prompt_ids), max_tokens, param=param)
    max_tokens = context.limit_max_tokens(max_tokens, param=param)  # omitted: the server's cap
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = build_sampling_params(body, max_tokens, logprobs, body.prompt_logprobs)
    constraint_field = body.structured_outputs_spec()[1]
    if tools is not None and tools.constraint is not None:
        params.structured_outputs, constraint_field = tools.constraint, "tools"
    request_id = random_id("chatcmpl")
    stream = await context.submit([prompt_ids], params, request_id, body.priority, body.user, body.slo(),
                                  constraint_field=constraint_field)
    reasoning = make_reasoning_parser(context.reasoning_parser) if context.reasoning_parser else None
    splitter = ReplySplitter(reasoning, tools, body.n) if reasoning is not None or tools is not None else None
    handler = _Chat(body, model, request_id, len(prompt_ids), stream, splitter)
    if body.stream:
        return EventStreamResponse(handler.stream())
    return await unless_disconnected(http_request, handler.collect())


def _tool_mode(context: ServingContext, body: ChatCompletionRequest) -> ToolMode | None:
    try:
        tools = tool_mode(body.tools, body.tool_choice, context.tool_call_parser, body.parallel_tool_calls)
    except ValueError as error:
        raise bad_request(str(error), param=str(error).split(" ", 1)[0].split("[", 1)[0]) from None
    if tools is not None and tools.constraint is not None and body.structured_outputs_spec()[0] is not None:
        raise bad_request(f"tool_choice {body.tool_choice!r} constrains the reply already; drop "
                          f"{body.structured_outputs_spec()[1]}", param="tool_choice")
    return tools


def _tool_call_list(calls: list[ParsedToolCall]) -> list[ToolCall]:
    return [ToolCall(id=call.id, function=ToolCallFunction(name=call.name, arguments=call.arguments))
            for call in calls]


class _Chat:
    """One chat call in flight: folds engine deltas into choices or chunks."""

    def __init__(self, body: ChatCompletionRequest, model: str, request_id: str, prompt_len: int, stream,
                 splitter: ReplySplitter | None = None):
        self.body, self.model, self.request_id, self.prompt_len = body, model, request_id, prompt_len
        self.engine_stream, self.splitter = stream, splitter
        self.created = int(time.time())
        self.choices = [_ChatChoiceState() for _ in range(body.n)]
        self.top = body.top_logprobs or 0
        self.tally = OutputTally()
        self.prompt_logprobs: list | None = None  # RequestOutput.prompt_logprobs, once it came

    def _update(self, completion: CompletionOutput) -> list[ChatTokenLogprob] | None:
        """Fold one delta in; None when the choice had already ended (a repeated final delta)."""
        choice = self.choices[completion.index]
        if choice.done:
            return None
        choice.text += completion.text
        choice.num_tokens += len(completion.token_ids)
        new_logprobs = _token_logprobs(completion.logprobs or [], self.top) if self.body.logprobs else []
        choice.logprobs += new_logprobs
        if completion.finish_reason is not None:
            choice.finish_reason, choice.stop_reason, choice.done = (
                completion.finish_reason, completion.stop_reason, True
            )
        return new_logprobs

    def _usage(self) -> UsageInfo:
        return UsageInfo.of(self.prompt_len, sum(choice.num_tokens for choice in self.choices), self.tally)

    async def collect(self) -> Response:
        try:
            async for _, output in self.engine_stream:
                self.tally.update(0, output)
                if output.prompt_logprobs is not None:
                    self.prompt_logprobs = output.prompt_logprobs
                for completion in output.outputs:
                    self._update(completion)
        except Exception as error:
            return stream_error(error).response()
        finally:
            self.engine_stream.abort()
        choices = []
        for index, choice in enumerate(self.choices):
            parts = self.splitter.whole(choice.text) if self.splitter is not None else ReplyParts(content=choice.text)
            calls = parts.calls or []
            choices.append(ChatChoice(
                index=index, message=ChatResponseMessage(content=parts.content, reasoning_content=parts.reasoning,
                                                         tool_calls=_tool_call_list(calls) or None),
                logprobs=ChatLogprobs(content=choice.logprobs) if self.body.logprobs else None,
                finish_reason=_finish_reason(choice.finish_reason, calls), stop_reason=choice.stop_reason,
                prompt_logprobs=ChatChoice.of(self.prompt_logprobs, self.body.prompt_logprobs or 0),
            ))
        response = ChatCompletionResponse(
            id=self.request_id, model=self.model, created=self.created, choices=choices, usage=self._usage()
        )
        return JSONResponse(response.model_dump(), headers=self.tally.header())

    def _chunk(self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None, final: bool = False) -> str:
        """``final``: the last content chunk, which carries the request's joules as a trailing field."""
        return sse(ChatCompletionChunk(
            id=self.request_id, model=self.model, created=self.created, choices=choices, usage=usage,
            energy_joules=self.tally.joules if final else None, energy_source=self.tally.source if final else None,
        ))

    async def stream(self) -> AsyncIterator[str]:
        options = self.body.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = include_usage and options.continuous_usage_stats
        body = self._parsed_chunks() if self.splitter is not None else self._content_chunks(continuous)
        try:
            for index in range(self.body.n):  # OpenAI opens every choice with the role
                yield self._chunk([ChatStreamChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
            async for event in body:
                yield event
            if include_usage:
                yield self._chunk([], usage=self._usage())
        except Exception as error:
            yield stream_error(error).sse_payload()
        finally:
            self.engine_stream.abort()
        yield SSE_DONE

    async def _deltas(self) -> AsyncIterator[tuple[CompletionOutput, list[ChatTokenLogprob]]]:
        """Each engine delta of a choice still open, folded in, with its new logprobs."""
        async for _, output in self.engine_stream:
            self.tally.update(0, output)
            for completion in output.outputs:
                new_logprobs = self._update(completion)
                if new_logprobs is not None:
                    yield completion, new_logprobs

    async def _content_chunks(self, continuous: bool) -> AsyncIterator[str]:
        plain = PlainChunks(self.request_id, "chat.completion.chunk", self.created, self.model)
        async for completion, new_logprobs in self._deltas():
            if not completion.text and not completion.finish_reason and not new_logprobs:
                continue
            final = all(c.done for c in self.choices)
            if not final and not continuous and not self.body.logprobs:
                yield plain.chat(completion.index, completion.text, completion.finish_reason, completion.stop_reason)
                continue
            choice = ChatStreamChoice(
                index=completion.index, delta=ChatDelta(content=completion.text),
                logprobs=ChatLogprobs(content=new_logprobs) if self.body.logprobs else None,
                finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
            )
            yield self._chunk([choice], usage=self._usage() if continuous else None, final=final)

    async def _parsed_chunks(self) -> AsyncIterator[str]:
        """Thinking, answer and calls apart (``ReplySplitter``): text goes out once it is sure what it is, a
        choice's calls whole in its last chunk, logprobs with the first chunk after their tokens."""
        pending_logprobs: list[list[ChatTokenLogprob]] = [[] for _ in range(self.body.n)]
        async for completion, new_logprobs in self._deltas():
            index, choice = completion.index, self.choices[completion.index]
            pending_logprobs[index] += new_logprobs
            parts = self.splitter.advance(index, choice.text, choice.done)
            if parts.reasoning is None and parts.content is None and not choice.done:
                continue
            calls = parts.calls or []
            deltas = [ToolCallDelta(index=position, **call.model_dump())
                      for position, call in enumerate(_tool_call_list(calls))]
            chunk = ChatStreamChoice(
                index=index, delta=ChatDelta(content=parts.content, reasoning_content=parts.reasoning,
                                             tool_calls=deltas or None),
                logprobs=ChatLogprobs(content=pending_logprobs[index]) if self.body.logprobs else None,
                finish_reason=_finish_reason(choice.finish_reason, calls) if choice.done else None,
                stop_reason=choice.stop_reason if choice.done else None,
            )
            pending_logprobs[index] = []
            yield self._chunk([chunk], final=all(c.done for c in self.choices))


def _finish_reason(reason: str | None, calls: list) -> str | None:
    """OpenAI's ``tool_calls`` when a reply that ended by itself made calls."""
    return "tool_calls" if calls and reason == "stop" else reason
