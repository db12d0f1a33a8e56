"""Where a request's next token is sampled: on the device by a bare argmax, on the device with its parameters
(temperature, top-k/p, min-p, seeds), or on the host's sampler (logprobs, penalties, bans, grammars), and the
host sampler's row for it. The executor asks this of every row of every step, so the checks are kept to
attribute reads."""

from __future__ import annotations

from joule.engine.request import Request
from joule.runtime.sampler import SamplingRow


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
    ``min_tokens``. Asked of every row of every step: a params object is tested once per run of requests that
    share it (one ``generate`` call's do), the rest is two attribute reads a row."""
    passed = None
    for request in requests:
        params = request.sampling_params
        if params is not passed:
            if not params_pass(params):
                return False
            passed = params
        if request.constraint is not None or len(request.output_token_ids) < params.min_tokens:
            return False
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
