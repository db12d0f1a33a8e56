"""EngineConfig: every option of ``LLM`` and ``joule serve`` in one validated place."""

from __future__ import annotations

from dataclasses import dataclass, fields

from joule.engine.policies import DEFAULT_FAIR_PROMPT_CAP


@dataclass
class EngineConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    kv_cache_dtype: str = "auto"  # "auto" = the model dtype; "fp8" (e4m3) halves KV memory and reads
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    load_format: str = "auto"
    tokenizer: str | None = None
    scheduling_policy: str = "fcfs"
    admission_policy: str = "greedy"
    fair_prompt_cap: int = DEFAULT_FAIR_PROMPT_CAP
    fair_split_decodes: bool = False
    fair_keep_up: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    decode_lookahead: bool | None = None  # None: on where it pays (a GPU), off on the CPU (engine.core.lookahead_on)

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_batched_tokens", "kv_cache_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        for name in ("max_num_seqs", "block_size", "fair_prompt_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("fair_split_decodes", "fair_keep_up"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.decode_lookahead is not None and not isinstance(self.decode_lookahead, bool):
            raise ValueError(f"decode_lookahead must be True, False or None (auto), got {self.decode_lookahead!r}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        from joule.engine.policies import POLICIES

        if self.scheduling_policy not in POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(POLICIES)}, got {self.scheduling_policy!r}.")
        from joule.engine.admission import ADMISSION_POLICIES

        if self.admission_policy not in ADMISSION_POLICIES:
            raise ValueError(
                f"admission_policy must be one of {', '.join(ADMISSION_POLICIES)}, got {self.admission_policy!r}."
            )
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"enable_chunked_prefill must be True or False, got {self.enable_chunked_prefill!r}.")
        if (
            not self.enable_chunked_prefill
            and self.max_num_batched_tokens is not None
            and self.max_model_len is not None
            and self.max_num_batched_tokens < self.max_model_len
        ):
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than max_model_len="
                f"{self.max_model_len}: without chunked prefill every prompt must fit one step."
            )
        from joule.runtime.attention.base import KV_CACHE_DTYPES

        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}.")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}.")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs)
