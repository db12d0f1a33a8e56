"""Which decode steps of the portable CPU backend rebuild their dense KV copies.

The portable attention backend on a CPU (joule/runtime/attention/decode_contexts.py) keeps the
decoding sequences' keys and values as dense copies between decode-only steps and appends one token
per step; a change of the decoding set, or a row outgrowing its copy, rebuilds them. The step model
follows the plans in the same order to charge each step what the backend does. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from joule.engine.plan import StepPlan
    from joule.perf.batch_shape import BatchShape

# The portable CPU backend's dense decode copies (joule/runtime/attention/decode_contexts.py):
# rebuilt with this many spare tokens per row, rounded up to whole KV blocks.
STAGING_HEADROOM_TOKENS = 64
STAGING_BLOCK_TOKENS = 16
STAGING_MODES = ("", "gather", "append", "rebuild")


@dataclass
class DecodeStaging:
    """Follows a step sequence as the portable CPU backend does, to tell which decode-only steps
    rebuild their dense KV copies (any change of the decoding set, or outgrowing the copies) and
    which only append a token: a rebuild costs a copy of every row's whole context.

    ``max_copy_bytes`` is the backend's bound on the copies (half the KV cache; 0 = none); beyond
    it the step gathers from the paged cache instead.
    """

    kv_bytes_per_token: float  # K + V of one token over all layers, at the compute dtype
    max_copy_bytes: float = 0.0
    _rows: tuple[str, ...] = field(default=(), init=False)
    _lengths: tuple[int, ...] = field(default=(), init=False)
    _capacity: int = field(default=0, init=False)

    def observe(self, request_ids: list[str], lengths: list[int], decode_only: bool) -> tuple[str, int]:
        """(mode, capacity) of a step whose sequences hold ``lengths`` tokens after it."""
        if not decode_only or not lengths:
            self._rows, self._lengths, self._capacity = (), (), 0
            return "gather", 0
        continues = tuple(request_ids) == self._rows and all(
            length == previous + 1 for length, previous in zip(lengths, self._lengths))
        capacity = self._capacity
        if not continues or max(lengths) > capacity:
            capacity = staging_capacity(max(lengths))
        if self.max_copy_bytes and len(lengths) * capacity * self.kv_bytes_per_token > self.max_copy_bytes:
            self._rows, self._lengths, self._capacity = (), (), 0
            return "gather", 0
        mode = "append" if continues and capacity == self._capacity else "rebuild"
        self._rows, self._lengths, self._capacity = tuple(request_ids), tuple(lengths), capacity
        return mode, capacity

    def observe_plan(self, plan: StepPlan, shape: BatchShape) -> None:
        """Fill ``shape.staging`` for the next plan of the sequence."""
        lengths = [s.start_position + s.num_tokens for s in plan.sequences]
        shape.staging, shape.staging_capacity = self.observe(
            [s.request_id for s in plan.sequences], lengths, shape.is_decode_only)


def staging_capacity(longest: int) -> int:
    return -(-(longest + STAGING_HEADROOM_TOKENS) // STAGING_BLOCK_TOKENS) * STAGING_BLOCK_TOKENS
