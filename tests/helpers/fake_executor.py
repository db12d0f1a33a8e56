"""A deterministic stand-in for the model executor, and an engine driver that checks every step.

``SimulatedExecutor`` keeps a simulated paged KV cache. Each slot holds a digest of the
whole prefix up to its position (the KV of a real transformer's deeper layers depends on
every earlier token), and the executor checks that every position a sequence attends to
holds exactly the digest of the request's own prefix. A bad prefix-cache hit, a block
table missing a block, a block written by another request, or a recompute from the wrong
place therefore fails loudly. The sampled token is a function of the request's history
and id only, so outputs must not depend on batching, chunking, preemption or caching.

Imported as ``helpers.fake_executor`` (``tests`` is on pytest's pythonpath).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from joule.engine.core import EngineCore
from joule.engine.kv_blocks import KVBlockManager
from joule.engine.plan import StepPlan, StepResult
from joule.engine.request import Request, RequestSLO, RequestStatus, SampledToken
from joule.engine.scheduler_config import SchedulerConfig
from joule.sampling_params import SamplingParams

EOS_TOKEN_ID = 0
VOCAB_SIZE = 32
FILLER_TOKEN_ID = VOCAB_SIZE  # what the simulated sampler emits where a stop token is banned


def mix(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def prefix_digests(request: Request, length: int) -> list[int]:
    """The KV digest the request's own tokens give at each position below ``length``."""
    digest = mix("root", request.cache_salt)
    digests = []
    for token in request.token_ids_between(0, length):
        digest = mix(digest, token)
        digests.append(digest)
    return digests


