"""CUDA graphs for prompt chunks, so a step that mixes decodes with a chunk need not run eagerly.

Why: an eager forward pays ~0.7 ms of host time per layer on the H100 (Python, Triton and torch
launches): a Llama-3.2-1B step carrying a prompt chunk cost ~11.5 ms + ~2.3 ms per 1,000 prompt tokens,
against ~2 ms for a graphed decode step. That made stall-free chunked prefill lose to prefill-first.

How: a mixed step is split. Its decodes replay the decode graph (``DecodeGraphRunner``); each prompt
chunk (up to ``MAX_GRAPHED_CHUNKS`` of them) replays the graph of the next captured chunk size up
(16, 32, ..., ``max_num_batched_tokens``), padded with rows that write no cache slot (slot -1) and
attend nowhere (the prefill kernel skips tiles past the chunk's real length, which only device memory
holds). Each part streams the weights once more, which costs far less than the eager launches saved.
A chunk that would pad by ``MIN_PADDING_TO_SPLIT`` rows or more runs as several passes instead
(``chunk_pieces``: 4608 tokens as 4096 + 512, not 8192), each attending over the keys the ones before wrote.
The hidden rows that sample are copied out between replays (the chunk graphs share one memory pool).
"""

from __future__ import annotations

import logging
import time

import torch

from joule.engine.plan import ScheduledSequence, StepPlan
from joule.runtime.attention.base import AttentionBackend, ForwardContext, KVCache
from joule.runtime.chunk_sizes import MIN_PADDING_TO_SPLIT, chunk_graph_sizes, chunk_pieces
from joule.runtime.cuda_graphs import capture_graphs

logger = logging.getLogger(__name__)

MAX_GRAPHED_CHUNKS = 4  # more chunks in one step: one eager forward is cheaper than N weight reads
STAGING_SETS = 8  # pinned input sets the pieces cycle through (a step runs at most a few pieces per chunk)


