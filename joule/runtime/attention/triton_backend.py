"""Attention over the paged KV cache with the Triton kernels of ``joule.kernels``.

Per layer: one launch writes the new K/V rows into the cache (or the model's
rotary kernel already did, ``kv_stored``), then the attention launches. Sequences with one new row (decodes) go to the
flash-decoding kernel (plus a small merge launch when it splits the context);
sequences with several (prompt chunks) go to the prefill/extend kernel, which
reads all keys - earlier chunks, prefix-cache hits and the new rows - from the
cache. A mixed step runs both, each writing its own rows of the output: a
decode in the prefill kernel would fill 1 of its 32 query rows and cost ~8x
the tensor-core work of the decode kernel.

Nothing here syncs with the device: grids are sized from the metadata's host
lists, and the few per-step device tensors (sequence lengths, prefill tiles)
are built once per step and reused by every layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from joule.kernels.attention_output import (
    FUSED_MAX_CONTEXT,
    FusedAttentionOutputBuffers,
    decode_attention_output,
    fits_fused_attention_output,
)
from joule.kernels.common import processor_count
from joule.kernels.kv_write import write_kv_cache
from joule.kernels.paged_decode import MIN_SPLIT_TOKENS, choose_num_splits, paged_decode_attention
from joule.kernels.paged_prefill import (
    build_tiles,
    paged_prefill_attention,
    rows_per_tile,
)
from joule.runtime.attention.base import AttentionBackend, AttentionMetadata, KVCache, check_attention_inputs
from joule.runtime.device import upload

# "1": batch-1 attention and the o projection in one kernel. Off: on the H100 (2026-12-05 (d), docs/benchmarks.md)
# it saved 48 us a step at 64 tokens of context and cost 41-89 us at 512-768, and graphs choose it by their 1,024
# bound, not the context they replay (batch 1 at 128 -> 256: +1.1 %).
FUSED_OUTPUT_ENV = "JOULE_FUSED_ATTENTION_OUTPUT"
# Decode attention's launch settings for A/Bs on a GPU (`benchmarks/gpu/decode_sweep.py --w3`), items joined by "+":
# "heads_first=0+num_warps=8" (heads first is the default). Unset: the kernel's own choice.
DECODE_LAUNCH_ENV = "JOULE_DECODE_LAUNCH"
DECODE_LAUNCH_KEYS = ("block_n", "num_warps", "num_stages", "heads_first")


def decode_launch_from_environment() -> dict:
    """``JOULE_DECODE_LAUNCH``'s overrides of the decode kernel's launch (empty: none)."""
    text = os.environ.get(DECODE_LAUNCH_ENV, "").strip()
    launch = {}
    for item in filter(None, text.split("+")):
        key, _, value = item.partition("=")
        if key not in DECODE_LAUNCH_KEYS or not value.strip().isdigit():
            raise ValueError(f"{DECODE_LAUNCH_ENV}: {item!r} is not KEY=NUMBER with KEY one of "
                             f"{', '.join(DECODE_LAUNCH_KEYS)} (items joined by '+')")
        launch[key] = bool(int(value)) if key == "heads_first" else int(value)
    return launch


@dataclass
class StaticDecodeMetadata(AttentionMetadata):
    """Decode-only metadata whose device tensors are static buffers (CUDA graph capture and replay).

    A captured graph cannot re-upload host lists or resize grids, so the sequence
    lengths live in a device buffer refilled before each replay, the decode grid
    is sized from ``max_length_bound`` (max_model_len) and the split count is fixed.
    Host ``sequence_lengths`` are unused by the Triton backend here.
    """

    sequence_lengths_device: torch.Tensor | None = None  # int32 [S], device; 0 marks a padding row
    max_length_bound: int = 0
    num_splits: int = 1


@dataclass
class StaticPrefillMetadata(AttentionMetadata):
    """One prompt chunk padded to a captured size: device buffers refilled before each replay.

    ``tiles`` cover every row of the padded chunk; the kernel skips tiles past the real chunk
    length, which (like the sequence length) lives only in device memory. Host lists hold the
    padded shape and are not read by the Triton backend.
    """

    sequence_lengths_device: torch.Tensor | None = None  # int32 [1]
    tiles: torch.Tensor | None = None  # int32 [2, num_tiles]


class _StepTensors:
    """Device tensors derived from one step's metadata, shared by all layers."""

    def __init__(self, metadata: AttentionMetadata, device: torch.device):
        self.metadata = metadata
        self.tiles: dict[int, torch.Tensor] = {}  # by rows per tile
        self.fixed_num_splits: int | None = None
        self.chosen_num_splits: int | None = None  # the split rule's pick, made by the step's first layer
        self.static_tiles: torch.Tensor | None = None  # StaticPrefillMetadata's precomputed tiles
        if isinstance(metadata, StaticDecodeMetadata):
            if not metadata.is_decode_only or metadata.sequence_lengths_device is None:
                raise ValueError("StaticDecodeMetadata needs a decode-only batch and device sequence lengths")
            self.sequence_lengths = metadata.sequence_lengths_device
            self.decode_max_length = metadata.max_length_bound
            self.num_decodes = metadata.num_sequences
            self.decode_sequence_ids = None
            self.fixed_num_splits = metadata.num_splits
            return
        if isinstance(metadata, StaticPrefillMetadata):
            if metadata.sequence_lengths_device is None or metadata.tiles is None:
                raise ValueError("StaticPrefillMetadata needs device sequence lengths and tiles")
            self.sequence_lengths = metadata.sequence_lengths_device
            self.decode_max_length = 0
            self.num_decodes = 0
            self.decode_sequence_ids = None
            self.static_tiles = metadata.tiles
            return
        self.sequence_lengths = upload(torch.tensor(metadata.sequence_lengths, dtype=torch.int32), device)
        decodes = [index for index, length in enumerate(metadata.query_lengths) if length == 1]
        self.decode_max_length = max((metadata.sequence_lengths[index] for index in decodes), default=0)
        self.num_decodes = len(decodes)
        self.decode_sequence_ids = None
        if 0 < len(decodes) < metadata.num_sequences:
            self.decode_sequence_ids = upload(torch.tensor(decodes, dtype=torch.int32), device)

    def prefill_tiles(self, rows: int, device: torch.device) -> torch.Tensor:
        """Tiles over the sequences with several new rows (decodes have their own kernel)."""
        if self.static_tiles is not None:
            return self.static_tiles
        if rows not in self.tiles:
            lengths = [0 if length == 1 else length for length in self.metadata.query_lengths]
            self.tiles[rows] = build_tiles(lengths, self.metadata.sequence_lengths, rows, device)
        return self.tiles[rows]




