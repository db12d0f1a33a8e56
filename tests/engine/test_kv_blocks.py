"""Property tests for KVBlockManager: ref counts, free lists, prefix-cache correctness, LRU.

The tests drive the manager the way the scheduler does (find_cached_prefix + allocate on
admission, allocate + cache_full_blocks as tokens get computed, free, reset) and keep a
shadow record of which token prefix each block's KV was computed from. That lets them
check the property that matters for correctness: a prefix-cache hit must serve KV that
was computed from exactly the request's own prefix (salt included), not merely a block
whose own tokens happen to match.
"""

from __future__ import annotations

import itertools
from unittest import mock

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from joule.engine import kv_blocks
from joule.engine.kv_blocks import KVBlockManager
from joule.engine.request import Request
from joule.sampling_params import SamplingParams

Lineage = tuple  # (cache_salt, token prefix up to the end of a block)


def make_request(request_id: str, prompt, cache_salt: str | None = None) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(),
        max_tokens=16,
        cache_salt=cache_salt,
    )


def lineage(request: Request, block_index: int, block_size: int) -> Lineage:
    """Everything the KV of block ``block_index`` depends on: the salt and every token up to its end."""
    return (request.cache_salt, tuple(request.token_ids_between(0, (block_index + 1) * block_size)))


def snapshot(manager: KVBlockManager, requests) -> tuple:
    """All state an allocation could touch, private bookkeeping included, for before/after comparison."""
    return (
        tuple(
            (b.ref_count, b.block_hash, b.parent_hash, b.token_ids, b.cache_serial, b.parent_serial)
            for b in manager.block_states()
        ),
        manager._last_serial,
        manager.num_free_blocks,
        list(manager._free_uncached),
        list(manager._free_cached),
        dict(manager._cached),
        dict(manager._num_registered),
        tuple((r.request_id, tuple(r.block_ids), r.num_computed_tokens) for r in requests),
    )


