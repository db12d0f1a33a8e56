"""Token-budget scheduler with stall-free chunked prefill (Sarathi-Serve style).

There are no prefill or decode phases. Each step hands out a budget of
``max_num_batched_tokens``: running decodes first, then the next chunks of
prompts already in progress, then new requests from the waiting queue. A
running decode is never left out to make room for a prefill. When KV blocks
run out, the running request the policy picks (by default the most recently
admitted) is preempted: its blocks are freed and it is recomputed later from
its prompt plus what it generated.

The policy (``policies.py``) orders the queues and may cut the step's budget;
the admission policy (``admission.py``) may hold a request back although
blocks are free. With ``enable_chunked_prefill=False`` the scheduler is the
prefill-first baseline instead (vLLM's old scheduler): whenever a waiting
request can be admitted, the step runs only whole prompts (decodes wait);
otherwise it is a decode-only step. That mode needs
``max_num_batched_tokens >= max_model_len`` so any prompt fits one step.

Pure Python: the simulator drives this same class with a simulated executor.
"""

from __future__ import annotations

from collections import deque

from joule.engine.admission import make_admission_policy
from joule.engine.kv_blocks import KVBlockManager
from joule.engine.plan import ScheduledSequence, StepPlan, StepResult
from joule.engine.continuation import plan_continuation
from joule.engine.policies import make_policy
from joule.engine.request import FINISHED_STATUSES, Request, RequestStatus
from joule.engine.scheduler_config import SchedulerConfig
from joule.engine.step_time import StepTimeEstimator


