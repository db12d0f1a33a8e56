"""Decoding sequences' keys and values kept contiguous between decode steps (CPU).

The portable backend's decode attention needs each sequence's context as one
dense ``[S, Hkv, L, D]`` batch. Gathering it from the paged cache every layer
of every step reads and writes the whole context once more than the attention
itself does, which on a CPU is a large share of a decode step (memory bound).
When consecutive steps decode the same sequences in the same rows, the dense
copy of the previous step is still right except for one new token per
sequence, so it is kept and only that token is appended.

A step continues the previous one when it is decode-only, has the same number
of rows, every row is one token longer, and every row's block table starts
with the blocks it had before (blocks are never rewritten while their sequence
runs, so the same blocks hold the same tokens). Anything else (a prompt chunk,
a finished or preempted sequence, a different cache) starts afresh from the
paged cache. The copies are bounded to a fraction of the KV cache's own size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_HEADROOM_TOKENS = 64  # capacity beyond the longest context, so most steps append in place
_MAX_SHARE_OF_KV_CACHE = 0.5


@dataclass
class StagingStep:
    """What every layer of one decode-only step does with its dense copy."""

    capacity: int  # tokens per sequence in the dense copies
    rebuild: bool  # True: refill from the paged cache; False: append the new token
    append_rows: torch.Tensor  # int64 [S]: row of each sequence's new token in the flattened copy


@dataclass
class _LayerCopy:
    key_cache: torch.Tensor  # the paged tensor the copy was taken from
    keys: torch.Tensor  # [S, capacity, Hkv, D]
    values: torch.Tensor


class DecodeContexts:
    def __init__(self) -> None:
        self._layers: dict[int, _LayerCopy] = {}
        self._block_tables: torch.Tensor | None = None  # of the step the copies reflect
        self._lengths: list[int] = []
        self._capacity = 0

    def clear(self) -> None:
        self._layers.clear()
        self._block_tables, self._lengths, self._capacity = None, [], 0

    def begin_step(
        self, block_tables: torch.Tensor, lengths: list[int], block_size: int, num_layers: int,
        key_cache: torch.Tensor, dtype: torch.dtype,
    ) -> StagingStep | None:
        """Plan a decode-only step; None when the copies would exceed their memory bound."""
        continues = self._continues(block_tables, lengths, block_size)
        capacity = self._capacity
        if not continues or max(lengths) > capacity:
            longest = max(lengths) + _HEADROOM_TOKENS
            capacity = -(-longest // block_size) * block_size
        num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
        element_size = torch.empty((), dtype=dtype).element_size()
        copy_bytes = 2 * num_layers * len(lengths) * capacity * num_kv_heads * head_dim * element_size
        cache_bytes = 2 * num_layers * key_cache.numel() * key_cache.element_size()
        if copy_bytes > _MAX_SHARE_OF_KV_CACHE * cache_bytes:
            self.clear()
            return None
        rebuild = not continues or capacity != self._capacity
        if rebuild:
            self._layers.clear()
        self._block_tables, self._lengths, self._capacity = block_tables.clone(), list(lengths), capacity
        starts = torch.arange(len(lengths), device=block_tables.device) * capacity
        append_rows = starts + torch.tensor(lengths, device=block_tables.device) - 1
        return StagingStep(capacity, rebuild, append_rows)

    def _continues(self, block_tables: torch.Tensor, lengths: list[int], block_size: int) -> bool:
        previous_tables, previous_lengths = self._block_tables, self._lengths
        if previous_tables is None or len(lengths) != len(previous_lengths):
            return False
        if any(length != previous + 1 for length, previous in zip(lengths, previous_lengths)):
            return False
        width = -(-max(previous_lengths) // block_size)
        if block_tables.shape[1] < width or previous_tables.shape[1] < width:
            return False
        blocks_used = torch.tensor([-(-length // block_size) for length in previous_lengths])
        compared = torch.arange(width)[None, :] < blocks_used[:, None]
        same = (block_tables[:, :width] == previous_tables[:, :width]) | ~compared
        return bool(same.all())

    def dense(
        self,
        layer_index: int,
        step: StagingStep,
        key: torch.Tensor,  # [S, Hkv, D]: this step's new rows
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        flat_blocks: torch.Tensor,
        padded_length: int,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[S, Hkv, padded_length, D]`` (views of the copies), after this step's write."""
        copy = self._layers.get(layer_index)
        if step.rebuild or copy is None or copy.key_cache is not key_cache:
            copy = self._layers[layer_index] = _LayerCopy(
                key_cache,
                _dense_from_cache(key_cache, flat_blocks, padded_length, step.capacity, dtype),
                _dense_from_cache(value_cache, flat_blocks, padded_length, step.capacity, dtype),
            )
        else:
            # The rows the paged cache received, rounded through its dtype like a gather would be.
            for rows, dense in ((key, copy.keys), (value, copy.values)):
                new_rows = rows.to(key_cache.dtype).to(dtype).reshape(rows.shape[0], -1)
                dense.view(-1, new_rows.shape[1]).index_copy_(0, step.append_rows, new_rows)
        return copy.keys[:, :padded_length].transpose(1, 2), copy.values[:, :padded_length].transpose(1, 2)


def _dense_from_cache(
    cache: torch.Tensor, flat_blocks: torch.Tensor, padded_length: int, capacity: int, dtype: torch.dtype
) -> torch.Tensor:
    """``[S, capacity, Hkv, D]``: the sequences' blocks in order, zeros beyond (finite under any mask)."""
    num_sequences = flat_blocks.shape[0] * cache.shape[1] // padded_length
    dense = torch.empty(num_sequences, capacity, *cache.shape[2:], dtype=dtype, device=cache.device)
    gathered = cache.view(cache.shape[0], -1).index_select(0, flat_blocks)
    dense[:, :padded_length] = gathered.view(num_sequences, padded_length, *cache.shape[2:])
    dense[:, padded_length:] = 0  # only the tail: zeroing it all first doubled the cost of a rebuild
    return dense
