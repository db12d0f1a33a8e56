"""The data that crosses the one seam between deciding (scheduler) and executing (executor)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from joule.engine.request import Request, SampledToken


# The token id of a continuation step's sequences (``Scheduler.schedule_continuation``): not known when the
# step is planned; the executor takes it from the previous step's samples on the device.
CONTINUATION_TOKEN = -1


@dataclass
class ScheduledSequence:
    """One request's share of a step: ``token_ids`` at positions ``start_position`` onward."""

    request: Request
    token_ids: list[int]
    start_position: int
    block_ids: list[int]
    samples: bool  # True when this step completes the request's known tokens: a token comes out

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_length(self) -> int:
        return self.start_position + len(self.token_ids)


@dataclass
class StepPlan:
    sequences: list[ScheduledSequence] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(sequence.num_tokens for sequence in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences

    @property
    def num_decode_tokens(self) -> int:
        return self.token_counts()[1]

    @property
    def num_prefill_tokens(self) -> int:
        return self.token_counts()[0]

    def token_counts(self) -> tuple[int, int]:
        """(prompt tokens, decode tokens) in one pass: called every step for 100s of sequences."""
        prefill = decodes = 0
        for sequence in self.sequences:
            count = len(sequence.token_ids)
            if count == 1:
                decodes += 1
            else:
                prefill += count
        return prefill, decodes


@dataclass
class StepResult:
    """What executing a plan produced: a token per sampling sequence, and what it cost."""

    sampled: dict[str, SampledToken] = field(default_factory=dict)
    # The same tokens as bare ids instead, from an executor that sampled every row on its device: none of those
    # rows asks for logprobs, and a SampledToken a row cost ~60 us a 256-row step on the dev CPU (when set,
    # ``sampled`` is left empty).
    token_ids: dict[str, int] | None = None
    elapsed_seconds: float = 0.0
    energy_joules: float | None = None
    # Request id -> (index of the first prompt logprob it holds, those logprobs), for requests asking for them.
    prompt_logprobs: dict[str, tuple[int, list[SampledToken]]] = field(default_factory=dict)


class Executor(Protocol):
    """Runs a StepPlan. The model executor computes; the simulator's executor predicts."""

    def execute(self, plan: StepPlan) -> StepResult: ...
