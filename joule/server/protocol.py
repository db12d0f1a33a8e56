"""Pydantic request models in OpenAI's (and vLLM's) wire shapes (responses: ``responses.py``).

Requests ignore unknown fields, as vLLM does, so newer clients keep working; type errors become
400s naming the field (see ``errors.py``). Value ranges are checked by ``SamplingParams`` so the
rules live in one place.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
)

from joule.engine.request import RequestSLO
from joule.sampling_params import StructuredOutputsParams
from joule.server.constraint_fields import structured_outputs_of

MAX_LOGPROBS = 20

# A latency target in milliseconds: a JSON number (not a string or a boolean), positive and finite.
SLOMilliseconds = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Request):
    """Fields shared by completions and chat, including vLLM's extras."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    priority: int = 0
    # Joule's extras: latency targets the scheduler's ``deadline`` policy plans against.
    ttft_slo_ms: SLOMilliseconds | None = None  # time to first token
    tpot_slo_ms: SLOMilliseconds | None = None  # time per output token after the first
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # vLLM's: each prompt token's logprob (after the first), with this many likeliest alternatives.
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)  # keep the prompt's last N tokens
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias in [-100, 100]
    allowed_token_ids: list[int] | None = None  # vLLM's: sample only among these
    # What the output must match: OpenAI's response_format, vLLM's structured_outputs and its older guided_*.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def slo(self) -> RequestSLO | None:
        """The latency targets as the engine takes them (seconds), or None when the request sets none."""
        if self.ttft_slo_ms is None and self.tpot_slo_ms is None:
            return None
        return RequestSLO(
            ttft_seconds=self.ttft_slo_ms / 1000.0 if self.ttft_slo_ms is not None else None,
            tpot_seconds=self.tpot_slo_ms / 1000.0 if self.tpot_slo_ms is not None else None,
        )

    def unsupported_fields(self) -> list[str]:
        """Fields set to something this server cannot honour."""
        return []

    def structured_outputs_spec(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """The output constraint and the field that asked for it (``joule.server.constraint_fields``)."""
        return structured_outputs_of(self)


PromptField = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_SamplingFields):
    prompt: PromptField
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported_fields(self) -> list[str]:
        names = super().unsupported_fields() + (["suffix"] if self.suffix else [])
        if self.best_of is not None and self.best_of != self.n:
            names.append("best_of")
        return names


class ChatContentPart(_Request):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None  # vLLM's: this template's text instead of the model's (or the server's)
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables, e.g. {"enable_thinking": false}
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True  # False: at most one call per reply



class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[StrictInt]
