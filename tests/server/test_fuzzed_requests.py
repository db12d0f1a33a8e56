"""Random request bodies against the live server: every one gets an answer (a completion, or an error in OpenAI's
shape naming what was wrong), never a 500 or a stack trace, and the server keeps serving afterwards."""

from __future__ import annotations

import json
import math

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.sampled_from([math.nan, math.inf, -math.inf]),
    st.floats(-5, 5), st.text(max_size=6), st.lists(st.integers(-3, 60000), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
# Fields a client may send, each with values that are mostly in range (so some bodies are valid and generate)
# and sometimes anything at all.
SMALL_COUNT = st.one_of(st.integers(-2, 6), ODD_VALUES)
FIELDS = {
    "max_tokens": SMALL_COUNT, "min_tokens": SMALL_COUNT, "n": st.one_of(st.integers(-1, 3), ODD_VALUES),
    "temperature": st.one_of(st.floats(-1, 3), ODD_VALUES), "top_p": st.one_of(st.floats(-0.5, 1.5), ODD_VALUES),
    "top_k": SMALL_COUNT, "min_p": st.one_of(st.floats(-0.5, 1.5), ODD_VALUES), "seed": ODD_VALUES,
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=3), max_size=5), ODD_VALUES),
    "presence_penalty": st.one_of(st.floats(-3, 3), ODD_VALUES), "frequency_penalty": ODD_VALUES,
    "repetition_penalty": st.one_of(st.floats(-1, 3), ODD_VALUES), "ignore_eos": ODD_VALUES,
    "stream": st.one_of(st.booleans(), ODD_VALUES), "user": ODD_VALUES, "priority": ODD_VALUES,
    "ttft_slo_ms": ODD_VALUES, "tpot_slo_ms": ODD_VALUES, "logit_bias": ODD_VALUES,
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), ODD_VALUES),
}
PROMPTS = st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 60000), max_size=12),
                    st.lists(st.text(max_size=8), max_size=3), ODD_VALUES)
MESSAGES = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]),
                                    "content": st.one_of(st.text(max_size=20), ODD_VALUES)}), max_size=3),
    ODD_VALUES,
)


@st.composite
def request_bodies(draw) -> tuple[str, dict]:
    chat = draw(st.booleans())
    body = {"messages": draw(MESSAGES)} if chat else {"prompt": draw(PROMPTS)}
    if draw(st.booleans()):
        body["model"] = draw(st.sampled_from(["tiny", "other"]))
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=5, unique=True)):
        body[name] = draw(FIELDS[name])
    if chat and draw(st.booleans()):
        body["logprobs"], body["top_logprobs"] = draw(ODD_VALUES), draw(SMALL_COUNT)
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def _check_error(response: httpx.Response) -> None:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=request_bodies())
def test_any_request_body_gets_an_answer_and_never_a_server_error(live_server, request):
    path, body = request
    # JSON has no NaN or infinity: sent as Python's json writes them, which strict parsers refuse (a 400 too).
    content = json.dumps(body, allow_nan=True).encode()
    with httpx.stream("POST", live_server.base_url + path, content=content, timeout=60.0,
                      headers={"Content-Type": "application/json"}) as response:
        text = response.read().decode(errors="replace")
    assert response.status_code < 500, (body, text)
    assert "Traceback" not in text and 'File "' not in text
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            assert text.rstrip().endswith("data: [DONE]"), text[-200:]
        else:
            assert response.json()["choices"]
    else:
        assert response.status_code in (400, 404, 422), (response.status_code, text)
        _check_error(response)


def test_the_server_still_serves_after_the_fuzzing(live_server):
    reply = httpx.post(live_server.base_url + "/v1/completions", timeout=60.0,
                       json={"model": "tiny", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
