"""ModelExecutor: turns a StepPlan into tensors, runs the model, samples.

This is the computing side of the one seam (``joule.engine.plan.Executor``);
the simulator has a predicting side with the same signature. On CUDA with the
Triton backend, decode-only steps replay captured CUDA graphs
(``joule.runtime.cuda_graphs``); every other step, and every step on the CPU,
runs eagerly.
"""

from __future__ import annotations

import logging
import operator
import os
import time
from dataclasses import dataclass

import torch

from joule.engine.plan import CONTINUATION_TOKEN, ScheduledSequence, StepPlan, StepResult
from joule.engine.request import Request, SampledToken
from joule.runtime.attention.base import (
    AttentionBackend,
    ForwardContext,
    KVCache,
)
from joule.runtime.cuda_graphs import DecodeGraphRunner, graphs_disabled_reason
from joule.runtime.device import upload
from joule.runtime.gate_up_tuning import tune_decode_gate_up
from joule.runtime.kernel_warmup import (compile_fused_gate_up, compile_last_layer_rows, compile_logits_rows,
                                         warmup_plans)
from joule.runtime.prefill_graphs import PrefillChunkGraphRunner, can_run_mixed_step, run_mixed_step
from joule.runtime.sampler import Sampler, SamplingRow, greedy_tokens, prompt_logprobs
from joule.runtime.sampling_rows import all_rows_pass, params_on_device, params_plain_greedy, sampling_row
from joule.runtime.step_inputs import prepare_step_inputs

logger = logging.getLogger(__name__)
_request_of = operator.attrgetter("request")
_token_ids_of = operator.attrgetter("token_ids")
_first_of = operator.itemgetter(0)
_prompt_logprobs_of = operator.attrgetter("request.sampling_params.prompt_logprobs")
_samples_of = operator.attrgetter("samples")
TOKEN_COPY_STREAM_ENV = "JOULE_TOKEN_COPY_STREAM"  # "0": sampled tokens go to the host on the main stream


@dataclass
class LaunchedStep:
    """A step whose device work is queued (``ModelExecutor.launch``); ``collect`` waits for its tokens.

    Steps whose rows all sample on the device (greedy, temperature, top-k/p, min-p, seeds) keep their tokens
    there (``token_ids``, one per request in ``requests``' order) and start copying them to the host at once
    (``host_token_ids``, done when ``copied`` fires): a plain ``.tolist()`` in ``collect`` would wait for
    everything queued after this step on the stream, a continuation included, and nothing would overlap.
    Steps that need the host's sampler (logprobs, penalties, bans) are complete at launch (``result``), except
    a continuation's: its logits wait for ``collect`` (``logits``), so launching it does not wait for the step
    ahead of it.
    """

    requests: list[Request]
    started: float
    token_ids: torch.Tensor | None = None
    result: StepResult | None = None
    logits: torch.Tensor | None = None
    host_token_ids: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None
    prompt_logprobs: dict | None = None  # StepResult.prompt_logprobs, scored at launch


