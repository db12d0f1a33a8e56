"""CUDA graphs for decode-only steps: one captured forward per batch size of a ladder.

Why: a decode step of a small model is a few hundred short kernel launches; on
a GPU their launch cost, not the memory traffic, sets the step time. Replaying a
captured graph issues them all at once.

How:
- ``graph_batch_sizes`` is the ladder of captured sizes (1, 2, 4, 8, 16, 24, 32,
  48, 64, 96, 128, 192, 256, ... and ``max_num_seqs`` itself); a step of ``n``
  decodes runs the graph of the next size up. Padding rows carry slot -1 (the KV
  write skips them) and sequence length 0 (decode attention writes zeros).
- Graphs read static device buffers (token ids, positions, slots, block tables
  of ``max_model_len / block_size`` columns, sequence lengths); each step fills
  a pinned host mirror, and one kernel (``joule/kernels/graph_feed.py``) reads it
  and lays the continued tokens sampled on the device over the token ids
  (``JOULE_GRAPH_FEED=0``: a non-blocking copy and a device copy instead).
- Attention sees a ``StaticDecodeMetadata``: the decode grid is sized from
  ``max_model_len`` with a fixed split count per batch size, so no host value of
  the step enters the graph. Small batches, whose split count for ``max_model_len`` is large, get a
  second graph split for ``SHORT_CONTEXT_TOKENS``, replayed while every row is that short (the kernel
  is right at any length; the choice is speed only).
- Prefill and mixed steps never come here; the executor runs them eagerly.
The graphs return final hidden states; logits and sampling stay eager.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os
import time

import numpy as np
import torch

from joule.engine.plan import StepPlan
from joule.runtime.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    ForwardContext,
    KVCache,
)

logger = logging.getLogger(__name__)

DISABLE_ENV = "JOULE_ENFORCE_EAGER"  # "1" turns CUDA graphs off
FEED_ENV = "JOULE_GRAPH_FEED"  # "0": the inputs go up as copies instead of through the feed kernel
# H200, Llama-3.2-1B, batch-1 graph replay (benchmarks/gpu/short_context_sweep.py): 8 splits take 741-747 us at
# contexts 64-768 against 752-758 us for the 32 that max_model_len 4096 asks for; at 2048 tokens 828 against 771.
SHORT_CONTEXT_TOKENS = 1024
_block_ids_of = operator.attrgetter("block_ids")
_start_position_of = operator.attrgetter("start_position")
_token_ids_of = operator.attrgetter("token_ids")
_first_of = operator.itemgetter(0)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Captured batch sizes: dense where small batches are common, ~1.5x apart above 32, capped."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    sizes = [1, 2, 4, 8, 16, 24, 32]
    while sizes[-1] < max_num_seqs:
        sizes.extend([sizes[-1] * 3 // 2, sizes[-1] * 2])
    kept = sorted({size for size in sizes if size < max_num_seqs} | {max_num_seqs})
    return kept


def padded_batch_size(num_sequences: int, sizes: list[int]) -> int | None:
    """The smallest captured size holding ``num_sequences`` rows, or None when none does."""
    for size in sizes:
        if size >= num_sequences:
            return size
    return None


def graphs_disabled_reason(device: torch.device, backend, enforce_eager: bool) -> str | None:
    """Why decode steps must run eagerly here, or None when graphs can be used."""
    if enforce_eager:
        return "enforce_eager"
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return f"{DISABLE_ENV} is set"
    if device.type != "cuda":
        return f"device is {device.type}, not cuda"
    if getattr(backend, "name", None) != "triton":
        return f"attention backend {getattr(backend, 'name', backend)!r} is not triton"
    return None


class DecodeGraphRunner:
    """Static buffers, padding and (on CUDA) captured graphs for decode-only steps.

    ``capture=False`` runs the same padded static-buffer forward eagerly: that is
    how CPU tests check the padding and metadata without a GPU.
    """

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, backend: AttentionBackend,
                 device: torch.device, max_num_seqs: int, max_model_len: int,
                 short_context_tokens: int = SHORT_CONTEXT_TOKENS):
        # Imported here: triton is optional, and its kernels must be defined after tests set TRITON_INTERPRET.
        from joule.runtime.attention.triton_backend import StaticDecodeMetadata

        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = device
        self.block_size = kv_cache.block_size
        self.max_model_len = max_model_len
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        rows = self.batch_sizes[-1]
        self.max_blocks = -(-max_model_len // self.block_size)
        pin = device.type == "cuda"

        def host(shape, dtype, fill=0):
            return torch.full(shape, fill, dtype=dtype, pin_memory=pin)

        # One pinned host buffer, filled through numpy views, and its device twin: the int64 inputs (ids,
        # positions, slots), then the int32 ones (lengths, block tables), so a step's inputs go up in one feed
        # kernel (or one copy), not five copies (each took a few microseconds of the GPU's timeline between
        # graph replays, which the decode lookahead leaves back to back).
        self._int64_bytes = 3 * rows * 8
        self._host_inputs = host((self._int64_bytes + rows * (1 + self.max_blocks) * 4,), torch.uint8)
        self.host_input_ids, self.host_positions, self.host_slots = self._int64_rows(self._host_inputs, rows)
        self.host_slots.fill_(-1)  # no cache write
        # Copies even on a CPU, so the CPU tests run the same uploads as a GPU.
        self._device_inputs = self._host_inputs.to(device, copy=True)
        self.input_ids, self.positions, self.slots = self._int64_rows(self._device_inputs, rows)
        self.host_sequence_lengths, self.host_block_tables = self._split_int32(self._host_inputs, rows)
        self.sequence_lengths, self.block_tables = self._split_int32(self._device_inputs, rows)
        self.query_start_locations = torch.arange(rows + 1, dtype=torch.int64, device=device)
        self._copied = torch.cuda.Event() if pin else None
        # The feed kernel on CUDA, and under Triton's interpreter so CPU tests run it too.
        from joule.kernels.common import interpreting

        self._feeds = (pin or interpreting()) and os.environ.get(FEED_ENV, "1") not in ("0", "false", "off")
        # The block list each table row holds now and its length then; the array of each list copied lately.
        self._table_lists: list[list[int]] = []
        self._table_counts = np.zeros(rows, dtype=np.int64)
        self._block_arrays: dict[int, tuple[list[int], np.ndarray]] = {}
        self._runnable_rows: list | None = None  # the rows ``can_run`` last passed
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.metadata: dict[int, AttentionMetadata] = {}
        # The short-context variants: sizes whose split count at most halves when every row is short.
        self.short_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.short_outputs: dict[int, torch.Tensor] = {}
        self.short_metadata: dict[int, AttentionMetadata] = {}
        short_bound = min(short_context_tokens, max_model_len)
        num_kv_heads = kv_cache.key_caches[0].shape[2]
        for size in self.batch_sizes:
            self.metadata[size] = StaticDecodeMetadata(
                query_start_locations=self.query_start_locations[: size + 1],
                slot_mapping=self.slots[:size],
                block_tables=self.block_tables[:size],
                query_lengths=[1] * size,
                context_lengths=[0] * size,
                sequence_lengths=[0] * size,
                sequence_lengths_device=self.sequence_lengths[:size],
                max_length_bound=max_model_len,
                num_splits=backend.graph_num_splits(size, num_kv_heads, max_model_len, device),
            )
            short_splits = backend.graph_num_splits(size, num_kv_heads, short_bound, device)
            if 2 * short_splits <= self.metadata[size].num_splits:
                self.short_metadata[size] = dataclasses.replace(
                    self.metadata[size], max_length_bound=short_bound, num_splits=short_splits)

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def can_run(self, plan: StepPlan) -> bool:
        """Decode-only, few enough sequences, and every block table fits the static buffer."""
        sequences = plan.sequences
        if not sequences or len(sequences) > self.max_batch_size:
            return False
        # Whole-list passes in C: asked of every decode step's rows (cProfile, H100 2026-12-05 (d)).
        token_counts = set(map(len, map(_token_ids_of, sequences)))
        if token_counts != {1} or max(map(len, map(_block_ids_of, sequences))) > self.max_blocks:
            return False
        self._runnable_rows = sequences  # ``run`` of this plan next need not walk its rows again
        return True

    def _forward(self, size: int, short: bool = False) -> torch.Tensor:
        metadata = (self.short_metadata if short else self.metadata)[size]
        return self.model(self.input_ids[:size], self.positions[:size],
                          ForwardContext(self.backend, self.kv_cache, metadata))

    def is_short(self, size: int, max_length: int) -> bool:
        """Whether a step of ``size`` rows, none longer than ``max_length`` tokens, runs the short variant."""
        metadata = self.short_metadata.get(size)
        return metadata is not None and max_length <= metadata.max_length_bound

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up then capture each ladder size, largest first, into one shared memory pool."""
        started = time.perf_counter()
        self._warm_feeds()
        self._fill_padding(0, self.max_batch_size)
        self._send(self.max_batch_size)
        self.graphs, self.outputs = capture_graphs(self.batch_sizes, self._forward, self.device)
        if self.short_metadata:
            self.short_graphs, self.short_outputs = capture_graphs(
                list(self.short_metadata), lambda size: self._forward(size, short=True), self.device)
        logger.info("captured %d decode CUDA graphs (batch sizes %s; short-context variants for %s) in %.1f s",
                    len(self.graphs) + len(self.short_graphs), self.batch_sizes, list(self.short_graphs),
                    time.perf_counter() - started)

    def _warm_feeds(self) -> None:
        """Every variant of the feed kernel the steps can launch, now rather than inside a step.

        Why: Triton compiles (or loads) one binary per pattern of its integer arguments (== 1, divisible by 16):
        here each ladder size's segment lengths and a continuation's token count. The first step of a new pattern
        paid for it while the decode lookahead had steps queued: a fresh engine's first run of issue 3's workload 3
        spent ~72 ms in each of its first two 256-row feeds (H100, 2026-12-06 (n), ``w3_step_phases.py --cold``).
        Sends every ladder size without tokens and with a full and a one-short row of them; the inputs written are
        padding's, rewritten before any replay."""
        if not self._feeds:
            return
        for size in self.batch_sizes:
            for count in sorted({0, size, max(size - 1, 1)}):
                tokens = torch.zeros(count, dtype=torch.int64, device=self.device) if count else None
                self._send(size, tokens)
        if self._copied is not None:
            self._copied.synchronize()

    def run(self, plan: StepPlan, token_source: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[len(plan.sequences), hidden]`` of a decode-only step (graph replay on CUDA).
        ``token_source``: the rows' input token ids on the device (a continuation step's), copied in after
        the host inputs."""
        count = len(plan.sequences)
        size = padded_batch_size(count, self.batch_sizes)
        if size is None or (plan.sequences is not self._runnable_rows and not self.can_run(plan)):
            raise ValueError(f"step of {count} sequences cannot run as a decode graph "
                             f"(sizes {self.batch_sizes}, {self.max_blocks} blocks per sequence)")
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copies have left the pinned buffers
        self._fill(plan)
        self._fill_padding(count, size)
        self._send(size, token_source)
        short = self.is_short(size, int(self.host_sequence_lengths.numpy()[:count].max()))
        graphs, outputs = (self.short_graphs, self.short_outputs) if short else (self.graphs, self.outputs)
        if size in graphs:
            graphs[size].replay()
            return outputs[size][:count]
        return self._forward(size, short)[:count]

    def _fill(self, plan: StepPlan) -> None:
        """The host mirrors of ``plan``'s rows, in whole-array passes rather than a Python loop over the rows: a
        graphed decode step's host work sets workload 3's pace on slower hosts (H100 machines, 2026-12-06 (k):
        ~3.1 ms of host work against a ~3.2 ms step, this method 0.39 ms of it as a loop).

        A block-table row is written only where it changed: a row holding another request's block list than last
        step (or a new row), or the same list grown (only its new entries). A request's list grows by appends and
        is replaced, never edited in place, so the held list and its length tell. Rewritten rows copy from an
        array kept per request (copying a Python list costs ~4x copying an array: 0.77 against 0.20 ms for 256
        rows on the dev CPU), so rows that only moved (after a request ends) are cheap."""
        sequences = plan.sequences
        count = len(sequences)
        block_size = self.block_size
        tables = self.host_block_tables.numpy()
        block_lists = list(map(_block_ids_of, sequences))
        counts = np.fromiter(map(len, block_lists), np.int64, count)
        previous_lists, previous_counts = self._table_lists, self._table_counts
        kept = min(count, len(previous_lists))
        same = np.zeros(count, dtype=bool)
        same[:kept] = np.fromiter(map(operator.is_, block_lists[:kept], previous_lists[:kept]), bool, kept)
        grown = same & (counts > previous_counts[:count])
        moved = ~same | (counts < previous_counts[:count])  # a list emptied in place would be rewritten whole
        if grown.any():
            for row in np.flatnonzero(grown).tolist():
                blocks, old = block_lists[row], int(previous_counts[row])
                tables[row, old : len(blocks)] = blocks[old:]
        if moved.any():
            arrays = self._block_arrays
            if len(arrays) > 2 * self.max_batch_size:  # forget requests no row holds
                arrays = self._block_arrays = {id(blocks): arrays[id(blocks)] for blocks in previous_lists
                                               if id(blocks) in arrays and arrays[id(blocks)][0] is blocks}
            for row in np.flatnonzero(moved).tolist():
                blocks = block_lists[row]
                entry = arrays.get(id(blocks))
                if entry is None or entry[0] is not blocks or len(entry[1]) != len(blocks):
                    entry = (blocks, np.asarray(blocks, dtype=np.int32))
                    arrays[id(blocks)] = entry
                tables[row, : len(blocks)] = entry[1]
        self._table_lists = block_lists
        self._table_counts[:count] = counts
        positions = np.fromiter(map(_start_position_of, sequences), np.int64, count)
        self.host_positions.numpy()[:count] = positions
        self.host_input_ids.numpy()[:count] = np.fromiter(map(_first_of, map(_token_ids_of, sequences)), np.int64,
                                                          count)
        block_ids = tables[np.arange(count), positions // block_size]
        self.host_slots.numpy()[:count] = block_ids.astype(np.int64) * block_size + positions % block_size
        self.host_sequence_lengths.numpy()[:count] = positions + 1

    def _fill_padding(self, start: int, stop: int) -> None:
        """Padding rows: token 0 at position 0, no cache write (slot -1), empty context (length 0)."""
        self.host_input_ids[start:stop] = 0
        self.host_positions[start:stop] = 0
        self.host_slots[start:stop] = -1
        self.host_sequence_lengths[start:stop] = 0

    def _int64_rows(self, packed: torch.Tensor, rows: int) -> torch.Tensor:
        """Input ids, positions and slots: ``[3, rows]`` int64 at the start of the packed bytes."""
        return packed[: self._int64_bytes].view(torch.int64).view(3, rows)

    def _split_int32(self, packed: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence lengths, then the block tables: a step's first ``size`` rows of both are one prefix."""
        int32 = packed[self._int64_bytes:].view(torch.int32)
        return int32[:rows], int32[rows:].view(rows, self.max_blocks)

    def _send(self, size: int, token_source: torch.Tensor | None = None) -> None:
        """The first ``size`` rows of the inputs to the device, the first ``len(token_source)`` token ids (a
        continuation's, sampled on the device) from ``token_source``."""
        if token_source is not None and (token_source.dtype != torch.int64 or not token_source.is_contiguous()):
            token_source = token_source.to(torch.int64).contiguous()
        if self._feeds:
            from joule.kernels.graph_feed import feed_graph_inputs

            row_words = 2 * self.max_batch_size  # one int64 row of the packed buffer, in int32 words
            segments = [(0, 2 * size), (row_words, 2 * size), (2 * row_words, 2 * size),  # ids, positions, slots
                        (3 * row_words, self.max_batch_size + size * self.max_blocks)]  # lengths, then the tables
            feed_graph_inputs(self._host_inputs.view(torch.int32), self._device_inputs.view(torch.int32), segments,
                              token_source)
        else:
            self._upload(size)
            if token_source is not None:
                self.input_ids[: token_source.shape[0]].copy_(token_source)
        if self._copied is not None:
            self._copied.record()

    def _upload(self, size: int) -> None:
        """The int64 rows whole (3 x max rows: a few KB) and the int32 ones up to ``size`` rows' tables."""
        extent = self._int64_bytes + (self.max_batch_size + size * self.max_blocks) * 4
        self._device_inputs[:extent].copy_(self._host_inputs[:extent], non_blocking=True)


def capture_graphs(sizes: list[int], forward, device: torch.device):
    """Warm up then capture ``forward(size)`` for each size, largest first, into one shared memory pool.

    Returns the graphs and their output tensors by size; only one of them may be replayed at a time
    while its output is in use (they share the pool).
    """
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    pool = None
    for size in sorted(sizes, reverse=True):
        forward(size)  # compiles Triton kernels, settles cuBLAS workspaces
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[size] = forward(size)
        pool = graph.pool()
        graphs[size] = graph
    torch.cuda.synchronize(device)
    return graphs, outputs


def enable_engine_cuda_graphs(engine, enforce_eager: bool = False) -> bool:
    """Capture decode graphs for an ``LLMEngine`` whose executor was built without them.

    Until the engine passes ``max_model_len``/``max_num_seqs`` to its executor itself, benchmarks
    call this; it is a no-op (True) when graphs are already captured.
    """
    executor = engine.core.executor
    if executor.graph_runner is not None:
        return executor.use_cuda_graphs
    enforce_eager = enforce_eager or bool(getattr(engine.config, "enforce_eager", False))
    return executor.enable_cuda_graphs(engine.max_model_len, engine.config.max_num_seqs, enforce_eager)