class PrefillChunkGraphRunner:
    """Static buffers and (on CUDA) captured graphs for one prompt chunk at a time.

    ``capture()`` is skipped on the CPU: tests run the same padded static-buffer forward eagerly
    through the Triton backend under TRITON_INTERPRET=1.
    """

    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, backend: AttentionBackend,
                 device: torch.device, max_num_batched_tokens: int, max_model_len: int,
                 min_padding_to_split: int = MIN_PADDING_TO_SPLIT):
        from joule.kernels.paged_prefill import rows_per_tile
        from joule.runtime.attention.triton_backend import StaticPrefillMetadata

        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = device
        self.block_size = kv_cache.block_size
        self.sizes = chunk_graph_sizes(max_num_batched_tokens)
        self.min_padding_to_split = min_padding_to_split
        self.max_blocks = -(-max_model_len // self.block_size)
        rows = self.sizes[-1]
        pin = device.type == "cuda"

        def host(shape, dtype, fill=0):
            return torch.full(shape, fill, dtype=dtype, pin_memory=pin)

        # A ring of pinned staging sets, each with the event of its last upload: a step's pieces fill different sets.
        # Why: an upload is queued behind everything the GPU has yet to run, so waiting for the last piece's copy
        # before refilling one set waited for the whole queue: the second piece of a step held the host until the GPU
        # drained (H100, 2026-12-06 (n): 33 ms of workload 3's last prompt step's launch; with the ring 3.6 ms, the run
        # unchanged there as the GPU set its pace, but a host near the edge loses its queued step to such a wait).
        self._staging = [(host((rows,), torch.int64), host((rows,), torch.int64), host((rows,), torch.int64, -1),
                          host((1, self.max_blocks), torch.int32), host((2,), torch.int64), host((1,), torch.int32),
                          host((1,), torch.int64)) for _ in range(STAGING_SETS)]
        self._staged = [torch.cuda.Event() if pin else None for _ in range(STAGING_SETS)]
        self._set = 0
        self._use_set(0)
        # output_row: the piece's last real row, the only one through the last layer's MLP (``model.forward``).
        (self.input_ids, self.positions, self.slots, self.block_table, self.query_starts,
         self.sequence_length, self.output_row) = [tensor.to(device) for tensor in self._staging[0]]
        key_cache = kv_cache.key_caches[0]
        group = model.config.num_attention_heads // key_cache.shape[2]
        tile_rows = rows_per_tile(group, key_cache.shape[3], _activation_dtype(model))
        self.metadata = {}
        for size in self.sizes:
            num_tiles = -(-size // tile_rows)
            first_rows = torch.arange(num_tiles - 1, -1, -1, dtype=torch.int32) * tile_rows  # longest keys first
            tiles = torch.stack([torch.zeros(num_tiles, dtype=torch.int32), first_rows]).to(device)
            self.metadata[size] = StaticPrefillMetadata(
                query_start_locations=self.query_starts,
                slot_mapping=self.slots[:size],
                block_tables=self.block_table,
                query_lengths=[size],
                context_lengths=[0],
                sequence_lengths=[size],
                sequence_lengths_device=self.sequence_length,
                tiles=tiles,
            )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def padded_size(self, num_tokens: int) -> int | None:
        for size in self.sizes:
            if size >= num_tokens:
                return size
        return None

    def can_run(self, plan: StepPlan) -> bool:
        """A step with at least one chunk, at most MAX_GRAPHED_CHUNKS of them, each of a captured size."""
        chunks = [sequence for sequence in plan.sequences if sequence.num_tokens > 1]
        if not chunks or len(chunks) > MAX_GRAPHED_CHUNKS:
            return False
        return all(self.padded_size(sequence.num_tokens) is not None and len(sequence.block_ids) <= self.max_blocks
                   for sequence in chunks)

    def _forward(self, size: int) -> torch.Tensor:
        context = ForwardContext(self.backend, self.kv_cache, self.metadata[size])
        return self.model(self.input_ids[:size], self.positions[:size], context, self.output_row)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up then capture each size, largest first, into one memory pool of their own."""
        started = time.perf_counter()
        self._fill_empty(self.sizes[-1])
        self._upload(self.sizes[-1])
        self.graphs, self.outputs = capture_graphs(self.sizes, self._forward, self.device)
        logger.info("captured %d prompt-chunk CUDA graphs (sizes %s) in %.1f s",
                    len(self.graphs), self.sizes, time.perf_counter() - started)

    def run_chunk(self, sequence: ScheduledSequence) -> torch.Tensor:
        """The hidden state ``[1, H]`` of the chunk's last token (the last row of its last graph pass,
        ``chunk_pieces``). A view into a graph's output buffer."""
        count = sequence.num_tokens
        if self.padded_size(count) is None or count < 2 or len(sequence.block_ids) > self.max_blocks:
            raise ValueError(f"a chunk of {count} tokens over {len(sequence.block_ids)} blocks has no graph "
                             f"(sizes {self.sizes}, {self.max_blocks} blocks)")
        offset, hidden = 0, None
        for length in chunk_pieces(count, self.sizes, self.min_padding_to_split):
            # A later piece attends over the earlier pieces' keys, which the earlier replays wrote to the cache.
            piece = ScheduledSequence(sequence.request, sequence.token_ids[offset:offset + length],
                                      sequence.start_position + offset, sequence.block_ids, sequence.samples)
            hidden = self._run_piece(piece)
            offset += length
        return hidden

    def _use_set(self, index: int) -> None:
        """Point the host views at staging set ``index``, after its last upload has left it."""
        if self._staged[index] is not None:
            self._staged[index].synchronize()  # recorded STAGING_SETS pieces ago: long done unless the GPU lags
        self._set = index
        (self.host_input_ids, self.host_positions, self.host_slots, self.host_block_table, self.host_query_starts,
         self.host_sequence_length, self.host_output_row) = self._staging[index]

    def _run_piece(self, sequence: ScheduledSequence) -> torch.Tensor:
        count = sequence.num_tokens
        size = self.padded_size(count)
        self._use_set((self._set + 1) % STAGING_SETS)
        self._fill(sequence, size)
        self._upload(size)
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size]
        return self._forward(size)

    def _fill(self, sequence: ScheduledSequence, size: int) -> None:
        count, start, block_size = sequence.num_tokens, sequence.start_position, self.block_size
        blocks = sequence.block_ids
        positions = torch.arange(start, start + count, dtype=torch.int64)
        self.host_input_ids[:count] = torch.as_tensor(sequence.token_ids, dtype=torch.int64)
        self.host_positions[:count] = positions
        block_ids = torch.as_tensor(blocks, dtype=torch.int64)
        self.host_slots[:count] = block_ids[positions // block_size] * block_size + positions % block_size
        self.host_block_table[0, : len(blocks)] = torch.as_tensor(blocks, dtype=torch.int32)
        self.host_query_starts[1] = count
        self.host_sequence_length[0] = start + count
        self.host_output_row[0] = count - 1
        self.host_input_ids[count:size] = 0
        self.host_positions[count:size] = 0
        self.host_slots[count:size] = -1

    def _fill_empty(self, size: int) -> None:
        """Capture-time contents: no row is real, so no tile runs and no slot is written."""
        self.host_input_ids[:size] = 0
        self.host_positions[:size] = 0
        self.host_slots[:size] = -1
        self.host_query_starts.zero_()
        self.host_sequence_length.zero_()
        self.host_output_row.zero_()

    def _upload(self, size: int) -> None:
        pairs = [(self.host_input_ids[:size], self.input_ids[:size]), (self.host_positions[:size], self.positions[:size]),
                 (self.host_slots[:size], self.slots[:size]), (self.host_block_table, self.block_table),
                 (self.host_query_starts, self.query_starts), (self.host_sequence_length, self.sequence_length),
                 (self.host_output_row, self.output_row)]
        for host, device in pairs:
            device.copy_(host, non_blocking=True)
        if self._staged[self._set] is not None:
            self._staged[self._set].record()


def can_run_mixed_step(plan: StepPlan, decode_runner, chunk_runner: PrefillChunkGraphRunner) -> bool:
    """Decodes fit the decode graphs and every chunk fits a chunk graph (at most MAX_GRAPHED_CHUNKS)."""
    if not chunk_runner.can_run(plan):
        return False
    decodes = [sequence for sequence in plan.sequences if sequence.num_tokens == 1]
    return not decodes or decode_runner.can_run(StepPlan(sequences=decodes))


def run_mixed_step(plan: StepPlan, decode_runner, chunk_runner: PrefillChunkGraphRunner,
                   decode_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[ScheduledSequence]]:
    """Replay the decode graph for the decodes and a chunk graph per chunk; returns the hidden rows of
    the sequences that sample, in plan order, and those sequences. ``decode_tokens``: the decodes' input
    tokens on the device, in plan order (a continuation's, which the host does not know yet)."""
    decodes = [sequence for sequence in plan.sequences if sequence.num_tokens == 1]
    rows: dict[int, torch.Tensor] = {}
    if decodes:
        # The decode pool: chunk replays leave it.
        hidden = decode_runner.run(StepPlan(sequences=decodes), decode_tokens)
        for index, sequence in enumerate(decodes):
            if sequence.samples:
                rows[id(sequence)] = hidden[index]
    for sequence in plan.sequences:
        if sequence.num_tokens > 1:
            hidden = chunk_runner.run_chunk(sequence)
            if sequence.samples:
                rows[id(sequence)] = hidden[-1].clone()  # the next chunk replay reuses this pool
    sampling = [sequence for sequence in plan.sequences if sequence.samples]
    if not sampling:
        return torch.empty(0, device=chunk_runner.device), []
    return torch.stack([rows[id(sequence)] for sequence in sampling]), sampling


def _activation_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(parameter.dtype for parameter in model.parameters() if parameter.is_floating_point())
