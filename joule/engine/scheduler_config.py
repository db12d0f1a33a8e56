"""The scheduler's settings, checked where they are made (a bad value names its field)."""

from __future__ import annotations

from dataclasses import dataclass

from joule.engine.admission import ADMISSION_POLICIES
from joule.engine.policies import DEFAULT_FAIR_PROMPT_CAP, POLICIES


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    policy: str = "fcfs"
    admission: str = "greedy"
    enable_chunked_prefill: bool = True
    fair_prompt_cap: int = DEFAULT_FAIR_PROMPT_CAP  # the fair policy's prompt tokens per step while it protects a tenant
    fair_split_decodes: bool = False  # the fair policy runs flooding tenants' decodes half per step meanwhile
    fair_keep_up: bool = True  # the fair cap never below what the others need to keep up (VTC is work-conserving)
    # The engine's lookahead (EngineCore) queues steps with prompt chunks and admissions too, not only decodes: a
    # prompt step's host work (~5 ms of 35 on the H100) then overlaps the step before it. Workload 3's prompt steps
    # went 35 -> 30 ms (H100, 2026-12-05 (e), alternated on one engine); earlier A/Bs that saw no gain were blurred
    # by full garbage collections inside runs (joule/heap.py).
    lookahead_prompts: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "fair_prompt_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}.")
        if self.admission not in ADMISSION_POLICIES:
            raise ValueError(f"admission must be one of {', '.join(ADMISSION_POLICIES)}, got {self.admission!r}.")
        for name in ("enable_chunked_prefill", "fair_split_decodes", "fair_keep_up", "lookahead_prompts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than max_model_len="
                f"{self.max_model_len}: without chunked prefill every prompt must fit one step; raise "
                "max_num_batched_tokens, lower max_model_len or enable chunked prefill."
            )