class TritonAttentionBackend(AttentionBackend):
    """Paged attention through Triton kernels; needs CUDA (or TRITON_INTERPRET=1 on CPU, for tests).

    ``decode_num_splits`` fixes the split-K factor of decode (tests); by default it
    is chosen per step from the batch, the longest context and the GPU's processor count.
    """

    name = "triton"
    accepts_stored_kv = True

    def __init__(self, decode_num_splits: int | None = None, fuse_output_projection: bool | None = None):
        self.decode_num_splits = decode_num_splits
        if fuse_output_projection is None:
            fuse_output_projection = os.environ.get(FUSED_OUTPUT_ENV, "0") in ("1", "true", "on")
        self.fuse_output_projection = fuse_output_projection
        self.decode_launch = decode_launch_from_environment() or None
        self._step: _StepTensors | None = None
        self._fused_buffers: dict[tuple, FusedAttentionOutputBuffers] = {}

    def forward(
        self,
        layer_index: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
        scale: float,
        kv_stored: bool = False,
    ) -> torch.Tensor:
        key_cache = kv_cache.key_caches[layer_index]
        value_cache = kv_cache.value_caches[layer_index]
        num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
        check_attention_inputs(query, key, key_cache, metadata)
        if not kv_stored:
            write_kv_cache(key, value, key_cache, value_cache, metadata.slot_mapping)
        output = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if metadata.num_sequences == 0:
            return output
        step = self._step_tensors(metadata, query.device)
        if step.num_decodes > 0:
            num_splits = step.fixed_num_splits or self.decode_num_splits
            if num_splits is None:
                if step.chosen_num_splits is None:  # the same for every layer of the step
                    step.chosen_num_splits = choose_num_splits(
                        step.num_decodes, num_kv_heads, step.decode_max_length, self._processors(query.device)
                    )
                num_splits = step.chosen_num_splits
            paged_decode_attention(
                query, key_cache, value_cache, metadata.block_tables, step.sequence_lengths,
                step.decode_max_length, scale, num_splits=num_splits, output=output,
                min_split_tokens=None if self.decode_num_splits is not None else MIN_SPLIT_TOKENS,
                sequence_ids=step.decode_sequence_ids, query_start_locations=metadata.query_start_locations,
                launch=self.decode_launch,
            )
        if step.num_decodes < metadata.num_sequences:
            group = query.shape[1] // num_kv_heads
            tiles = step.prefill_tiles(rows_per_tile(group, head_dim, query.dtype), query.device)
            paged_prefill_attention(
                query, key_cache, value_cache, metadata.block_tables, metadata.query_start_locations,
                step.sequence_lengths, scale, tiles=tiles, output=output,
            )
        return output

    def attend_and_project(
        self, layer_index: int, query: torch.Tensor, weight: torch.Tensor, kv_cache: KVCache,
        metadata: AttentionMetadata, scale: float,
    ) -> torch.Tensor | None:
        """One decode row of at most FUSED_MAX_CONTEXT tokens: attention and the output projection in one kernel
        (``joule.kernels.attention_output``), two launches fewer a layer. A captured graph qualifies by its length
        bound (the short-context variant), an eager step by its row's length; otherwise None."""
        if not self.fuse_output_projection or metadata.num_sequences != 1 or metadata.query_lengths[0] != 1:
            return None
        key_cache, value_cache = kv_cache.key_caches[layer_index], kv_cache.value_caches[layer_index]
        num_heads, head_dim = query.shape[-2], query.shape[-1]
        num_kv_heads = key_cache.shape[2]
        if not fits_fused_attention_output(num_heads, num_kv_heads, head_dim, weight, key_cache.dtype, query.dtype):
            return None
        check_attention_inputs(query.view(1, num_heads, head_dim), None, key_cache, metadata)
        step = self._step_tensors(metadata, query.device)
        bound = metadata.max_length_bound if isinstance(metadata, StaticDecodeMetadata) else step.decode_max_length
        if bound > FUSED_MAX_CONTEXT:
            return None
        return decode_attention_output(query, key_cache, value_cache, metadata.block_tables[0], step.sequence_lengths,
                                       weight, scale, scratch=self._fused_buffers)

    def _step_tensors(self, metadata: AttentionMetadata, device: torch.device) -> _StepTensors:
        if self._step is None or self._step.metadata is not metadata:
            self._step = _StepTensors(metadata, device)
        return self._step

    def graph_num_splits(self, batch_size: int, num_kv_heads: int, max_length_bound: int,
                         device: torch.device) -> int:
        """The fixed split-K factor a captured decode graph of ``batch_size`` rows uses."""
        if self.decode_num_splits is not None:
            return self.decode_num_splits
        return choose_num_splits(batch_size, num_kv_heads, max_length_bound, self._processors(device))

    def _processors(self, device: torch.device) -> int:
        """The GPU's processors (``common.processor_count``, cached there); one off CUDA, where the split rule
        then never splits for want of processors."""
        return processor_count(device) if device.type == "cuda" else 1
