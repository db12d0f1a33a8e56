"""An eager step's inputs: the flat token ids and positions of a plan's rows, and its attention metadata.

Why a module of its own: every step that does not replay a graph (prompt steps of many chunks, the CPU's steps)
builds them, and the executor around it is long enough. Arrays are built on the host with numpy, then copied to
the device through pinned memory without a sync.
"""

from __future__ import annotations

import numpy as np
import torch

from joule.engine.plan import ScheduledSequence, StepPlan
from joule.runtime.attention.base import AttentionMetadata
from joule.runtime.device import upload


def prepare_step_inputs(plan: StepPlan, block_size: int, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[tuple[int, ScheduledSequence]]]:
    """Input ids and positions ``[T]``, the attention metadata, and each sampling row's flat index with its
    sequence (the step's last token of each sequence that samples)."""
    size = block_size
    sequences = plan.sequences
    total = plan.num_tokens
    input_ids = np.empty(total, dtype=np.int64)
    positions = np.empty(total, dtype=np.int64)
    slots = np.empty(total, dtype=np.int64)
    max_blocks = max(len(sequence.block_ids) for sequence in sequences)
    block_tables = np.zeros((len(sequences), max_blocks), dtype=np.int32)
    query_starts = [0]
    query_lengths, context_lengths, sequence_lengths = [], [], []
    sample_rows = []
    offset = 0
    for index, sequence in enumerate(sequences):
        count = sequence.num_tokens
        start = sequence.start_position
        blocks = np.asarray(sequence.block_ids, dtype=np.int64)
        block_tables[index, : len(blocks)] = blocks
        seq_positions = np.arange(start, start + count, dtype=np.int64)
        input_ids[offset : offset + count] = sequence.token_ids
        positions[offset : offset + count] = seq_positions
        slots[offset : offset + count] = blocks[seq_positions // size] * size + seq_positions % size
        offset += count
        query_starts.append(offset)
        query_lengths.append(count)
        context_lengths.append(start)
        sequence_lengths.append(start + count)
        if sequence.samples:
            sample_rows.append((offset - 1, sequence))
    metadata = AttentionMetadata(
        query_start_locations=to_device(np.asarray(query_starts, dtype=np.int64), device),
        slot_mapping=to_device(slots, device),
        block_tables=to_device(block_tables, device),
        query_lengths=query_lengths,
        context_lengths=context_lengths,
        sequence_lengths=sequence_lengths,
    )
    return to_device(input_ids, device), to_device(positions, device), metadata, sample_rows


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``: as is on the CPU, else through pinned memory, non-blocking."""
    return upload(torch.from_numpy(array), device)