class PrefixCacheHarness:
    """Drives a KVBlockManager like the scheduler does and checks it against a simple model.

    The model tracks: which blocks each live request owns (via the requests themselves),
    the lineage each block's KV was computed from, and the LRU order of cached-free blocks
    (least recently freed first; a request's tail is freed before its head).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.manager = KVBlockManager(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self.live: list[Request] = []
        self.kv_lineage: dict[int, Lineage] = {}
        self.lru_model: list[int] = []
        self.num_hit_blocks: dict[str, int] = {}
        self.num_hits_served = 0
        self.num_failed_allocations = 0
        self.num_evictions = 0
        self._ids = itertools.count()

    # -- operations ------------------------------------------------------------------
    def admit(self, prompt, num_new: int, next_token: int, cache_salt: str | None = None) -> Request | None:
        request = make_request(f"r{next(self._ids)}", prompt, cache_salt)
        hits = self.manager.find_cached_prefix(request)
        self.check_hits(request, hits)
        num_cached = len(hits) * self.block_size
        num_new = max(1, min(num_new, request.num_tokens - num_cached))
        if not self._allocate(request, num_new, hits, num_computed=num_cached):
            return None
        self.num_hit_blocks[request.request_id] = len(hits)
        self.num_hits_served += len(hits)
        request.num_computed_tokens = num_cached
        self.live.append(request)
        self._compute(request, num_new, next_token)
        return request

    def grow(self, request: Request, num_new: int, next_token: int) -> bool:
        """Compute the next chunk (a prompt chunk, or the one sampled token of a decode)."""
        num_new = max(1, min(num_new, request.num_tokens - request.num_computed_tokens))
        if not self._allocate(request, num_new, (), num_computed=request.num_computed_tokens):
            return False
        self._compute(request, num_new, next_token)
        return True

    def free(self, request: Request) -> None:
        self.live.remove(request)
        released = [b for b in reversed(request.block_ids) if self.manager.block(b).ref_count == 1]
        self.lru_model.extend(b for b in released if self.manager.block(b).block_hash is not None)
        free_before = self.manager.num_free_blocks
        self.manager.free(request)
        assert request.block_ids == []
        assert self.manager.num_free_blocks == free_before + len(released)

    def reset(self) -> None:
        used_hashes = {
            b.block_id: b.block_hash for b in self.manager.block_states() if b.ref_count > 0
        }
        free_before = self.manager.num_free_blocks
        self.manager.reset_prefix_cache()
        self.lru_model.clear()
        assert self.manager.num_free_blocks == free_before
        for block in self.manager.block_states():
            if block.ref_count == 0:
                assert block.block_hash is None, "reset left a free block findable"
            else:
                assert block.block_hash == used_hashes[block.block_id], "reset touched a block in use"

    def release_all(self) -> None:
        for request in list(self.live):
            self.free(request)
        assert self.manager.num_free_blocks == self.manager.num_blocks
        assert all(block.ref_count == 0 for block in self.manager.block_states())
        self.manager.check_invariants([])

    # -- checks ------------------------------------------------------------------------
    def check_hits(self, request: Request, hits: list[int]) -> None:
        size = self.block_size
        assert len(set(hits)) == len(hits)
        assert len(hits) * size <= request.num_tokens - 1, "a hit must leave a token to compute"
        if not self.manager.enable_prefix_caching:
            assert hits == []
        for index, block_id in enumerate(hits):
            block = self.manager.block(block_id)
            assert block.block_hash is not None
            assert block.token_ids == tuple(request.token_ids_between(index * size, (index + 1) * size))
            assert self.kv_lineage[block_id] == lineage(request, index, size), (
                f"hit block {block_id} at index {index} holds KV of {self.kv_lineage[block_id]}, "
                f"but the request's prefix is {lineage(request, index, size)}"
            )

    def check(self) -> None:
        manager = self.manager
        manager.check_invariants(self.live)
        owned = set()
        for request in self.live:
            owned.update(request.block_ids)
            covered = len(request.block_ids) * self.block_size
            assert covered >= request.num_computed_tokens, "computed tokens outside the block table"
        assert manager.num_free_blocks + len(owned) == manager.num_blocks
        assert manager.num_used_blocks == len(owned)
        cached_free = {b.block_id for b in manager.block_states() if b.ref_count == 0 and b.block_hash is not None}
        assert set(self.lru_model) == cached_free
        if not manager.enable_prefix_caching:
            assert all(block.block_hash is None for block in manager.block_states())

    # -- internals -------------------------------------------------------------------
    def _allocate(self, request: Request, num_new: int, hits, num_computed: int) -> bool:
        manager = self.manager
        lru_without_hits = [b for b in self.lru_model if b not in hits]
        num_free_uncached = manager.num_free_blocks - len(self.lru_model)
        old_block_ids = list(request.block_ids)
        old_refs = {b: manager.block(b).ref_count for b in hits}
        before = snapshot(manager, self.live + [request])
        if not manager.allocate(request, num_new, hits):
            assert snapshot(manager, self.live + [request]) == before, "a failed allocate changed state"
            self.num_failed_allocations += 1
            return False
        expected_blocks = max(len(old_block_ids) + len(hits), manager.blocks_for_tokens(num_computed + num_new))
        assert len(request.block_ids) == expected_blocks
        assert request.block_ids[: len(old_block_ids) + len(hits)] == old_block_ids + list(hits)
        fresh = request.block_ids[len(old_block_ids) + len(hits) :]
        for block_id in hits:
            assert manager.block(block_id).ref_count == old_refs[block_id] + 1
        for block_id in fresh:
            assert manager.block(block_id).ref_count == 1
            assert manager.block(block_id).block_hash is None
        # Never-cached free blocks go first; then cached ones, least recently freed first.
        evicted = [b for b in fresh if b in lru_without_hits]
        assert evicted == lru_without_hits[: max(0, len(fresh) - num_free_uncached)]
        self.num_evictions += len(evicted)
        self.lru_model = [b for b in lru_without_hits if b not in evicted]
        for block_id in evicted:
            self._assert_not_findable(block_id)
        return True

    def _assert_not_findable(self, block_id: int) -> None:
        """An evicted block's prefix must no longer be served from the cache."""
        cache_salt, tokens = self.kv_lineage[block_id]
        probe = make_request("probe", list(tokens) + [0], cache_salt)
        block_index = len(tokens) // self.block_size - 1
        found = self.manager.find_cached_prefix(probe)
        assert block_id not in found
        assert len(found) <= block_index, "an evicted prefix is still found"

    def _compute(self, request: Request, num_new: int, next_token: int) -> None:
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens:
            request.output_token_ids.append(next_token)  # the step sampled a token
        self.manager.cache_full_blocks(request)
        size = self.block_size
        first_computed_here = self.num_hit_blocks[request.request_id]
        for index in range(first_computed_here, request.num_computed_tokens // size):
            self.kv_lineage[request.block_ids[index]] = lineage(request, index, size)
        for index, block_id in enumerate(request.block_ids):
            block = self.manager.block(block_id)
            if block.block_hash is not None:
                assert index < request.num_computed_tokens // size, "registered a block not fully computed"
                assert block.token_ids == tuple(request.token_ids_between(index * size, (index + 1) * size))


# Prompts share a few prefixes and use a two-letter alphabet, so blocks repeat often.
SHARED_PREFIXES = [(), (0, 1, 0, 1), (1, 1, 1, 1, 0, 0), (0,) * 8]
prompts = st.builds(
    lambda prefix, suffix: list(prefix) + suffix or [1],
    st.sampled_from(SHARED_PREFIXES),
    st.lists(st.integers(0, 1), max_size=6),
)
tokens = st.integers(0, 1)


class KVBlockMachine(RuleBasedStateMachine):
    """Random interleavings of admit / grow / free / reset with invariants checked after each."""

    enable_prefix_caching = True

    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4))
    def setup(self, num_blocks, block_size):
        self.harness = PrefixCacheHarness(num_blocks, block_size, self.enable_prefix_caching)

    @rule(
        prompt=prompts,
        num_new=st.integers(1, 16),
        next_token=tokens,
        cache_salt=st.sampled_from([None, None, None, "tenant-b"]),
    )
    def admit(self, prompt, num_new, next_token, cache_salt):
        self.harness.admit(prompt, num_new, next_token, cache_salt)

    @precondition(lambda self: self.harness.live)
    @rule(choice=st.integers(0, 63), num_new=st.integers(1, 8), next_token=tokens)
    def grow(self, choice, num_new, next_token):
        live = self.harness.live
        self.harness.grow(live[choice % len(live)], num_new, next_token)

    @precondition(lambda self: self.harness.live)
    @rule(choice=st.integers(0, 63))
    def free(self, choice):
        live = self.harness.live
        self.harness.free(live[choice % len(live)])

    @rule()
    def reset_prefix_cache(self):
        self.harness.reset()

    @precondition(lambda self: self.harness.live)
    @rule()
    def free_everything(self):
        self.harness.release_all()

    @invariant()
    def invariants_hold(self):
        self.harness.check()

    def teardown(self):
        if hasattr(self, "harness"):
            self.harness.release_all()


