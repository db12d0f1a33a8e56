"""Pydantic response models in OpenAI's (and vLLM's) wire shapes, with Joule's extras (the request's joules in
``usage``) left out of the JSON where a client would not expect them. Requests: ``protocol.py``."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field, model_serializer


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (OpenAI's field)


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    # Joule's extra: what the request cost, and whether a meter measured it or it is an estimate.
    energy_joules: float | None = None
    energy_source: str | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, tally: "OutputTally | None" = None) -> "UsageInfo":
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=tally.cached_tokens) if tally is not None else None,
            energy_joules=tally.joules if tally is not None else None,
            energy_source=tally.source if tally is not None else None,
        )


class OutputTally:
    """What the engine requests behind one API call (one per prompt) report beyond their tokens, from their latest
    outputs: joules, and prompt tokens found in the prefix cache."""

    def __init__(self) -> None:
        self._by_prompt: dict[int, float] = {}
        self._cached_by_prompt: dict[int, int] = {}
        self.source: str | None = None

    def update(self, prompt_index: int, output) -> None:
        metrics = output.metrics
        if metrics is not None and metrics.energy_joules is not None:
            self._by_prompt[prompt_index] = metrics.energy_joules
            self.source = metrics.energy_source
        if output.num_cached_tokens:
            self._cached_by_prompt[prompt_index] = output.num_cached_tokens

    @property
    def cached_tokens(self) -> int:
        return sum(self._cached_by_prompt.values())

    @property
    def joules(self) -> float | None:
        return sum(self._by_prompt.values()) if self._by_prompt else None

    def header(self) -> dict[str, str]:
        """``X-Joule-Energy`` (joules) and ``X-Joule-Energy-Source`` for a non-streaming response."""
        if self.joules is None:
            return {}
        return {"X-Joule-Energy": f"{self.joules:.6g}", "X-Joule-Energy-Source": self.source or "unknown"}


class _EnergyTrailer(BaseModel):
    """Top-level ``energy_joules`` set on a stream's final content chunk only; absent from the JSON elsewhere."""

    energy_joules: float | None = None
    energy_source: str | None = None

    @model_serializer(mode="wrap")
    def _without_absent_energy(self, handler):
        data = handler(self)
        if not isinstance(data, dict):
            return data
        joules, source = data.pop("energy_joules", None), data.pop("energy_source", None)
        if joules is not None:  # re-added last: a trailing field
            data["energy_joules"], data["energy_source"] = joules, source
        return data


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class _PromptLogprobsTrailer(BaseModel):
    """vLLM's ``prompt_logprobs`` on a choice: None for the first prompt token, then token id -> logprob (the
    prompt token itself and the likeliest alternatives). Last in the JSON, and absent unless asked for."""

    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_prompt_logprobs(self, handler):
        data = handler(self)
        if isinstance(data, dict) and "prompt_logprobs" in data:
            prompt_logprobs = data.pop("prompt_logprobs")
            if prompt_logprobs is not None:
                data["prompt_logprobs"] = prompt_logprobs
        return data

    @staticmethod
    def of(entries: list | None, limit: int) -> list[dict[str, PromptLogprob] | None] | None:
        """``RequestOutput.prompt_logprobs`` in the wire shape, each position cut to its token and ``limit``
        alternatives."""
        if entries is None:
            return None
        result: list[dict[str, PromptLogprob] | None] = []
        for entry in entries:
            if entry is None:
                result.append(None)
                continue
            kept = {}
            for position, (token_id, logprob) in enumerate(entry.items()):
                if position == 0 or (logprob.rank is not None and logprob.rank <= limit):
                    kept[str(token_id)] = PromptLogprob(logprob=logprob.logprob, rank=logprob.rank,
                                                        decoded_token=logprob.decoded_token)
            result.append(kept)
        return result


class CompletionChoice(_PromptLogprobsTrailer):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_EnergyTrailer):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class _OmitsAbsentExtras(BaseModel):
    """``reasoning_content`` and ``tool_calls`` appear in the JSON only when there are some (every plain chunk
    stays as it was)."""

    @model_serializer(mode="wrap")
    def _without_absent_extras(self, handler):
        data = handler(self)
        if isinstance(data, dict):
            for name in ("reasoning_content", "tool_calls"):
                if name in data and data[name] is None:
                    del data[name]
        return data


class ToolCallFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ToolCallDelta(ToolCall):
    index: int


class ChatResponseMessage(_OmitsAbsentExtras):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # a reasoning model's thinking (joule serve --reasoning-parser)
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_PromptLogprobsTrailer):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(_OmitsAbsentExtras):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_EnergyTrailer):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "joule"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