class SimulatedExecutor:
    """Executes plans against a simulated paged KV cache; see the module docstring."""

    def __init__(self, block_size: int, always_eos: bool = False, before_execute=None, sampler=None):
        self.block_size = block_size
        self.always_eos = always_eos
        self.sampler = sampler  # optional (request, digest) -> token, replacing the default policy
        self.before_execute = before_execute
        self.kv: dict[tuple[int, int], int] = {}
        self.num_executed = 0

    def _slot(self, block_ids: list[int], position: int) -> tuple[int, int]:
        return block_ids[position // self.block_size], position % self.block_size

    def execute(self, plan: StepPlan) -> StepResult:
        if self.before_execute is not None:
            self.before_execute(plan)
        self.num_executed += 1
        sampled: dict[str, SampledToken] = {}
        for sequence in plan.sequences:
            request, start = sequence.request, sequence.start_position
            expected = prefix_digests(request, start)
            for position in range(start):
                held = self.kv.get(self._slot(sequence.block_ids, position))
                assert held == expected[position], (
                    f"{request.request_id} attends to wrong KV at position {position} "
                    f"(block table {sequence.block_ids})"
                )
            digest = expected[-1] if expected else mix("root", request.cache_salt)
            for offset, token in enumerate(sequence.token_ids):
                digest = mix(digest, token)
                self.kv[self._slot(sequence.block_ids, start + offset)] = digest
            if sequence.samples:
                sampled[request.request_id] = SampledToken(self.sample(request, digest))
        return StepResult(sampled=sampled, elapsed_seconds=1e-3)

    def sample(self, request: Request, digest: int) -> int:
        """Like a seeded sampler: stop tokens are banned until ``min_tokens`` outputs exist."""
        if self.sampler is not None:
            return self.sampler(request, digest)
        params = request.sampling_params
        may_stop = request.num_output_tokens >= params.min_tokens
        if self.always_eos and may_stop:
            return EOS_TOKEN_ID
        token = mix(digest, request.request_id) % VOCAB_SIZE
        stop_tokens = set(request.eos_token_ids) | set(params.stop_token_ids)
        if not may_stop and token in stop_tokens:
            return FILLER_TOKEN_ID
        return token


@dataclass
class RequestSpec:
    """A request to build afresh for each engine run (Request objects are mutated by runs)."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    with_eos: bool = True
    group_id: str | None = None
    cache_salt: str | None = None
    arrival_time: float = 0.0
    slo: RequestSLO | None = None
    tenant: str | None = None

    def build(self) -> Request:
        params = SamplingParams(
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
        )
        return Request(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt),
            sampling_params=params,
            max_tokens=self.max_tokens,
            eos_token_ids=frozenset({EOS_TOKEN_ID}) if self.with_eos else frozenset(),
            group_id=self.group_id,
            cache_salt=self.cache_salt,
            arrival_time=self.arrival_time,
            slo=self.slo,
            tenant=self.tenant,
        )


@dataclass
class RunStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_chunked_prefills: int = 0
    max_running: int = 0
    prefix_hit_tokens: int = 0
    finished_order: list[str] = field(default_factory=list)


class CheckedEngine:
    """An EngineCore on a SimulatedExecutor that checks scheduling properties around every step."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        enable_prefix_caching: bool = True,
        always_eos: bool = False,
        sampler=None,
        policy: str = "fcfs",
        admission: str = "greedy",
        enable_chunked_prefill: bool = True,
        clock=lambda: 0.0,
    ):
        self.config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            policy=policy,
            admission=admission,
            enable_chunked_prefill=enable_chunked_prefill,
        )
        self.block_manager = KVBlockManager(num_blocks, block_size, enable_prefix_caching)
        self.executor = SimulatedExecutor(block_size, always_eos, before_execute=self._check_plan, sampler=sampler)
        self.core = EngineCore(self.config, self.block_manager, self.executor, clock=clock)
        self.plans: list[list[tuple[str, int, int]]] = []  # (request id, tokens, start) of every executed step
        self.scheduler = self.core.scheduler
        self.requests: dict[str, Request] = {}
        self.aborted: set[str] = set()
        self.stats = RunStats()
        self._running_before: list[Request] = []
        self._waiting_before: list[Request] = []
        self._decoding_before: set[str] = set()

    def add(self, spec: RequestSpec) -> Request:
        request = spec.build()
        self.core.add_request(request)
        self.requests[request.request_id] = request
        return request

    # -- stepping ------------------------------------------------------------------------
    def step(self) -> list[Request]:
        self._running_before = list(self.scheduler.running)
        self._waiting_before = list(self.scheduler.waiting)
        self._decoding_before = {r.request_id for r in self._running_before if not r.is_prefilling}
        executed_before = self.executor.num_executed
        progressed = self.core.step()
        if not self.core.last_step.preempted_request_ids:  # (a step may only make room, under policy preemption)
            assert self.executor.num_executed == executed_before + 1, "a step with work to do planned nothing"
        self.stats.num_steps += 1
        self.stats.num_preemptions += len(self.core.last_step.preempted_request_ids)
        self.stats.max_running = max(self.stats.max_running, len(self._running_before))
        for request in progressed:
            if request.is_finished:
                self.stats.finished_order.append(request.request_id)
                self.check_finished(request)
        self.check_blocks()
        return progressed

    def run(self, max_steps: int = 20_000, on_step=None) -> dict[str, tuple]:
        """Step until every request finished; returns id -> (outputs, finish reason, stop reason)."""
        while self.core.has_unfinished_requests():
            assert self.stats.num_steps < max_steps, "the engine stopped making progress"
            if on_step is not None:
                on_step(self)
            if not self.core.has_unfinished_requests():
                break
            self.step()
        self.check_all_free()
        for request in self.requests.values():
            assert request.is_finished
            self.stats.prefix_hit_tokens += max(0, request.num_cached_tokens)
        return self.results()

    def results(self) -> dict[str, tuple]:
        return {
            request_id: (tuple(request.output_token_ids), request.finish_reason, request.stop_reason)
            for request_id, request in self.requests.items()
            if request_id not in self.aborted
        }

    def abort(self, request_id: str) -> bool:
        """Abort a request; its exclusively held blocks must be free at once."""
        request = self.requests[request_id]
        if request.is_finished:
            return False
        exclusive = [b for b in request.block_ids if self.block_manager.block(b).ref_count == 1]
        free_before = self.block_manager.num_free_blocks
        assert self.core.abort_request(request_id) is request
        self.aborted.add(request_id)
        assert request.status is RequestStatus.FINISHED_ABORTED
        assert request.finish_reason == "abort"
        assert request.block_ids == []
        assert request not in self.scheduler.running and request not in self.scheduler.waiting
        assert self.block_manager.num_free_blocks == free_before + len(exclusive)
        assert self.core.abort_request(request_id) is None  # already gone
        self.check_blocks()
        return True

    # -- checks ------------------------------------------------------------------------------
    def _check_plan(self, plan: StepPlan) -> None:
        """Runs inside execute: the plan is final and no request has been updated yet."""
        config, size = self.config, self.block_manager.block_size
        assert 0 < plan.num_tokens <= config.max_num_batched_tokens
        assert len(plan.sequences) <= config.max_num_seqs
        planned = [sequence.request_id for sequence in plan.sequences]
        assert len(set(planned)) == len(planned), "a request was planned twice"
        assert plan.num_prefill_tokens + plan.num_decode_tokens == plan.num_tokens
        for sequence in plan.sequences:
            request = sequence.request
            assert request.status is RequestStatus.RUNNING and request in self.scheduler.running
            assert sequence.num_tokens >= 1
            assert sequence.start_position == request.num_computed_tokens
            assert sequence.context_length <= request.num_tokens
            assert sequence.token_ids == request.token_ids_between(sequence.start_position, sequence.context_length)
            assert sequence.block_ids == request.block_ids
            assert len(sequence.block_ids) * size >= sequence.context_length, "block table too short"
            assert sequence.samples == (sequence.context_length == request.num_tokens)
            if not sequence.samples:
                self.stats.num_chunked_prefills += 1

        self.plans.append([(s.request_id, s.num_tokens, s.start_position) for s in plan.sequences])
        running_before = [r.request_id for r in self._running_before]
        preempted = plan.preempted_request_ids
        first_come_first_served = self.config.policy == "fcfs"
        if first_come_first_served:
            assert preempted == running_before[::-1][: len(preempted)], "preempted someone but the newest"
        assert not set(preempted) & set(planned)
        for request_id in preempted:
            victim = self.requests[request_id]
            assert victim.status is RequestStatus.PREEMPTED and victim in self.scheduler.waiting
            assert victim.block_ids == [] and victim.num_computed_tokens == 0

        admitted = [request_id for request_id in planned if request_id not in running_before]
        waiting_before = [r.request_id for r in self._waiting_before]
        if first_come_first_served:
            assert admitted == waiting_before[: len(admitted)], "admission skipped the queue order"
        if preempted and self.config.policy not in ("priority", "fair"):
            # (priority and fair preempt *for* a waiting request, which is then admitted in the same step)
            assert not admitted, "admitted a request in a step that had to preempt"
        if self.block_manager.enable_prefix_caching:  # n > 1 siblings wait for the prompt to be cached
            for position, request_id in enumerate(admitted):
                request = self.requests[request_id]
                if request.group_id is None:
                    continue
                # Siblings already running, or admitted before it this step (their num_computed_tokens
                # is still what admission set: the cached prefix), must have their prompt computed.
                ahead = [r for r in self._running_before if r.request_id not in preempted]
                ahead += [self.requests[earlier_id] for earlier_id in admitted[:position]]
                for sibling in ahead:
                    if sibling.group_id == request.group_id:
                        assert sibling.num_computed_tokens >= sibling.num_prompt_tokens, "sibling did not wait"

        # Stall-free: a request that was decoding is in the plan unless it was preempted. (Admission
        # needs budget left after every running request, so running never outnumbers the budget.)
        if self.config.enable_chunked_prefill:
            skipped = self._decoding_before - set(planned) - set(preempted)
            if skipped and self.config.policy == "fair":
                lane = {self.requests[request_id].tenant for request_id in planned}
                if len(lane) == 1 and all(self.requests[request_id].tenant not in lane for request_id in skipped):
                    skipped = set()  # the fast lane: one less-served tenant's work alone, the rest wait one step
                else:  # a split step: at most half of a flooding tenant's decodes wait, the rest run
                    for tenant in {self.requests[request_id].tenant for request_id in skipped}:
                        decoding = [r for r in self._decoding_before if self.requests[r].tenant == tenant]
                        held = [r for r in skipped if self.requests[r].tenant == tenant]
                        assert len(held) <= len(decoding) // 2, f"more than half of {tenant}'s decodes waited"
                    skipped = set()
            assert not skipped, f"decodes {sorted(skipped)} were left out of the step"
        else:
            self._check_prefill_first(plan, admitted)
        self.block_manager.check_invariants(self.scheduler.running)

    def _check_prefill_first(self, plan: StepPlan, admitted: list[str]) -> None:
        """Prefill-first: a step is whole newly admitted prompts only, or every running decode only."""
        if admitted:
            assert len(admitted) == len(plan.sequences), "a prefill step also ran decodes"
            for sequence in plan.sequences:
                assert sequence.samples, "a prompt was chunked"
            return
        running_now = {r.request_id for r in self.scheduler.running}
        assert {s.request_id for s in plan.sequences} == running_now, "a decode step left out a running request"
        assert all(s.num_tokens == 1 and s.request_id in self._decoding_before for s in plan.sequences)

    def check_blocks(self) -> None:
        manager = self.block_manager
        manager.check_invariants(self.scheduler.running)
        owned = {b for request in self.scheduler.running for b in request.block_ids}
        assert manager.num_free_blocks == manager.num_blocks - len(owned)
        assert len(self.scheduler.running) <= self.config.max_num_seqs
        assert len(self.scheduler.running) <= self.config.max_num_batched_tokens
        for request in self.scheduler.waiting:
            assert request.block_ids == [] and request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        for request in self.requests.values():
            if request.is_finished:
                assert request.block_ids == []
                assert request.request_id not in self.scheduler.requests

    def check_finished(self, request: Request) -> None:
        """A stop token at or after ``min_tokens`` ends the request there; otherwise it runs to max_tokens."""
        params, outputs = request.sampling_params, request.output_token_ids
        stop_tokens = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_tokens |= set(request.eos_token_ids)
        may_stop_from = params.min_tokens
        if request.finish_reason == "length":
            assert len(outputs) == request.max_tokens or request.num_tokens == self.config.max_model_len
            assert not stop_tokens & set(outputs[may_stop_from:]), "ran past a stop token"
            assert request.stop_reason is None
            return
        assert request.finish_reason == "stop"
        assert len(outputs) >= params.min_tokens + 1
        assert outputs[-1] in stop_tokens
        assert not stop_tokens & set(outputs[may_stop_from:-1]), "ran past a stop token"
        stopped_on_eos = not params.ignore_eos and outputs[-1] in request.eos_token_ids
        assert request.stop_reason == (None if stopped_on_eos else outputs[-1])

    def check_all_free(self) -> None:
        assert not self.scheduler.running and not self.scheduler.waiting and not self.scheduler.requests
        assert self.block_manager.num_free_blocks == self.block_manager.num_blocks
        assert all(block.ref_count == 0 for block in self.block_manager.block_states())
        self.block_manager.check_invariants([])


def reference_results(specs: list[RequestSpec]) -> dict[str, tuple]:
    """Outputs with room for everything at once: no chunking, no preemption, no prefix caching."""
    block_size = 4
    longest = max(len(spec.prompt) + spec.max_tokens for spec in specs)
    engine = CheckedEngine(
        num_blocks=len(specs) * (longest // block_size + 2),
        block_size=block_size,
        max_num_batched_tokens=len(specs) * longest + 1,
        max_num_seqs=len(specs),
        max_model_len=longest,
        enable_prefix_caching=False,
    )
    for spec in specs:
        engine.add(spec)
    results = engine.run()
    assert engine.stats.num_preemptions == 0 and engine.stats.num_chunked_prefills == 0
    return results