class KVBlockMachineNoCaching(KVBlockMachine):
    enable_prefix_caching = False


MACHINE_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_random_interleavings_keep_invariants():
    run_state_machine_as_test(KVBlockMachine, settings=MACHINE_SETTINGS)


def test_random_interleavings_without_prefix_caching():
    run_state_machine_as_test(KVBlockMachineNoCaching, settings=settings(MACHINE_SETTINGS, max_examples=60))


def parent_blind_hash(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """A deliberately weak chain hash: ignores the parent and buckets tokens by their sum."""
    return bytes([sum(token_ids) % 3]) * 16


def token_sum_hash(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """Another weak chain hash: ignores the parent; [0, 1] and [1, 0] collide, as do [3, 0] and [1, 2]."""
    return sum(token_ids).to_bytes(16, "little")


def constant_hash(parent_hash: bytes, token_ids: list[int]) -> bytes:
    return b"\x00" * 16


@pytest.mark.parametrize("weak_hash", [parent_blind_hash, token_sum_hash, constant_hash])
def test_hash_collisions_never_serve_foreign_kv(weak_hash):
    """With a colliding chain hash every hit must still hold the request's own prefix."""
    with mock.patch.object(kv_blocks, "chain_hash", weak_hash):
        run_state_machine_as_test(KVBlockMachine, settings=settings(MACHINE_SETTINGS, max_examples=100))


# -- deterministic unit tests ----------------------------------------------------------------


def computed_request(harness: PrefixCacheHarness, prompt, cache_salt=None) -> Request:
    """Admit a request and compute its whole prompt in one chunk."""
    request = harness.admit(prompt, num_new=len(prompt), next_token=0, cache_salt=cache_salt)
    assert request is not None
    harness.check()
    return request


def cached_blocks_for(manager: KVBlockManager, prompt, cache_salt=None) -> list[int]:
    return manager.find_cached_prefix(make_request("probe", prompt, cache_salt))


def test_hit_reuses_the_finished_requests_blocks():
    harness = PrefixCacheHarness(num_blocks=8, block_size=2)
    first = computed_request(harness, [5, 6, 7, 8, 9])
    first_blocks = list(first.block_ids)
    harness.free(first)
    second = computed_request(harness, [5, 6, 7, 8, 4, 4])
    # Two full blocks match; the third differs in its first token.
    assert second.block_ids[:2] == first_blocks[:2]
    assert harness.num_hit_blocks[second.request_id] == 2
    harness.release_all()


def test_hit_always_leaves_one_token_to_compute():
    harness = PrefixCacheHarness(num_blocks=8, block_size=2)
    harness.free(computed_request(harness, [1, 2, 3, 4]))
    # The same 4-token prompt: both blocks are cached, but only the first may be used.
    assert len(cached_blocks_for(harness.manager, [1, 2, 3, 4])) == 1
    assert len(cached_blocks_for(harness.manager, [1, 2, 3, 4, 5])) == 2


def test_cache_salt_separates_prefixes():
    harness = PrefixCacheHarness(num_blocks=8, block_size=2)
    harness.free(computed_request(harness, [1, 2, 3], cache_salt="alice"))
    assert len(cached_blocks_for(harness.manager, [1, 2, 3], cache_salt="alice")) == 1
    assert cached_blocks_for(harness.manager, [1, 2, 3], cache_salt="bob") == []
    assert cached_blocks_for(harness.manager, [1, 2, 3]) == []


def test_failed_allocate_changes_nothing():
    harness = PrefixCacheHarness(num_blocks=3, block_size=2)
    holder = computed_request(harness, [1, 2, 3])  # holds 2 blocks
    manager = harness.manager
    greedy = make_request("greedy", [7] * 9)
    before = snapshot(manager, [holder, greedy])
    assert not manager.can_allocate(greedy, 9)
    assert manager.allocate(greedy, 9) is False
    assert snapshot(manager, [holder, greedy]) == before
    # A request that reuses the holder's first block and needs two more also does not fit.
    sharer = make_request("sharer", [1, 2, 9, 9, 9])
    hits = manager.find_cached_prefix(sharer)
    assert len(hits) == 1
    before = snapshot(manager, [holder, sharer])
    assert manager.allocate(sharer, 3, hits) is False
    assert snapshot(manager, [holder, sharer]) == before
    # ...but one more block does fit, and the shared block's ref count goes to 2.
    assert manager.allocate(sharer, 1, hits) is True
    assert manager.block(hits[0]).ref_count == 2
    manager.check_invariants([holder, sharer])


def test_lru_evicts_least_recently_freed_block_first():
    harness = PrefixCacheHarness(num_blocks=6, block_size=2)
    manager = harness.manager
    prompts_by_name = {"a": [1, 1, 1], "b": [2, 2, 2], "c": [3, 3, 3]}
    requests = {name: computed_request(harness, prompt) for name, prompt in prompts_by_name.items()}
    assert manager.num_free_blocks == 0
    for name in ("b", "a", "c"):  # free order: b's block is the least recently freed
        harness.free(requests[name])
    for prompt in prompts_by_name.values():
        assert len(cached_blocks_for(manager, prompt)) == 1
    # Four fresh blocks: the three never-cached ones, then b's cached block.
    harness.admit([9] * 7, num_new=7, next_token=0)
    assert cached_blocks_for(manager, prompts_by_name["b"]) == []
    assert len(cached_blocks_for(manager, prompts_by_name["a"])) == 1
    assert len(cached_blocks_for(manager, prompts_by_name["c"])) == 1
    # Reusing c refreshes it, so a is now the least recently freed.
    harness.free(computed_request(harness, prompts_by_name["c"]))
    harness.admit([8, 8], num_new=2, next_token=0)
    assert cached_blocks_for(manager, prompts_by_name["a"]) == []
    assert len(cached_blocks_for(manager, prompts_by_name["c"])) == 1
    harness.check()


def test_tail_block_is_evicted_before_head():
    """Freeing releases the tail first, so a chain is evicted from its end and its head stays useful."""
    harness = PrefixCacheHarness(num_blocks=3, block_size=2)
    manager = harness.manager
    harness.free(computed_request(harness, [1, 2, 3, 4, 5]))  # 2 cached blocks + 1 plain block
    assert len(cached_blocks_for(manager, [1, 2, 3, 4, 0])) == 2
    harness.admit([7, 7, 7], num_new=3, next_token=0)  # needs 2: the plain block, then the tail
    assert len(cached_blocks_for(manager, [1, 2, 3, 4, 0])) == 1
    harness.check()


def test_reset_keeps_blocks_in_use_findable():
    harness = PrefixCacheHarness(num_blocks=6, block_size=2)
    manager = harness.manager
    running = computed_request(harness, [1, 2, 3])
    harness.free(computed_request(harness, [4, 5, 6]))
    harness.reset()
    assert cached_blocks_for(manager, [4, 5, 6]) == []
    assert cached_blocks_for(manager, [1, 2, 3]) == [running.block_ids[0]]
    harness.check()


def test_disabled_prefix_caching_never_hits():
    harness = PrefixCacheHarness(num_blocks=6, block_size=2, enable_prefix_caching=False)
    harness.free(computed_request(harness, [1, 2, 3, 4, 5]))
    assert cached_blocks_for(harness.manager, [1, 2, 3, 4, 5]) == []
    assert all(block.block_hash is None for block in harness.manager.block_states())


def test_collision_cannot_splice_a_cached_block_onto_another_prefix():
    """A child block must only be served after the very parent its KV was computed from.

    With a chain hash that ignores the parent, [3, 0] and [1, 2] collide. ``first`` and
    ``second`` compute [3, 0] at the same time; first registers it, so second's copy stays
    unregistered, yet second's [6, 6] block is registered under the [3, 0] hash as parent.
    Once first's block is evicted and the colliding [1, 2] block takes that hash, a request
    for [1, 2 | 6, 6] must not be handed second's [6, 6] block, whose KV follows [3, 0].
    """
    with mock.patch.object(kv_blocks, "chain_hash", token_sum_hash):
        harness = PrefixCacheHarness(num_blocks=10, block_size=2)
        first = harness.admit([3, 0, 5, 5, 9], num_new=1, next_token=0)
        second = harness.admit([3, 0, 6, 6, 9], num_new=1, next_token=0)
        harness.grow(first, 4, next_token=0)
        harness.grow(second, 4, next_token=0)
        harness.free(first)
        harness.reset()  # evicts first's blocks; second still holds its own
        harness.free(computed_request(harness, [1, 2, 7]))  # the colliding block takes the parent hash
        spliced = make_request("spliced", [1, 2, 6, 6, 8])
        harness.check_hits(spliced, harness.manager.find_cached_prefix(spliced))
        harness.check()


def test_duplicate_prefix_computed_concurrently_still_caches_the_distinct_tail():
    """Two requests that computed the same first block at once: the second's own tail is still reusable."""
    harness = PrefixCacheHarness(num_blocks=12, block_size=2)
    first = harness.admit([3, 0, 5, 5, 9], num_new=1, next_token=0)
    second = harness.admit([3, 0, 6, 6, 9], num_new=1, next_token=0)
    harness.grow(first, 4, next_token=0)
    harness.grow(second, 4, next_token=0)
    harness.free(first)
    harness.free(second)
    follow_up = make_request("follow-up", [3, 0, 6, 6, 1])
    hits = harness.manager.find_cached_prefix(follow_up)
    harness.check_hits(follow_up, hits)
    assert len(hits) == 2