class ModelExecutor:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        backend: AttentionBackend,
        sampler: Sampler,
        device: torch.device,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        enforce_eager: bool = False,
        max_num_batched_tokens: int | None = None,
    ):
        """With ``max_model_len`` and ``max_num_seqs`` given, decode graphs are captured when
        the device, backend, ``enforce_eager`` and ``JOULE_ENFORCE_EAGER`` allow it."""
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sampler = sampler
        self._last_collected = 0.0  # perf_counter when the last step's tokens reached the host
        self.device = device
        self.block_size = kv_cache.block_size
        self.graph_runner: DecodeGraphRunner | None = None
        self.chunk_runner: PrefillChunkGraphRunner | None = None  # prompt chunks of mixed steps
        self.use_cuda_graphs = False  # False sends decode steps down the eager path (comparisons)
        # Sampled tokens go to the host on a stream of their own (CUDA), made at the first such step.
        self._token_copy_on_own_stream = os.environ.get(TOKEN_COPY_STREAM_ENV, "1") not in ("0", "false", "off")
        self._token_stream: torch.cuda.Stream | None = None
        if max_model_len is not None and max_num_seqs is not None:
            self.enable_cuda_graphs(max_model_len, max_num_seqs, enforce_eager, max_num_batched_tokens)

    def enable_cuda_graphs(self, max_model_len: int, max_num_seqs: int, enforce_eager: bool = False,
                           max_num_batched_tokens: int | None = None) -> bool:
        """Capture decode graphs for batch sizes up to ``max_num_seqs`` (and, given the step's token budget,
        prompt-chunk graphs); False (and eager) when not possible."""
        reason = graphs_disabled_reason(self.device, self.backend, enforce_eager)
        if reason is not None:
            logger.info("CUDA graphs off: %s", reason)
            return False
        runner = DecodeGraphRunner(self.model, self.kv_cache, self.backend, self.device, max_num_seqs, max_model_len)
        tune_decode_gate_up(self.model, runner.batch_sizes)  # before the capture: the graphs record the choice
        runner.capture()
        self.graph_runner, self.use_cuda_graphs = runner, True
        if max_num_batched_tokens is not None and max_num_batched_tokens >= 2:
            chunk_runner = PrefillChunkGraphRunner(self.model, self.kv_cache, self.backend, self.device,
                                                   max_num_batched_tokens, max_model_len)
            chunk_runner.capture()
            self.chunk_runner = chunk_runner
        return True

    @torch.inference_mode()
    def compile_eager_step_kernels(self, max_model_len: int, max_num_seqs: int = 1) -> int:
        """Run ``joule.runtime.kernel_warmup``'s plans through the eager forward (the KV cache must still be
        empty: they write its first blocks), and on CUDA the logits at every sampling row count up to
        ``max_num_seqs``; returns how many plans ran."""
        started = time.perf_counter()
        plans = warmup_plans(max_model_len, self.block_size, self.kv_cache.num_blocks)
        hidden = None
        for plan in plans:
            input_ids, positions, metadata, _ = self._prepare(plan)
            hidden = self.model(input_ids, positions, ForwardContext(self.backend, self.kv_cache, metadata))
        if self.device.type == "cuda":
            compile_logits_rows(self.model, max_num_seqs)  # the greedy argmax's compile too, out of the first step
            compile_last_layer_rows(self.model, max_num_seqs)
            if hidden is not None and self.sampler.fused_sampling.applies(self.device):  # and the fused sampling's
                self.sampler.sample_on_device(self.model.compute_logits(hidden[-1:]), [SamplingRow(temperature=1.0)])
            compile_fused_gate_up(self.model)
            torch.cuda.synchronize(self.device)
        logger.info("compiled the eager-step attention kernels (%d warm-up steps) in %.1f s",
                    len(plans), time.perf_counter() - started)
        return len(plans)

    def execute(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

    def can_continue(self, launched: LaunchedStep) -> bool:
        """A continuation (``Scheduler.schedule_continuation``, which checks the plan's shape) may take
        ``launched``'s tokens as inputs: they stayed on the device (every row sampled there, decided once in
        ``launch``)."""
        return launched.token_ids is not None

    @torch.inference_mode()
    def launch(self, plan: StepPlan, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queue ``plan``'s work; ``collect`` returns its tokens. Steps that sample on the device leave their
        tokens there, so a continuation (``previous`` given: ``previous``'s requests one token or prompt chunk on,
        and maybe new prompts; its decodes' token ids placeholders) takes its inputs from there without a
        host round trip."""
        started = time.perf_counter()
        # A continuation's rows that decode take ``previous``'s tokens on the device (``continued_rows``);
        # its prompt chunks, if any, are plain rows.
        continued_rows, continued_tokens = ([], None) if previous is None else self._continuation_inputs(plan, previous)
        all_continued = len(continued_rows) == len(plan.sequences)
        runner = self.graph_runner
        chunks = self.chunk_runner
        scored_rows = _prompt_logprob_rows(plan)  # graphs keep only the sampled rows' hidden states: eager then
        graphs = (self.use_cuda_graphs and runner is not None and runner.backend is self.backend
                  and not scored_rows)
        if graphs and runner.can_run(plan) and (previous is None or all_continued):
            hidden = runner.run(plan, continued_tokens)
            sequences = plan.sequences
            if all(map(_samples_of, sequences)):  # a decode step: every row, in order (one pass in C)
                sample_rows = None, sequences
            else:
                sample_rows = _rows_and_sequences([(row, sequence) for row, sequence in enumerate(sequences)
                                                  if sequence.samples])
        elif graphs and chunks is not None and chunks.backend is self.backend and (
                can_run_mixed_step(plan, runner, chunks)) and (
                previous is None or continued_rows == [row for row, s in enumerate(plan.sequences)
                                                       if s.num_tokens == 1]):
            hidden, sampling = run_mixed_step(plan, runner, chunks, continued_tokens)
            sample_rows = None, sampling  # the hidden rows are the sampling ones
        else:
            input_ids, positions, metadata, prepared_rows = self._prepare(plan)
            sample_rows = _rows_and_sequences(prepared_rows)
            output_rows = None
            if not scored_rows and len(sample_rows[0]) != plan.num_tokens:  # rows ascend: fewer means not all
                # Only the sampling rows go through the last layer's output projection and MLP (a step of no
                # sampling row keeps its last one: no kernel runs on zero rows).
                output_rows = self._index(sample_rows[0] or [plan.num_tokens - 1])
                sample_rows = None, sample_rows[1]
            if continued_rows:
                offsets = _token_offsets(plan, continued_rows)
                if offsets == list(range(len(offsets))):  # decodes lead a plan: a plain copy
                    input_ids[: len(offsets)].copy_(continued_tokens)
                else:
                    input_ids.index_copy_(0, self._index(offsets), continued_tokens)
            context = ForwardContext(self.backend, self.kv_cache, metadata)
            hidden = self.model(input_ids, positions, context, output_rows)
        scored = self._score_prompts(hidden, scored_rows) if scored_rows else None
        launched = self._launch_sampling(hidden, sample_rows, started, previous)
        launched.prompt_logprobs = scored
        return launched

    def _launch_sampling(self, hidden: torch.Tensor, sample_rows: tuple[list[int] | None, list[ScheduledSequence]],
                         started: float, previous: LaunchedStep | None) -> LaunchedStep:
        """``sample_rows``: the rows of ``hidden`` that sample (None: every row, in order) and their sequences."""
        rows, sequences = sample_rows
        if not sequences:
            return LaunchedStep([], started, result=StepResult(elapsed_seconds=time.perf_counter() - started))
        if rows is not None and rows != list(range(hidden.shape[0])):
            hidden = hidden.index_select(0, self._index(rows))  # no stream sync: a continuation queues behind
        logits = self.model.compute_logits(hidden)
        requests = list(map(_request_of, sequences))
        if all_rows_pass(requests, params_plain_greedy):
            # What the sampler does for such rows (no bans, penalties or logprobs: an argmax), without
            # building a SamplingRow per request (~0.5 ms per 256 rows on the dev CPU) or a host sync.
            if logits.device.type == "cuda":
                from joule.kernels.argmax import argmax_rows  # Triton: imported only where CUDA is

                token_ids = argmax_rows(logits)  # torch reduces a row on one SM: 36 us of a batch-1 step
            else:
                token_ids = greedy_tokens(logits)
            return self._tokens_on_device(requests, started, token_ids)
        if all_rows_pass(requests, params_on_device):
            # Temperature, top-k/p, min-p and seeds need no host either: the tokens stay on the device, so the
            # lookahead goes on past sampled requests as it does past greedy ones. A continuation's decode
            # samples the token after one still on its way to the host (its seeded noise is keyed on that).
            parameters = [sampling_row(sequence.request, int(sequence.token_ids[0] == CONTINUATION_TOKEN))
                          for sequence in sequences]
            return self._tokens_on_device(requests, started, self.sampler.sample_on_device(logits, parameters))
        if previous is not None:  # a continuation's new prompts may sample on the host: not before collect
            return LaunchedStep(requests, started, logits=logits)
        return LaunchedStep(requests, started, result=self._sample(logits, requests, started))

    def _tokens_on_device(self, requests: list[Request], started: float, token_ids: torch.Tensor) -> LaunchedStep:
        """The step's tokens stay on the device for a continuation; a copy to pinned host memory is queued on a
        stream of its own, so the next step's kernels do not queue behind it (on the main stream a batch-1 step
        paid ~8 us for it: the copy and the copy engine's gap after the argmax; ``JOULE_TOKEN_COPY_STREAM=0``
        keeps it on the main stream)."""
        if token_ids.device.type != "cuda":
            return LaunchedStep(requests, started, token_ids=token_ids, host_token_ids=token_ids)
        copied = torch.cuda.Event()
        if not self._token_copy_on_own_stream:
            host_token_ids = token_ids.to("cpu", non_blocking=True)  # into pinned memory, stream-ordered
            copied.record()
        else:
            if self._token_stream is None:
                self._token_stream = torch.cuda.Stream(token_ids.device)
            self._token_stream.wait_stream(torch.cuda.current_stream(token_ids.device))
            with torch.cuda.stream(self._token_stream):
                host_token_ids = token_ids.to("cpu", non_blocking=True)
                copied.record()
            token_ids.record_stream(self._token_stream)  # not reused before the copy has read it
        return LaunchedStep(requests, started, token_ids=token_ids, host_token_ids=host_token_ids, copied=copied)

    def _score_prompts(self, hidden: torch.Tensor, scored_rows: list[tuple[Request, range, int]]) -> dict:
        """Prompt logprobs of ``_prompt_logprob_rows``' positions, as ``StepResult.prompt_logprobs`` holds them."""
        scored = {}
        for request, positions, row in scored_rows:
            next_tokens = request.prompt_token_ids[positions.start + 1 : positions.stop + 1]
            entries = prompt_logprobs(self.model.compute_logits, hidden[row : row + len(positions)], next_tokens,
                                      request.sampling_params.prompt_logprobs)
            scored[request.request_id] = (
                positions.start, [SampledToken(entry.token_id, entry.logprob, entry.rank, entry.top) for entry in entries]
            )
        return scored

    def collect(self, launched: LaunchedStep) -> StepResult:
        """Wait for a launched step's tokens. A step's time runs from its launch or, for a continuation launched
        while the step ahead of it still ran, from when that step's tokens arrived: step times never overlap."""
        result = self._collect_tokens(launched)
        if launched.prompt_logprobs:
            result.prompt_logprobs = launched.prompt_logprobs
        return result

    def _collect_tokens(self, launched: LaunchedStep) -> StepResult:
        if launched.logits is not None:
            result = self._sample(launched.logits, launched.requests, max(launched.started, self._last_collected))
            self._last_collected = time.perf_counter()
            return result
        if launched.result is not None:
            self._last_collected = time.perf_counter()
            return launched.result
        if launched.copied is not None:
            launched.copied.synchronize()  # this step's copy only, not the continuation queued behind it
        token_ids = launched.host_token_ids.tolist()
        now = time.perf_counter()
        started, self._last_collected = max(launched.started, self._last_collected), now
        return StepResult(token_ids={request.request_id: token_id
                                     for request, token_id in zip(launched.requests, token_ids)},
                          elapsed_seconds=now - started)

    def _continuation_inputs(self, plan: StepPlan, previous: LaunchedStep) -> tuple[list[int], torch.Tensor | None]:
        """The rows of ``plan`` that decode ``previous``'s sampled tokens, and those tokens (on the device; None
        without such rows)."""
        if previous.token_ids is None:
            raise ValueError("a continuation needs a previous step whose tokens stayed on the device")
        sequences, previous_requests = plan.sequences, previous.requests
        count = len(sequences)
        if (count <= len(previous_requests) and all(map(operator.is_, map(_request_of, sequences), previous_requests))
                and set(map(_first_of, map(_token_ids_of, sequences))) == {CONTINUATION_TOKEN}):
            # Every row decodes the token its row of ``previous`` sampled (a decode step's continuation whose
            # requests all go on, or whose last ones stopped): passes in C, not a loop over the rows.
            return list(range(count)), previous.token_ids[:count]
        row_of = {id(request): row for row, request in enumerate(previous_requests)}
        rows, sources = [], []
        for row, sequence in enumerate(plan.sequences):
            if sequence.token_ids[0] == CONTINUATION_TOKEN:
                rows.append(row)
                sources.append(row_of[id(sequence.request)])
        if not sources:
            return rows, None  # prompt chunks only
        if sources == list(range(len(sources))):
            return rows, previous.token_ids[: len(sources)]
        return rows, previous.token_ids.index_select(0, self._index(sources))

    def _index(self, values: list[int]) -> torch.Tensor:
        return upload(torch.tensor(values, dtype=torch.int64), self.device)

    def _sample(self, logits: torch.Tensor, requests: list[Request], started: float) -> StepResult:
        sampled: dict[str, SampledToken] = {}
        output = self.sampler.sample(logits, [sampling_row(request) for request in requests])
        for index, request in enumerate(requests):
            if request.constraint is not None:
                request.constraint.accept(output.token_ids[index])
            token_logprobs = output.logprobs[index]
            if token_logprobs is None:
                sampled[request.request_id] = SampledToken(output.token_ids[index])
            else:
                sampled[request.request_id] = SampledToken(
                    token_logprobs.token_id, token_logprobs.logprob, token_logprobs.rank, token_logprobs.top
                )
        return StepResult(sampled=sampled, elapsed_seconds=time.perf_counter() - started)

    def _prepare(self, plan: StepPlan):
        return prepare_step_inputs(plan, self.block_size, self.device)


def _rows_and_sequences(sample_rows: list[tuple[int, ScheduledSequence]]) -> tuple[list[int], list[ScheduledSequence]]:
    """``(row, sequence)`` pairs as ``_launch_sampling`` takes them: the rows, and the sequences."""
    return [row for row, _ in sample_rows], [sequence for _, sequence in sample_rows]


def _prompt_logprob_rows(plan: StepPlan) -> list[tuple[Request, range, int]]:
    """Per request that wants prompt logprobs from this step: the positions to score and the row (in the step's
    flat tokens) of the first."""
    if set(map(_prompt_logprobs_of, plan.sequences)) == {None}:  # the usual step: one pass in C
        return []
    scored, offset = [], 0
    for sequence in plan.sequences:
        request = sequence.request
        if request.sampling_params.prompt_logprobs is not None:
            positions = request.prompt_logprob_positions(sequence.start_position, sequence.num_tokens)
            if positions:
                scored.append((request, positions, offset + positions.start - sequence.start_position))
        offset += sequence.num_tokens
    return scored


def _token_offsets(plan: StepPlan, rows: list[int]) -> list[int]:
    """Where each of ``rows``' (one-token) rows sits in the step's flat token array."""
    offsets, offset, wanted = [], 0, iter(rows)
    target = next(wanted, None)
    for row, sequence in enumerate(plan.sequences):
        if row == target:
            offsets.append(offset)
            target = next(wanted, None)
        offset += sequence.num_tokens
    return offsets
