"""Paged KV block manager with reference counts and automatic prefix caching.

Each full block of a request's tokens is named by a chained hash: the hash of
its parent block's hash and its own token ids (the chain starts from the
request's cache salt). A block whose hash is registered can be reused by any
later request with the same prefix; a hit is confirmed by comparing token ids,
the parent hash and the parent's registration serial (serials are never
reused), so a hash collision can never splice a block onto a prefix its KV was
not computed from.

Freed blocks that carry a hash stay reusable in LRU order and are evicted only
when no never-cached free block is left. Pure Python: the simulator drives it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from joule.engine.request import Request


@dataclass(frozen=True)
class BlockState:
    """One block's bookkeeping, copied out of the manager's arrays (``KVBlockManager.block``), for tests."""

    block_id: int
    ref_count: int
    block_hash: bytes | None
    parent_hash: bytes | None
    token_ids: tuple[int, ...] | None
    cache_serial: int
    parent_serial: int


def _root_hash(cache_salt: str | None) -> bytes:
    return hashlib.blake2b((cache_salt or "").encode(), digest_size=16).digest()


def chain_hash(parent_hash: bytes, token_ids: list[int]) -> bytes:
    digest = hashlib.blake2b(parent_hash, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class KVBlockManager:
    """Per-block state lives in flat lists indexed by block id, not in one object per block: an H200 holds ~250k
    blocks, and the cyclic garbage collector walks every container object on each collection of the old
    generation (an engine with 234k blocks: 535k -> 301k tracked objects, a full collection 127 -> 102 ms on the
    dev CPU; docs/benchmarks.md (g))."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}.")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # Lists of ints: one object each to the collector, and faster to index than arrays (no boxing).
        self._ref_counts = [0] * num_blocks
        # A cached block's hash, its parent's hash and its token ids (None while uncached); its registration
        # serial and that of the cached block its KV follows (0: the chain's root). Matching hashes alone cannot
        # prove the parent: under a collision a different block may hold the parent's hash.
        self._hashes: list[bytes | None] = [None] * num_blocks
        self._parent_hashes: list[bytes | None] = [None] * num_blocks
        self._tokens: list[bytes | None] = [None] * num_blocks
        self._serials = [0] * num_blocks
        self._parent_serials = [0] * num_blocks
        self._free_uncached = list(reversed(range(num_blocks)))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self._cached: dict[bytes, int] = {}
        # request id -> (blocks already considered for registration, serial of the cached block
        # equal to the last of them; -1 after a hash collision, which ends registration).
        self._num_registered: dict[str, tuple[int, int]] = {}
        self._last_serial = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # of which found cached

    # -- per block, for tests and debugging -------------------------------------------
    def block(self, block_id: int) -> BlockState:
        tokens = self._tokens[block_id]
        return BlockState(block_id, self._ref_counts[block_id], self._hashes[block_id], self._parent_hashes[block_id],
                          None if tokens is None else tuple(array("q", tokens)), self._serials[block_id],
                          self._parent_serials[block_id])

    def block_states(self) -> list[BlockState]:
        return [self.block(block_id) for block_id in range(self.num_blocks)]

    # -- capacity -----------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ------------------------------------------------------------
    def _block_tokens(self, request: Request, index: int) -> bytes:
        """A block's token ids as the bytes a hit is compared by (what ``chain_hash`` hashes)."""
        size = self.block_size
        return array("q", request.token_ids_between(index * size, (index + 1) * size)).tobytes()

    def _extend_hashes(self, request: Request, num_full_blocks: int) -> list[bytes]:
        hashes = request.block_hashes
        size = self.block_size
        while len(hashes) < num_full_blocks:
            index = len(hashes)
            parent = hashes[-1] if hashes else _root_hash(request.cache_salt)
            hashes.append(chain_hash(parent, request.token_ids_between(index * size, (index + 1) * size)))
        return hashes

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids of the longest cached prefix, always leaving one token to compute."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._extend_hashes(request, max_blocks)
        hits: list[int] = []
        parent = _root_hash(request.cache_salt)
        parent_serial = 0
        for index in range(max_blocks):
            block_id = self._cached.get(hashes[index])
            if block_id is None:
                break
            if (self._tokens[block_id] != self._block_tokens(request, index)
                    or self._parent_hashes[block_id] != parent or self._parent_serials[block_id] != parent_serial):
                break
            hits.append(block_id)
            parent = hashes[index]
            parent_serial = self._serials[block_id]
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's prefix lookup (not retries of a request still waiting)."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_hit_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Register every block whose tokens are all computed, so later requests can reuse it."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        num_full = min(request.num_computed_tokens // size, len(request.block_ids))
        start, parent_serial = self._num_registered.get(request.request_id, (0, 0))
        if num_full <= start or parent_serial < 0:
            return
        hashes = self._extend_hashes(request, num_full)
        for index in range(start, num_full):
            block_hash = hashes[index]
            parent = hashes[index - 1] if index else _root_hash(request.cache_salt)
            tokens = self._block_tokens(request, index)
            holder = self._cached.get(block_hash)
            if holder is None:
                block_id = request.block_ids[index]
                self._last_serial += 1
                self._hashes[block_id], self._parent_hashes[block_id], self._tokens[block_id] = block_hash, parent, tokens
                self._serials[block_id], self._parent_serials[block_id] = self._last_serial, parent_serial
                self._cached[block_hash] = block_id
                parent_serial = self._last_serial
                continue
            if (self._tokens[holder] != tokens or self._parent_hashes[holder] != parent
                    or self._parent_serials[holder] != parent_serial):
                # A hash collision: no cached block equals this one, so nothing after it can be chained.
                parent_serial = -1
                break
            # This very block (a hit) or an identical copy computed concurrently; keep the first copy.
            parent_serial = self._serials[holder]
        self._num_registered[request.request_id] = (num_full, parent_serial)

    # -- allocation ----------------------------------------------------------------
    def blocks_to_grow(self, request: Request, num_new_tokens: int) -> int:
        """New blocks ``allocate(request, num_new_tokens)`` would take (no cached prefix involved)."""
        return max(0, self.blocks_for_tokens(request.num_computed_tokens + num_new_tokens) - len(request.block_ids))

    def can_allocate(self, request: Request, num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        return self._blocks_needed(request, num_new_tokens, cached_block_ids) is not None

    def _blocks_needed(self, request: Request, num_new_tokens: int, cached_block_ids) -> int | None:
        computed = len(cached_block_ids) * self.block_size if cached_block_ids else request.num_computed_tokens
        total_blocks = self.blocks_for_tokens(computed + num_new_tokens)
        needed = max(0, total_blocks - len(request.block_ids) - len(cached_block_ids))
        free_hits = sum(1 for block_id in cached_block_ids if self._ref_counts[block_id] == 0)
        if needed > self.num_free_blocks - free_hits:
            return None
        return needed

    def allocate(self, request: Request, num_new_tokens: int, cached_block_ids: list[int] = ()) -> bool:
        """Reserve blocks for ``num_new_tokens`` more tokens (after any cached prefix).

        Returns False, changing nothing, when there are not enough free blocks.
        """
        if not cached_block_ids and (request.num_computed_tokens + num_new_tokens
                                     <= len(request.block_ids) * self.block_size):
            return True  # the request's last block still has room: most decode steps end here
        needed = self._blocks_needed(request, num_new_tokens, cached_block_ids)
        if needed is None:
            return False
        ref_counts = self._ref_counts
        for block_id in cached_block_ids:
            if ref_counts[block_id] == 0:
                del self._free_cached[block_id]
            ref_counts[block_id] += 1
            request.block_ids.append(block_id)
        if cached_block_ids:
            self._num_registered[request.request_id] = (len(request.block_ids), self._serials[cached_block_ids[-1]])
        for _ in range(needed):
            request.block_ids.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        if self._free_uncached:
            block_id = self._free_uncached.pop()
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            self._evict(block_id)
        self._ref_counts[block_id] = 1
        return block_id

    def _evict(self, block_id: int) -> None:
        block_hash = self._hashes[block_id]
        if block_hash is not None and self._cached.get(block_hash) == block_id:
            del self._cached[block_hash]
        self._hashes[block_id] = self._parent_hashes[block_id] = self._tokens[block_id] = None
        self._serials[block_id] = self._parent_serials[block_id] = 0

    def free(self, request: Request) -> None:
        """Drop the request's references; the tail is freed first so it is evicted first."""
        ref_counts = self._ref_counts
        for block_id in reversed(request.block_ids):
            count = ref_counts[block_id] - 1
            if count < 0:
                raise RuntimeError(f"block {block_id} freed more often than it was allocated")
            ref_counts[block_id] = count
            if count == 0:
                if self._hashes[block_id] is not None:
                    self._free_cached[block_id] = None
                else:
                    self._free_uncached.append(block_id)
        request.block_ids = []
        self._num_registered.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached-free block (e.g. after weights change)."""
        while self._free_cached:
            block_id, _ = self._free_cached.popitem(last=False)
            self._evict(block_id)
            self._free_uncached.append(block_id)

    # -- checks ----------------------------------------------------------------------
    def check_invariants(self, owners: list[Request]) -> None:
        """Raise if ref counts, free lists or the hash table disagree (for tests and debugging)."""
        expected = [0] * self.num_blocks
        for request in owners:
            for block_id in request.block_ids:
                expected[block_id] += 1
        free_uncached = set(self._free_uncached)
        free_cached = set(self._free_cached)
        if len(free_uncached) != len(self._free_uncached) or free_uncached & free_cached:
            raise RuntimeError("a block is listed free twice")
        for block_id in range(self.num_blocks):
            ref_count = self._ref_counts[block_id]
            if ref_count != expected[block_id]:
                raise RuntimeError(f"block {block_id} has ref_count {ref_count}, owners {expected[block_id]}")
            is_free = block_id in free_uncached or block_id in free_cached
            if is_free != (ref_count == 0):
                raise RuntimeError(f"block {block_id} free-list state disagrees with its ref count")
            if block_id in free_cached and self._hashes[block_id] is None:
                raise RuntimeError(f"block {block_id} is cached-free without a hash")
        for block_hash, block_id in self._cached.items():
            if self._hashes[block_id] != block_hash:
                raise RuntimeError(f"hash table points at block {block_id} with another hash")
