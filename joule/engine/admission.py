"""Admission control: whether a waiting request may join the running set now.

- ``greedy``: admit while blocks and budget last; when blocks later run out, a
  running request is preempted and recomputed.
- ``predicted`` (Past-Future): predict each request's output length from the
  output lengths of requests that finished recently, and admit a request only
  while the predicted PEAK KV use of the running set plus it fits the cache.
  Running requests grow one token per step and release their blocks when they
  reach their predicted length, so the peak is found by walking those finish
  times: just before the i-th earliest finisher ends, it and every later one
  hold their current tokens plus the steps elapsed. Preemption stays as the
  fallback for mispredictions.

The predicted length of a request that has generated ``g`` tokens is a high
quantile of the recorded lengths longer than ``g`` (the past, conditioned on
what is known), capped by its ``max_tokens`` and ``max_model_len``; with too
little history, or when it has outlived every recorded request, the cap itself.
Pure Python, no torch.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Protocol

from joule.engine.request import Request

ADMISSION_POLICIES = ("greedy", "predicted")


class AdmissionPolicy(Protocol):
    name: str

    def may_admit(self, candidate: Request, running: list[Request]) -> bool: ...

    def on_finished(self, request: Request) -> None: ...


class GreedyAdmission:
    """Admit whenever there is room right now."""

    name = "greedy"

    def may_admit(self, candidate: Request, running: list[Request]) -> bool:
        return True

    def on_finished(self, request: Request) -> None:
        pass


class OutputLengthPredictor:
    """Conditional high quantile of recent output lengths; see the module docstring."""

    def __init__(self, max_model_len: int, history_size: int = 1000, quantile: float = 0.9, min_history: int = 16):
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile!r}.")
        for name, value in (("history_size", history_size), ("min_history", min_history)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.max_model_len = max_model_len
        self.quantile = quantile
        self.min_history = min_history
        self._recent: deque[int] = deque(maxlen=history_size)  # arrival order, to forget the oldest
        self._sorted: list[int] = []  # the same lengths, sorted, for quantiles

    @property
    def num_recorded(self) -> int:
        return len(self._recent)

    def record(self, num_output_tokens: int) -> None:
        if len(self._recent) == self._recent.maxlen:
            oldest = self._recent[0]
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self._recent.append(num_output_tokens)
        bisect.insort(self._sorted, num_output_tokens)

    def predict_output_tokens(self, request: Request) -> int:
        """Predicted total output tokens of ``request`` (at least one more than it has now)."""
        cap = max(1, min(request.max_tokens, self.max_model_len - request.num_prompt_tokens))
        generated = request.num_output_tokens
        if len(self._sorted) < self.min_history:
            return max(cap, generated + 1)
        first_longer = bisect.bisect_right(self._sorted, generated)
        num_longer = len(self._sorted) - first_longer
        if num_longer == 0:
            return max(cap, generated + 1)
        index = first_longer + min(num_longer - 1, int(self.quantile * num_longer))
        return max(generated + 1, min(cap, self._sorted[index]))


def peak_kv_blocks(holdings: list[tuple[int, int]], block_size: int) -> float:
    """Upper bound on the most KV blocks held at once by requests given as (tokens now, steps left).

    A request holding ``n`` tokens with ``s`` steps left grows to ``n + s`` tokens and then frees all.
    ceil(x / b) <= (x + b - 1) / b keeps the walk linear after sorting.
    """
    ordered = sorted(holdings, key=lambda holding: holding[1])
    tokens_after = [0] * (len(ordered) + 1)  # tokens now of the requests from index i on
    for index in range(len(ordered) - 1, -1, -1):
        tokens_after[index] = tokens_after[index + 1] + ordered[index][0]
    peak = 0.0
    for index, (_, steps_left) in enumerate(ordered):
        present = len(ordered) - index
        held = (tokens_after[index] + present * (steps_left + block_size - 1)) / block_size
        peak = max(peak, held)
    return peak


class PredictedPeakAdmission:
    """Past-Future admission: the predicted peak KV of running + candidate must fit ``num_blocks``."""

    name = "predicted"

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int,
                 predictor: OutputLengthPredictor | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.predictor = predictor or OutputLengthPredictor(max_model_len)

    def holding(self, request: Request) -> tuple[int, int]:
        """(tokens it will hold once its known tokens are computed, predicted steps left)."""
        steps_left = self.predictor.predict_output_tokens(request) - request.num_output_tokens
        return request.num_tokens, steps_left

    def may_admit(self, candidate: Request, running: list[Request]) -> bool:
        if not running:
            return True  # alone it always fits (add_request checked), so nothing can deadlock
        holdings = [self.holding(request) for request in running]
        holdings.append(self.holding(candidate))
        return peak_kv_blocks(holdings, self.block_size) <= self.num_blocks

    def on_finished(self, request: Request) -> None:
        self.predictor.record(request.num_output_tokens)


def make_admission_policy(name: str, num_blocks: int, block_size: int, max_model_len: int) -> AdmissionPolicy:
    if name == "greedy":
        return GreedyAdmission()
    if name == "predicted":
        return PredictedPeakAdmission(num_blocks, block_size, max_model_len)
    raise ValueError(f"admission policy must be one of {', '.join(ADMISSION_POLICIES)}, got {name!r}.")
