"""Attention over the paged KV cache with the Triton kernels of ``joule.kernels``.

Per layer: one launch writes the new K/V rows into the cache, then one
attention launch (plus a small merge launch for split decode). Decode-only
steps use the flash-decoding kernel; steps with prompt chunks use the
prefill/extend kernel for every sequence (decode rows included), which reads
all keys - earlier chunks, prefix-cache hits and the new rows - from the cache.

Nothing here syncs with the device: grids are sized from the metadata's host
lists, and the few per-step device tensors (sequence lengths, prefill tiles)
are built once per step and reused by every layer.
"""

from __future__ import annotations

import torch

from joule.kernels.kv_write import write_kv_cache
from joule.kernels.paged_decode import choose_num_splits, paged_decode_attention
from joule.kernels.paged_prefill import build_tiles, paged_prefill_attention, rows_per_tile
from joule.runtime.attention.base import AttentionBackend, AttentionMetadata, KVCache


class _StepTensors:
    """Device tensors derived from one step's metadata, shared by all layers."""

    def __init__(self, metadata: AttentionMetadata, device: torch.device):
        self.metadata = metadata
        lengths = torch.tensor(metadata.sequence_lengths, dtype=torch.int32)
        if device.type == "cuda":
            lengths = lengths.pin_memory()
        self.sequence_lengths = lengths.to(device, non_blocking=True)
        self.tiles: dict[int, torch.Tensor] = {}  # by rows per tile

    def prefill_tiles(self, rows: int, device: torch.device) -> torch.Tensor:
        if rows not in self.tiles:
            self.tiles[rows] = build_tiles(
                self.metadata.query_lengths, self.metadata.sequence_lengths, rows, device
            )
        return self.tiles[rows]


class TritonAttentionBackend(AttentionBackend):
    """Paged attention through Triton kernels; needs CUDA (or TRITON_INTERPRET=1 on CPU, for tests).

    ``decode_num_splits`` fixes the split-K factor of decode (tests); by default it
    is chosen per step from the batch, the longest context and the GPU's processor count.
    """

    name = "triton"

    def __init__(self, decode_num_splits: int | None = None):
        self.decode_num_splits = decode_num_splits
        self._step: _StepTensors | None = None
        self._num_processors: dict[torch.device, int] = {}

    def forward(
        self,
        layer_index: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        key_cache = kv_cache.key_caches[layer_index]
        value_cache = kv_cache.value_caches[layer_index]
        num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
        if query.shape[0] != metadata.num_tokens or key.shape[1:] != (num_kv_heads, head_dim):
            raise ValueError(
                f"attention inputs do not match metadata/cache: query {tuple(query.shape)}, "
                f"key {tuple(key.shape)}, metadata tokens {metadata.num_tokens}, "
                f"cache heads x dim {num_kv_heads} x {head_dim}"
            )
        if query.shape[1] % num_kv_heads != 0:
            raise ValueError(f"{query.shape[1]} query heads are not a multiple of {num_kv_heads} KV heads")
        write_kv_cache(key, value, key_cache, value_cache, metadata.slot_mapping)
        output = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if metadata.num_sequences == 0:
            return output
        step = self._step_tensors(metadata, query.device)
        if metadata.is_decode_only:
            num_splits = self.decode_num_splits
            if num_splits is None:
                num_splits = choose_num_splits(
                    metadata.num_sequences, num_kv_heads, metadata.max_sequence_length,
                    self._processors(query.device),
                )
            return paged_decode_attention(
                query, key_cache, value_cache, metadata.block_tables, step.sequence_lengths,
                metadata.max_sequence_length, scale, num_splits=num_splits, output=output,
            )
        group = query.shape[1] // num_kv_heads
        tiles = step.prefill_tiles(rows_per_tile(group, head_dim, query.dtype), query.device)
        return paged_prefill_attention(
            query, key_cache, value_cache, metadata.block_tables, metadata.query_start_locations,
            step.sequence_lengths, scale, tiles=tiles, output=output,
        )

    def _step_tensors(self, metadata: AttentionMetadata, device: torch.device) -> _StepTensors:
        if self._step is None or self._step.metadata is not metadata:
            self._step = _StepTensors(metadata, device)
        return self._step

    def _processors(self, device: torch.device) -> int:
        if device not in self._num_processors:
            count = 1
            if device.type == "cuda":
                count = torch.cuda.get_device_properties(device).multi_processor_count
            self._num_processors[device] = count
        return self._num_processors[device]
