"""The step after a step in flight, planned before that step's tokens are known (the engine's lookahead).

``EngineCore`` queues it on the device behind the step in flight; its decodes' inputs are that step's sampled
tokens, copied there. Every request of the step goes on: one that samples and cannot stop by length at this
token decodes next; one whose prompt the step left unfinished gets its next chunk. A request that samples a
stop token, or is aborted or stopped by a stop string meanwhile, is skipped by ``Scheduler.update`` (its extra
token is dropped).

Under fcfs and priority (``SchedulerConfig.lookahead_prompts``) waiting requests are admitted as a normal step
would, within what is left of the budget, but never by preempting: the blocks of the step in flight are in use on
the device, so while a waiting request outranks a running one (priority) a normal step runs instead. The deadline
and fair policies shape each step from the queue (budget cuts, lanes), so there the step must be decode-only with
nothing waiting. Pure Python, like the scheduler it serves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from joule.engine.plan import CONTINUATION_TOKEN, ScheduledSequence, StepPlan
from joule.engine.policies import FirstComeFirstServed, PriorityFirst
from joule.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from joule.engine.scheduler import Scheduler


def plan_continuation(scheduler: Scheduler, plan: StepPlan, now: float) -> StepPlan | None:
    """The continuation of ``plan``, its blocks reserved; None, changing nothing, when the rules above do not
    allow one, ``plan`` preempted or left a running request out (a policy held its decode back: chaining the
    others would keep it waiting), or the running requests lack blocks for their next tokens."""
    if not plan.sequences or plan.preempted_request_ids or len(plan.sequences) != len(scheduler.running):
        return None
    with_prompts = lookahead_prompts(scheduler)
    if scheduler.waiting and not with_prompts:
        return None
    if scheduler.waiting:
        # A waiting request that outranks a running one (priority) is the normal step's to admit: it may have to
        # preempt, which a continuation never does.
        policy = scheduler.policy
        if policy.may_preempt_for(policy.next_waiting(scheduler.waiting), policy.choose_victim(scheduler.running),
                                  scheduler.running):
            return None
    max_model_len = scheduler.config.max_model_len
    manager = scheduler.block_manager
    block_size = manager.block_size
    # (request, its computed tokens once ``plan`` is applied); the decodes whose next position needs a new block
    # (one step in ``block_size``: the others' calls to the block manager are skipped, 256 rows a step).
    decodes, chunks, growing = [], [], []
    for sequence in plan.sequences:
        request = sequence.request
        if request.status is not RequestStatus.RUNNING:
            return None
        end = sequence.start_position + len(sequence.token_ids)
        if not with_prompts and (len(sequence.token_ids) != 1 or not sequence.samples):
            return None
        if not sequence.samples:
            chunks.append((request, end))
            continue
        outputs_after = len(request.output_token_ids) + 1
        if outputs_after >= request.max_tokens or (
                max_model_len is not None and len(request.prompt_token_ids) + outputs_after >= max_model_len):
            continue  # stops by length at this token, whatever it is
        decodes.append((request, end))
        if end >= len(request.block_ids) * block_size:
            growing.append((request, end))
    # Blocks through each decode's next position: ``plan``'s own tokens are not yet counted as computed.
    if growing and sum(manager.blocks_to_grow(request, end + 1 - request.num_computed_tokens)
                       for request, end in growing) > manager.num_free_blocks:
        return None
    scheduler.num_steps += 1
    step = scheduler.num_steps
    continuation = StepPlan()
    budget = scheduler.config.max_num_batched_tokens - len(decodes)
    for request, end in growing:
        manager.allocate(request, end + 1 - request.num_computed_tokens)
    sequences, on_scheduled = continuation.sequences, scheduler.policy.on_scheduled
    for request, end in decodes:  # every row of a decode step passes here: no call but the policy's
        sequences.append(ScheduledSequence(request, [CONTINUATION_TOKEN], end, request.block_ids, True))
        request.last_scheduled_step = step
        on_scheduled(request, 1, True)
    for request, end in chunks:
        num_new = min(request.num_tokens - end, budget)
        if num_new <= 0 or not manager.allocate(request, end + num_new - request.num_computed_tokens):
            break
        _add_chunk(scheduler, continuation, request, request.token_ids_between(end, end + num_new), end,
                   end + num_new == request.num_tokens)
        budget -= num_new
    if with_prompts and budget > 0 and scheduler.waiting:
        scheduler.admit_waiting(budget, continuation, now, may_preempt=False)
    if not continuation.sequences:  # nothing could go on (and so nothing was allocated)
        scheduler.num_steps -= 1
        return None
    return continuation


def lookahead_prompts(scheduler: Scheduler) -> bool:
    """Whether a continuation may carry prompt chunks and admissions: only where a normal step would plan the
    same kind of step (the whole budget, no lanes: fcfs, and priority while no waiting request outranks a
    running one)."""
    config = scheduler.config
    return (config.lookahead_prompts and config.enable_chunked_prefill
            and type(scheduler.policy) in (FirstComeFirstServed, PriorityFirst))


def _add_chunk(scheduler: Scheduler, plan: StepPlan, request: Request, token_ids: list[int], start: int,
               samples: bool) -> None:
    """A prompt chunk's row (the decode rows are added in ``plan_continuation``'s own loop)."""
    plan.sequences.append(ScheduledSequence(request, token_ids, start, request.block_ids, samples))
    request.last_scheduled_step = scheduler.num_steps
    scheduler.policy.on_scheduled(request, len(token_ids), False)
