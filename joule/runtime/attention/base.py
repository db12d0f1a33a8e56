"""The seam between model code and attention implementations.

A model never knows how attention is computed: each attention layer hands its
new query/key/value rows to ``ForwardContext.attend``. The backend writes the
new keys and values into the paged cache (by slot) and attends each query row
over its sequence's cached context plus the new rows (causal).

One step runs a *flattened* batch: ``T`` token rows from ``S`` sequences laid
end to end. Sequence ``i`` owns rows ``query_start_locations[i] ..
query_start_locations[i + 1]``; those rows sit at positions
``context_lengths[i] .. sequence_lengths[i] - 1`` of the sequence. A decode is
a sequence with one query row; a prompt chunk (possibly starting mid-prompt
after a prefix-cache hit or an earlier chunk) has several.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


KV_CACHE_DTYPES = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


@dataclass
class KVCache:
    """Paged key/value storage: one pair of tensors per layer.

    Each tensor is ``[num_blocks, block_size, num_kv_heads, head_dim]``. The
    cache slot of a token is ``block_id * block_size + offset_in_block``.
    """

    key_caches: list[torch.Tensor]
    value_caches: list[torch.Tensor]
    block_size: int

    @staticmethod
    def resolve_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
        """The cache's element type for a ``kv_cache_dtype`` option; K/V are cast on write and back on read.

        fp8 (e4m3, no scale: values saturate at +-448) halves the bytes every decode step reads.
        """
        if name not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}.")
        return model_dtype if name == "auto" else KV_CACHE_DTYPES[name]

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        head_major: bool = False,
    ) -> "KVCache":
        """Caches of shape ``[num_blocks, block_size, num_kv_heads, head_dim]``. ``head_major`` stores each
        block head by head (a strided view of ``[num_blocks, num_kv_heads, block_size, head_dim]``), so one
        head's tokens of a block are contiguous for the stride-aware Triton kernels; not for the portable
        backend, which reshapes the cache."""
        def allocate_one() -> torch.Tensor:
            if head_major:
                storage = torch.zeros((num_blocks, num_kv_heads, block_size, head_dim), dtype=dtype, device=device)
                return storage.transpose(1, 2)
            return torch.zeros((num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=device)

        keys = [allocate_one() for _ in range(num_layers)]
        values = [allocate_one() for _ in range(num_layers)]
        return cls(keys, values, block_size)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size

    @property
    def num_blocks(self) -> int:
        return self.key_caches[0].shape[0]


@dataclass
class AttentionMetadata:
    """Where each sequence's rows are and which cache blocks hold its context.

    Host-side lists are kept beside device tensors so a portable backend can
    loop over sequences without a device->host sync.
    """

    query_start_locations: torch.Tensor  # int64 [S + 1], device
    slot_mapping: torch.Tensor  # int64 [T], device: cache slot each new row writes
    block_tables: torch.Tensor  # int32 [S, max_blocks_per_sequence], device, padded with 0
    query_lengths: list[int]  # [S] new rows per sequence this step
    context_lengths: list[int]  # [S] tokens already in the cache before this step
    sequence_lengths: list[int]  # [S] context + new rows

    @property
    def num_sequences(self) -> int:
        return len(self.query_lengths)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lengths))

    @property
    def max_query_length(self) -> int:
        return max(self.query_lengths, default=0)

    @property
    def max_sequence_length(self) -> int:
        return max(self.sequence_lengths, default=0)

    @property
    def is_decode_only(self) -> bool:
        return all(length == 1 for length in self.query_lengths)


def check_attention_inputs(
    query: torch.Tensor, key: torch.Tensor | None, key_cache: torch.Tensor, metadata: AttentionMetadata
) -> None:
    """Shapes every backend relies on: rows match the metadata, heads and head size match the cache
    (``key`` None: the keys are already in the cache)."""
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    key_shape = (num_kv_heads, head_dim) if key is None else key.shape[1:]
    if (query.shape[0] != metadata.num_tokens or key_shape != (num_kv_heads, head_dim)
            or query.shape[2] != head_dim):
        raise ValueError(
            f"attention inputs do not match metadata/cache: query {tuple(query.shape)}, "
            f"key {None if key is None else tuple(key.shape)}, metadata tokens {metadata.num_tokens}, "
            f"cache heads x dim {num_kv_heads} x {head_dim}"
        )
    if query.shape[1] % num_kv_heads != 0:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {num_kv_heads} KV heads")


class AttentionBackend(ABC):
    """Computes attention for one layer of a flattened batch over the paged cache."""

    name: str = "abstract"
    # Whether forward() takes ``kv_stored=True``: the model's rotary kernel already wrote this step's keys and
    # values into the cache (one launch fewer per layer), so only the attention runs.
    accepts_stored_kv: bool = False

    @abstractmethod
    def forward(
        self,
        layer_index: int,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: KVCache,
        metadata: AttentionMetadata,
        scale: float,
        kv_stored: bool = False,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Write ``key``/``value`` into the cache at ``metadata.slot_mapping`` (unless ``kv_stored``), then attend."""

    def attend_and_project(
        self, layer_index: int, query: torch.Tensor, weight: torch.Tensor, kv_cache: KVCache,
        metadata: AttentionMetadata, scale: float,
    ) -> torch.Tensor | None:
        """``attention(query) @ weight.T`` in one go (keys and values already in the cache), ``[T, out]``, or
        None where this backend has no fused path for the step (the caller attends, then projects)."""
        return None


@dataclass
class ForwardContext:
    """Everything a model's attention layers need for one step, passed down the forward call."""

    backend: AttentionBackend
    kv_cache: KVCache
    metadata: AttentionMetadata

    def attend(
        self,
        layer_index: int,
        query: torch.Tensor,
        key: torch.Tensor | None,  # None with kv_stored: the keys and values are in the cache already
        value: torch.Tensor | None,
        scale: float,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        if (key is None or value is None) and not kv_stored:
            raise ValueError("attend: key and value are needed unless kv_stored")
        return self.backend.forward(
            layer_index, query, key, value, self.kv_cache, self.metadata, scale, kv_stored=kv_stored
        )

    def attend_and_project(self, layer_index: int, query: torch.Tensor, weight: torch.Tensor,
                           scale: float) -> torch.Tensor | None:
        """The attention output already through the output projection ``weight``, or None (see the backend's)."""
        return self.backend.attend_and_project(layer_index, query, weight, self.kv_cache, self.metadata, scale)

    def kv_destination(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The layer's key cache, value cache and slot mapping when the backend lets the model write them
        itself (then ``attend(..., kv_stored=True)``); None when the backend writes them."""
        if not self.backend.accepts_stored_kv:
            return None
        return (self.kv_cache.key_caches[layer_index], self.kv_cache.value_caches[layer_index],
                self.metadata.slot_mapping)
