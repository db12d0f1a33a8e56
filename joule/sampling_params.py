"""SamplingParams with vLLM's names, defaults and validation.

Invalid values raise ``ValueError`` naming the field at construction, so a bad
request is rejected before it reaches the engine and nothing else is affected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

_GREEDY_EPSILON = 1e-5


class RequestOutputKind(str, Enum):
    """What each streamed output carries: everything so far, only what is new, or only the end."""

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class StructuredOutputsParams:
    """What the output must match (vLLM's ``StructuredOutputsParams``): set exactly one field.

    ``json``: a JSON schema (a dict or its text); ``regex``: a regular expression; ``choice``: one of these strings;
    ``grammar``: a Lark or GBNF (llama.cpp) grammar; ``json_object``: any JSON object.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        chosen = [name for name in self.KINDS if getattr(self, name)]
        if len(chosen) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar, json_object; "
                             f"got {', '.join(chosen) or 'none'}.")
        if self.choice is not None and (not isinstance(self.choice, list)
                                        or not all(isinstance(item, str) and item for item in self.choice)):
            raise ValueError("structured_outputs choice must be a list of non-empty strings.")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"structured_outputs {name} must be a string, got {type(value).__name__}.")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError("structured_outputs json must be a JSON schema (dict or text), "
                             f"got {type(self.json).__name__}.")

    @property
    def kind(self) -> str:
        return next(name for name in self.KINDS if getattr(self, name))


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    # Per prompt token (after the first): its logprob given the tokens before it, plus this many top alternatives.
    prompt_logprobs: int | None = None
    # Token id -> a number added to its logit before sampling (OpenAI's and vLLM's), each in [-100, 100].
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # sample only among these
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding (llguidance)
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last this-many tokens
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stop = _normalize_stop(self.stop)
        self.stop_token_ids = _normalize_token_ids(self.stop_token_ids, "stop_token_ids")
        _check_int(self.n, "n", minimum=1)
        _check_number(self.temperature, "temperature")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        _check_number(self.top_p, "top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        _check_int(self.top_k, "top_k")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}.")
        _check_number(self.min_p, "min_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(value, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}.")
        _check_number(self.repetition_penalty, "repetition_penalty")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}."
            )
        if self.max_tokens is not None:
            _check_int(self.max_tokens, "max_tokens", minimum=1)
        _check_int(self.min_tokens, "min_tokens", minimum=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}."
            )
        if self.logprobs is not None:
            _check_int(self.logprobs, "logprobs", minimum=0)
        if self.prompt_logprobs is not None:
            _check_int(self.prompt_logprobs, "prompt_logprobs", minimum=0)
        if self.logit_bias is not None:
            self.logit_bias = _normalize_logit_bias(self.logit_bias)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _normalize_token_ids(self.allowed_token_ids, "allowed_token_ids")
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty.")
        if self.truncate_prompt_tokens is not None:
            _check_int(self.truncate_prompt_tokens, "truncate_prompt_tokens", minimum=1)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams, "
                             f"got {type(self.structured_outputs).__name__}.")
        if self.seed is not None:
            _check_int(self.seed, "seed")
        if not isinstance(self.output_kind, RequestOutputKind):
            try:
                self.output_kind = RequestOutputKind(self.output_kind)
            except ValueError:
                choices = ", ".join(kind.value for kind in RequestOutputKind)
                raise ValueError(f"output_kind must be one of {choices}, got {self.output_kind!r}.") from None
        if self.is_greedy:
            # Greedy ignores the filters; normalising keeps batches uniform.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPSILON

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    def clone(self, **changes) -> "SamplingParams":
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values["stop"] = list(self.stop or [])
        values["stop_token_ids"] = list(self.stop_token_ids or [])
        values["extra_args"] = dict(self.extra_args)
        values["logit_bias"] = dict(self.logit_bias) if self.logit_bias is not None else None
        values["allowed_token_ids"] = list(self.allowed_token_ids) if self.allowed_token_ids is not None else None
        values.update(changes)
        return SamplingParams(**values)


def _normalize_logit_bias(logit_bias) -> dict[int, float]:
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(logit_bias).__name__}.")
    normalized = {}
    for token_id, bias in logit_bias.items():
        if isinstance(token_id, str) and token_id.lstrip("-").isdigit():
            token_id = int(token_id)  # JSON object keys are strings
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {token_id!r}.")
        _check_number(bias, "logit_bias")
        if not -100.0 <= bias <= 100.0:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}.")
        normalized[token_id] = float(bias)
    return normalized


def _normalize_stop(stop) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, (list, tuple)):
        for item in stop:
            if not isinstance(item, str):
                raise ValueError(
                    f"stop must be a string or a list of strings, got an element of type "
                    f"{type(item).__name__}."
                )
        return [item for item in stop if item]
    raise ValueError(f"stop must be a string or a list of strings, got {type(stop).__name__}.")


def _normalize_token_ids(ids, name: str) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, int) and not isinstance(ids, bool):
        ids = [ids]
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"{name} must be a list of integers, got {type(ids).__name__}.")
    for item in ids:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise ValueError(f"{name} must contain non-negative integers, got {item!r}.")
    return list(ids)


def _check_int(value, name: str, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")


def _check_number(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    if value != value:
        raise ValueError(f"{name} must be a number, got NaN.")