_ANY_TENANT = object()  # _admit_waiting's default: every tenant's requests


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: KVBlockManager,
                 step_time: StepTimeEstimator | None = None):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.policy = make_policy(config.policy, fair_prompt_cap=config.fair_prompt_cap,
                                  fair_split_decodes=config.fair_split_decodes, fair_keep_up=config.fair_keep_up,
                                  step_token_budget=config.max_num_batched_tokens)
        self.admission = make_admission_policy(
            config.admission, block_manager.num_blocks, block_manager.block_size, config.max_model_len
        )
        self.step_time = step_time if step_time is not None else StepTimeEstimator()
        self.num_steps = 0  # plans made, for the decode halves' turns

    # -- queue management -----------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use.")
        if request.num_prompt_tokens == 0:
            raise ValueError("prompt must contain at least one token.")
        if request.num_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {request.num_tokens} tokens, which leaves no room to generate within "
                f"max_model_len={self.config.max_model_len}."
            )
        # A request whose KV cannot fit even with the cache to itself would preempt itself and
        # never be re-admitted, stalling every step and everything queued behind it.
        worst_case_kv_tokens = min(request.num_prompt_tokens + request.max_tokens, self.config.max_model_len) - 1
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if worst_case_kv_tokens > capacity:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) plus max_tokens={request.max_tokens} needs KV "
                f"for {worst_case_kv_tokens} tokens, but the KV cache holds only {capacity}."
            )
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.policy.on_added(request, self.waiting, self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def abort_request(self, request_id: str) -> Request | None:
        """Remove a request wherever it is and free its blocks at once."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self.finish_request(request, RequestStatus.FINISHED_ABORTED)
        return request

    def finish_request(
        self, request: Request, status: RequestStatus, stop_reason: int | str | None = None
    ) -> None:
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status.")
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        request.finish_reason = status.value
        request.stop_reason = stop_reason
        self.block_manager.free(request)
        self.requests.pop(request.request_id, None)
        if status != RequestStatus.FINISHED_ABORTED:
            self.admission.on_finished(request)

    def observe_step(self, num_prefill_tokens: int, num_decode_tokens: int, elapsed_seconds: float) -> None:
        """Teach the step-time estimator how long an executed step took (EngineCore calls this)."""
        self.step_time.observe(num_prefill_tokens, num_decode_tokens, elapsed_seconds)
        self.policy.observe_step(num_prefill_tokens, num_decode_tokens, elapsed_seconds, self.step_time)

    # -- one step ----------------------------------------------------------------------
    def schedule(self, now: float = 0.0) -> StepPlan:
        if not self.config.enable_chunked_prefill:
            return self._schedule_prefill_first(now)
        self.num_steps += 1
        plan = StepPlan()
        scheduled: dict[str, ScheduledSequence] = {}
        decodes, prefills = [], []
        for request in self.running:
            (prefills if request.is_prefilling else decodes).append(request)
        budget = self.policy.token_budget(
            decodes, self.config.max_num_batched_tokens, self.step_time, self.block_manager.block_size
        )
        shape = self.policy.step_shape(self.waiting, self.running, now, self.step_time)
        if shape is not None and shape.split_decode_tenants:
            decodes = self._split_decodes(decodes, shape.split_decode_tenants)
        uncapped = budget
        if shape is not None and shape.prompt_token_cap is not None:
            budget = min(budget, len(decodes) + max(shape.prompt_token_cap, 1))
        if shape is not None and shape.is_lane:
            finishing = shape.lane_finishes_prompts
            lane = [request for request in (decodes + prefills if finishing else decodes)
                    if request.tenant == shape.lane_tenant]
            lane_decodes = [request for request in lane if not request.is_prefilling]
            if len(lane_decodes) + shape.lane_prompt_tokens < (uncapped if finishing else budget):
                # A short step of the less-served tenant's own: its decodes, its prompt chunks in progress and
                # its waiting prompts.
                left = self._schedule_running(lane, len(lane_decodes) + shape.lane_prompt_tokens, plan,
                                              scheduled)
                if plan.preempted_request_ids:
                    return plan
                if left == 0 or self._admit_waiting(left, plan, scheduled, now, only_tenant=shape.lane_tenant) < left:
                    return plan  # the lane's chunks in progress took it all, or its waiting prompts started
                # Its prompts could not be admitted: a normal step after all, with what is left.
                budget = max(0, budget - sum(sequence.num_tokens for sequence in plan.sequences))
                decodes = [request for request in decodes if request.request_id not in scheduled]
                prefills = [request for request in prefills if request.request_id not in scheduled]
        budget = self._schedule_running(decodes + prefills, budget, plan, scheduled)
        if not plan.preempted_request_ids:
            budget = self._admit_waiting(budget, plan, scheduled, now)
        return plan

    def schedule_continuation(self, plan: StepPlan, now: float = 0.0) -> StepPlan | None:
        """The step after ``plan``, planned before ``plan``'s tokens are known (``continuation.py``)."""
        return plan_continuation(self, plan, now)

    def _split_decodes(self, decodes: list[Request], tenants: frozenset) -> list[Request]:
        """The decodes of this step when ``tenants``' decodes may run half per step: all the others', and
        the half of theirs that waited longest, if the step-time estimate says halving them saves more
        than the fixed cost of the extra step it takes (a weight-bound decode batch is not split)."""
        by_tenant: dict[object, list[Request]] = {}
        for request in decodes:
            if request.tenant in tenants:
                by_tenant.setdefault(request.tenant, []).append(request)
        coefficients = self.step_time.coefficients()
        held = sum(len(requests) // 2 for requests in by_tenant.values())
        if held == 0 or coefficients is None or coefficients.per_decode_token * held <= coefficients.fixed_seconds:
            return decodes
        waits = set()
        for requests in by_tenant.values():  # each tenant's half that ran most lately waits
            requests.sort(key=lambda request: request.last_scheduled_step)
            waits.update(request.request_id for request in requests[len(requests) - len(requests) // 2:])
        return [request for request in decodes if request.request_id not in waits]

    def _schedule_running(self, requests: list[Request], budget: int, plan: StepPlan, scheduled: dict) -> int:
        """Plan ``requests`` (running decodes, then prompt chunks) within ``budget``; returns what is left."""
        for request in requests:
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.block_manager.allocate(request, num_new):
                victim = self.policy.choose_victim(self.running)
                budget += self._preempt(victim, plan, scheduled)
                if victim is request:
                    break
            else:
                budget -= num_new
                self._add_to_plan(request, num_new, plan, scheduled)
        return budget

    def _schedule_prefill_first(self, now: float) -> StepPlan:
        """The baseline: whole prompts whenever one can be admitted, else a decode-only step."""
        plan = StepPlan()
        scheduled: dict[str, ScheduledSequence] = {}
        self._admit_waiting(self.config.max_num_batched_tokens, plan, scheduled, now, whole_prompts=True)
        if plan.sequences:
            return plan
        for request in list(self.running):
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            while not self.block_manager.allocate(request, 1):
                victim = self.policy.choose_victim(self.running)
                self._preempt(victim, plan, scheduled)
                if victim is request:
                    break
            else:
                self._add_to_plan(request, 1, plan, scheduled)
        return plan

    def admit_waiting(self, budget: int, plan: StepPlan, now: float, may_preempt: bool = True) -> int:
        """Admit waiting requests into ``plan`` within ``budget``; returns what is left (the continuation's
        admissions, which pass ``may_preempt=False``)."""
        return self._admit_waiting(budget, plan, {}, now, may_preempt=may_preempt)

    def _admit_waiting(self, budget: int, plan: StepPlan, scheduled: dict, now: float,
                       whole_prompts: bool = False, only_tenant: object = _ANY_TENANT, may_preempt: bool = True) -> int:
        """Admit waiting requests in policy order; ``whole_prompts``: only if all of it fits this step;
        ``only_tenant``: that tenant's requests alone (a fast-lane step); ``may_preempt``: False stops where
        a running request would have to make room (a continuation's admissions)."""
        size = self.block_manager.block_size
        pool = self.waiting
        if only_tenant is not _ANY_TENANT:
            pool = deque(request for request in self.waiting if request.tenant == only_tenant)
        made_room_for = None  # the request a preemption just made room for: it goes next, whatever the order
        while pool and budget > 0:
            request = made_room_for or self.policy.next_waiting(pool)
            made_room_for = None
            if request.request_id in plan.preempted_request_ids:
                break  # a victim of this step comes back in a later one, never the same
            if self._waits_for_sibling(request):
                break
            if not self.admission.may_admit(request, self.running):
                break
            if len(self.running) >= self.config.max_num_batched_tokens:
                break  # every running request must fit one step's decodes (a lane step plans only its own)
            has_room = len(self.running) < self.config.max_num_seqs
            if has_room:
                cached_blocks = [] if request.needs_prompt_logits else self.block_manager.find_cached_prefix(request)
                num_computed = len(cached_blocks) * size
                num_new = min(request.num_tokens - num_computed, budget)
                if whole_prompts and num_new < request.num_tokens - num_computed:
                    break  # does not fit what is left of this step; it goes first next step
                has_room = self.block_manager.allocate(request, num_new, cached_blocks)
            if not has_room:  # a sequence slot or blocks: a running request the policy ranks lower makes room
                refund = self._preempt_for(request, plan, scheduled) if may_preempt else None
                if refund is None:
                    break
                budget += refund
                made_room_for = request
                continue
            self.waiting.remove(request)
            if pool is not self.waiting:
                pool.remove(request)
            self.block_manager.record_lookup(request.num_tokens, num_computed)
            request.num_computed_tokens = num_computed
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            budget -= num_new
            self._add_to_plan(request, num_new, plan, scheduled)
        return budget

    def _preempt_for(self, candidate: Request, plan: StepPlan, scheduled: dict) -> int | None:
        """Preempt a running request the policy ranks below ``candidate``; None if there is none."""
        if not self.running:
            return None
        victim = self.policy.choose_victim(self.running)
        if not self.policy.may_preempt_for(candidate, victim, self.running):
            return None
        return self._preempt(victim, plan, scheduled)

    def _waits_for_sibling(self, request: Request) -> bool:
        """A later sample of an n > 1 request waits until a sibling's prompt is cached."""
        if request.group_id is None or not self.block_manager.enable_prefix_caching:
            return False
        return any(
            other.group_id == request.group_id and other.num_computed_tokens < other.num_prompt_tokens
            for other in self.running
        )

    def _add_to_plan(self, request: Request, num_new: int, plan: StepPlan, scheduled: dict) -> None:
        # Runs for every sequence of every step (256 x ~1,000 per benchmark): positional arguments, no
        # property lookups twice.
        start = request.num_computed_tokens
        num_prompt = len(request.prompt_token_ids)
        end = start + num_new
        if num_new == 1 and start >= num_prompt:  # a decode: its one token is the last output
            token_ids = [request.output_token_ids[start - num_prompt]]
        else:
            token_ids = request.token_ids_between(start, end)
        sequence = ScheduledSequence(request, token_ids, start, request.block_ids,
                                     end == num_prompt + len(request.output_token_ids))
        plan.sequences.append(sequence)
        scheduled[request.request_id] = sequence
        request.last_scheduled_step = self.num_steps
        self.policy.on_scheduled(request, num_new, num_new == 1 and start >= num_prompt)

    def _preempt(self, victim: Request, plan: StepPlan, scheduled: dict) -> int:
        """Preempt ``victim``; returns the budget it gives back if it was already planned."""
        refund = 0
        sequence = scheduled.pop(victim.request_id, None)
        if sequence is not None:
            plan.sequences.remove(sequence)
            refund = sequence.num_tokens
        self.running.remove(victim)
        self.block_manager.free(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        plan.preempted_request_ids.append(victim.request_id)
        return refund

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Apply a step's result; returns the requests that progressed (finished ones included)."""
        progressed: list[Request] = []
        block_size = self.block_manager.block_size
        max_model_len = self.config.max_model_len
        sampled_tokens, token_ids = result.sampled, result.token_ids
        prompt_logprobs = result.prompt_logprobs
        for sequence in plan.sequences:  # every row of every step: kept to plain attribute and list work
            request = sequence.request
            if request.status in FINISHED_STATUSES:
                continue
            computed_before = request.num_computed_tokens
            request.num_computed_tokens = computed_after = computed_before + len(sequence.token_ids)
            if sequence.samples:
                if token_ids is None:
                    sampled = sampled_tokens[request.request_id]
                    token_id = sampled.token_id
                    if request.sampling_params.logprobs is not None:
                        request.output_logprobs.append(sampled)
                else:  # sampled on the device: no row asks for logprobs
                    token_id = token_ids[request.request_id]
                outputs = request.output_token_ids
                outputs.append(token_id)
                stop = request.stop_after(token_id, len(outputs), max_model_len)
                if stop is not None:
                    request.status, reason = stop
                    if reason is not None:
                        request.stop_reason = reason
            if prompt_logprobs:
                scored = prompt_logprobs.get(request.request_id)
                if scored is not None and scored[0] == len(request.prompt_logprobs):
                    request.prompt_logprobs.extend(scored[1])
            if request.status in FINISHED_STATUSES:
                self._release(request)
            elif computed_after // block_size != computed_before // block_size:  # a block just filled up
                self.block_manager.cache_full_blocks(request)
            progressed.append(request)
        return progressed

    def _release(self, request: Request) -> None:
        self.block_manager.cache_full_blocks(request)
        self.running.remove(request)
        request.finish_reason = request.status.value
        self.block_manager.free(request)
        self.requests.pop(request.request_id, None)
        self.admission.on_finished(request)
