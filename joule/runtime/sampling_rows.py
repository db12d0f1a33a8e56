"""Where a request's next token is sampled: on the device by a bare argmax, on the device with its parameters
(temperature, top-k/p, min-p, seeds), or on the host's sampler (logprobs, penalties, bans, grammars), and the
host sampler's row for it. The executor asks this of every row of every step, so the checks are kept to
attribute reads."""

from __future__ import annotations

import operator
from itertools import repeat

from joule.engine.request import Request
from joule.runtime.sampler import SamplingRow


_params_of = operator.attrgetter("sampling_params")
_constraint_of = operator.attrgetter("constraint")


def plain_greedy(request: Request) -> bool:
    return all_rows_pass([request], params_plain_greedy)


def params_plain_greedy(params) -> bool:
    return (params.is_greedy and not params.logit_bias and params.allowed_token_ids is None
            and params_on_device(params))


def params_on_device(params) -> bool:
    """Sampling that needs nothing from the host but the parameters: no logprobs or penalties (which read the token
    history); ``all_rows_pass`` adds the request's own: no grammar, no bans (EOS before ``min_tokens``)."""
    return (params.logprobs is None and params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0)


def all_rows_pass(requests: list[Request], params_pass) -> bool:
    """``params_pass`` holds for every request's parameters, and no request has a grammar or is short of its
    ``min_tokens``. Asked of every row of every step: whole-list passes in C, each distinct params object (one
    ``generate`` call's requests share one) tested once, the token counts read only where a ``min_tokens`` asks."""
    all_params = list(map(_params_of, requests))
    distinct = dict(zip(map(id, all_params), all_params)).values()  # by identity: params are not hashable
    if not all(map(params_pass, distinct)) or any(map(operator.is_not, map(_constraint_of, requests), repeat(None))):
        return False
    if any(params.min_tokens for params in distinct):
        return all(len(request.output_token_ids) >= request.sampling_params.min_tokens for request in requests)
    return True


def sampling_row(request: Request, num_pending_tokens: int = 0) -> SamplingRow:
    params = request.sampling_params
    banned: list[int] = []
    if request.num_output_tokens < params.min_tokens:
        banned = list(params.stop_token_ids)
        if not params.ignore_eos:
            banned.extend(request.eos_token_ids)
    return SamplingRow(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        seed=params.seed,
        prompt_token_ids=request.prompt_token_ids,
        output_token_ids=request.output_token_ids,
        num_logprobs=params.logprobs,
        banned_token_ids=banned,
        logit_bias=params.logit_bias,
        allowed_token_ids=params.allowed_token_ids,
        constraint=request.constraint,
        num_pending_tokens=num_pending_tokens,
    )
