"""Host work that depends on how a run is observed, not on its batch: streamed outputs and energy metering.

A streaming server asks for an output every step (DELTA): a ``RequestOutput`` per request per step, with its text
delta. ``LLM.generate`` and the benchmarks ask for FINAL_ONLY: one output at the end. The energy ledger reads the
meter twice a step and splits the step's joules over its requests; benchmarks that time the engine alone turn it
off. Calibration runs its steps streamed and metered, so the fitted per-step and per-sequence overheads hold both.
``measure_output_costs`` measures them apart, on the calibrating engine with its model replaced by a stub that
returns a token per sampled sequence, so the step model can charge each run for what it asks.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, fields

from joule.heap import heap_frozen_while_running


@dataclass(frozen=True)
class OutputCosts:
    """Host seconds per step: per sampled sequence whose request streams, per sequence of a metered step, and per
    metered step (the meter's reads)."""

    streamed_sequence_s: float = 0.0
    metered_sequence_s: float = 0.0
    metered_step_s: float = 0.0

    def __post_init__(self) -> None:
        for term in fields(self):
            if getattr(self, term.name) < 0:
                raise ValueError(f"{term.name} must be non-negative, got {getattr(self, term.name)!r}")


def measure_output_costs(engine, max_sequences: int = 256, steps: int = 24, repeats: int = 5,
                         prompt_tokens: int = 8) -> OutputCosts:
    """Time decode steps of a stubbed model at two batch sizes, FINAL_ONLY or DELTA, metered or not; the costs are
    the differences (the best of ``repeats`` passes each: host jitter only ever adds time).

    The large batch is as many sequences as the engine's KV cache and ``max_num_seqs`` allow, up to
    ``max_sequences``. The engine is left as it was: requests aborted, prefix cache reset, executor and meter back.
    """
    from joule.sampling_params import RequestOutputKind

    core = engine.core
    tokens_per_sequence = prompt_tokens + 1 + steps * repeats
    blocks_per_sequence = -(-tokens_per_sequence // engine.block_manager.block_size)
    large = min(max_sequences, core.scheduler.config.max_num_seqs,
                engine.block_manager.num_free_blocks // (blocks_per_sequence + 1))
    small = max(1, large // 16)
    if large < 4 * small or large < 8:
        raise ValueError(f"the KV cache holds {large} sequences of {tokens_per_sequence} tokens: too few to "
                         "measure per-sequence output costs")
    final, delta = RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA
    observer, executor, lookahead = core.step_observer, core.executor, core.decode_lookahead
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    sampled = _ordinary_tokens(vocab, rng)
    core.executor, core.decode_lookahead = _StubExecutor(sampled), False
    try:
        with heap_frozen_while_running():
            def timed(count: int, kind, metered: bool) -> float:
                core.step_observer = observer if metered else None
                return _decode_step_seconds(engine, count, kind, steps, repeats, prompt_tokens, rng)

            final_small, final_large = timed(small, final, False), timed(large, final, False)
            delta_large = timed(large, delta, False)
            metered_small, metered_large = (timed(small, final, True), timed(large, final, True)) if observer else (
                final_small, final_large)
    finally:
        core.step_observer, core.executor, core.decode_lookahead = observer, executor, lookahead
        engine.block_manager.reset_prefix_cache()
    per_sequence = (final_large - final_small) / (large - small)
    metered_per_sequence = (metered_large - metered_small) / (large - small)
    return OutputCosts(
        streamed_sequence_s=max(0.0, (delta_large - final_large) / large),
        metered_sequence_s=max(0.0, metered_per_sequence - per_sequence),
        metered_step_s=max(0.0, (metered_small - metered_per_sequence * small) - (final_small - per_sequence * small)),
    )


def _ordinary_tokens(vocab: int, rng: random.Random) -> list[int]:
    """Word-piece ids away from the special tokens at either end (a fixed id would detokenize unrealistically)."""
    low, high = min(200, vocab // 4), max(min(20000, vocab - 200), min(200, vocab // 4) + 1)
    return [rng.randrange(low, high) for _ in range(4099)]


class _StubExecutor:
    """A token per sampled sequence, no model: what is timed is the engine's host work around a step."""

    def __init__(self, tokens: list[int]):
        from joule.engine.request import SampledToken

        self._tokens = [SampledToken(token) for token in tokens]
        self._turn = 0

    def execute(self, plan):
        from joule.engine.plan import StepResult

        sampled = {}
        for sequence in plan.sequences:
            if sequence.samples:
                self._turn = (self._turn + 1) % len(self._tokens)
                sampled[sequence.request.request_id] = self._tokens[self._turn]
        return StepResult(sampled=sampled, elapsed_seconds=0.0)


def _decode_step_seconds(engine, count: int, kind, steps: int, repeats: int, prompt_tokens: int,
                         rng: random.Random) -> float:
    """Best of ``repeats`` mean decode-step times with ``count`` sequences of ``kind`` outputs; requests aborted after."""
    from joule.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1 + steps * repeats + 1, ignore_eos=True, output_kind=kind)
    vocab = engine.model_config.vocab_size
    tag = f"output-cost-{time.monotonic_ns()}"
    ids = [f"{tag}-{index}" for index in range(count)]
    for request_id in ids:
        engine.add_request(request_id, {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(prompt_tokens)]},
                           params)
    try:
        requests = engine.core.scheduler.requests
        while any(requests[request_id].num_output_tokens == 0 for request_id in ids):
            engine.step()
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(steps):
                engine.step()
            best = min(best, (time.perf_counter() - started) / steps)
        return best
    finally:
        for request_id in ids:
            engine.abort_request(request_id)
