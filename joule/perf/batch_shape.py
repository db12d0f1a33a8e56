"""A step's batch as the step model sees it: token counts, context lengths and request events, no token values.

Built from a ``StepPlan`` by the engine's recording executor (calibration, validation) and by the simulator,
saved with calibration measurements and refitted from them, so every field has a default that matches what
steps saved before it was added did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from joule.engine.plan import StepPlan
from joule.perf.decode_staging import STAGING_MODES
from joule.sampling_params import RequestOutputKind


@dataclass(frozen=True)
class SequenceWork:
    """One sequence's share of a step."""

    num_new_tokens: int
    context_length: int  # tokens already in the KV cache before this step
    samples: bool
    finishes: bool = False  # the request finishes in this step (its blocks are freed, its output closed)
    # Its request streams (DELTA or CUMULATIVE outputs): a sampled token makes an output object every step, not
    # only at the end (FINAL_ONLY). Steps saved before this was recorded were all measured streaming.
    streams: bool = True


@dataclass
class BatchShape:
    """A step's batch, independent of token values: what the step model needs from a StepPlan.

    ``staging`` says how a decode-only step on a staging backend reaches its KV: "append" (the
    dense copies of the previous step, one token longer), "rebuild" (copies refilled from the
    paged cache, ``staging_capacity`` tokens per row) or "gather" (no copies: padded gathers);
    "" when unknown, which the step model reads as the steady state. ``after_idle``: the engine had
    nothing to run before this step (it waited for an arrival); the first step after idle time pays
    for it. ``queued``: the engine's decode lookahead launched it behind the step before, so its host
    work overlaps the device's: it costs max(host, device), not their sum. ``metered``: the engine's energy
    ledger read the meter and split the step's joules over its requests (on unless a benchmark turns it off).
    """

    sequences: list[SequenceWork] = field(default_factory=list)
    staging: str = ""
    staging_capacity: int = 0
    after_idle: bool = False
    queued: bool = False
    metered: bool = True

    def __post_init__(self) -> None:
        if self.staging not in STAGING_MODES:
            raise ValueError(f"staging must be one of {STAGING_MODES}, got {self.staging!r}")

    @classmethod
    def from_plan(cls, plan: StepPlan, finished_ids=frozenset(), after_idle: bool = False,
                  queued: bool = False, metered: bool = True) -> BatchShape:
        """``finished_ids``: requests this step finishes (known to the simulator, which makes their tokens)."""
        return cls([SequenceWork(s.num_tokens, s.start_position, s.samples, s.request_id in finished_ids,
                                 s.request.sampling_params.output_kind != RequestOutputKind.FINAL_ONLY)
                    for s in plan.sequences], after_idle=after_idle, queued=queued, metered=metered)

    @classmethod
    def decode(cls, batch_size: int, context_length: int) -> BatchShape:
        return cls([SequenceWork(1, context_length, True) for _ in range(batch_size)])

    @classmethod
    def prefill(cls, prompt_lengths: list[int]) -> BatchShape:
        return cls([SequenceWork(length, 0, True) for length in prompt_lengths])

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.sequences)

    @property
    def num_prompt_sequences(self) -> int:
        """Sequences with a prompt chunk (more than one new token); the decodes beside them are batched."""
        return sum(1 for s in self.sequences if s.num_new_tokens > 1)

    @property
    def num_sampled(self) -> int:
        return sum(1 for s in self.sequences if s.samples)

    @property
    def num_streamed(self) -> int:
        """Sampled sequences of streaming requests: each makes an output this step."""
        return sum(1 for s in self.sequences if s.samples and s.streams)

    @property
    def is_decode_only(self) -> bool:
        return all(s.num_new_tokens == 1 for s in self.sequences)

    @property
    def num_finished(self) -> int:
        return sum(1 for s in self.sequences if s.finishes)

    @property
    def finished_tokens(self) -> int:
        """KV tokens of the requests finishing in this step (what freeing their blocks walks over)."""
        return sum(s.context_length + s.num_new_tokens for s in self.sequences if s.finishes)
