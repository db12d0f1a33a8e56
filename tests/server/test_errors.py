"""Every error the issue names, in OpenAI's shape, with the right status and never a stack trace."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from server.live_server import start_server


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body["error"]


def _post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(server.base_url + path, timeout=30.0, **kwargs)


def test_malformed_json_is_400(live_server):
    response = _post(live_server, "/v1/completions", content=b'{"prompt": "hi", ',
                     headers={"Content-Type": "application/json"})
    assert "JSON" in _error(response, 400)["message"]


@pytest.mark.parametrize("field, value", [("temperature", "hot"), ("max_tokens", "many"), ("n", [1]),
                                          ("prompt", {"text": "hi"}), ("stop", 5)])
def test_wrong_type_is_400_naming_the_field(live_server, field, value):
    body = {"model": "tiny", "prompt": "hi", field: value}
    error = _error(_post(live_server, "/v1/completions", json=body), 400)
    assert error["param"] is not None and error["param"].startswith(field)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 1.5), ("n", 0), ("max_tokens", 0),
                                          ("presence_penalty", 3.0), ("top_k", -5), ("logprobs", 21),
                                          ("repetition_penalty", 0.0), ("min_p", 2.0)])
def test_invalid_value_is_400_naming_the_field(live_server, field, value):
    error = _error(_post(live_server, "/v1/completions", json={"prompt": "hi", field: value}), 400)
    assert field in error["message"]
    assert error["param"] == field


def test_invalid_prompts_are_400(live_server):
    assert "empty" in _error(_post(live_server, "/v1/completions", json={"prompt": ""}), 400)["message"]
    assert "49152" in _error(_post(live_server, "/v1/completions", json={"prompt": [5, 10**6]}), 400)["message"]
    _error(_post(live_server, "/v1/completions", json={"max_tokens": 3}), 400)  # no prompt
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    _error(_post(live_server, "/v1/chat/completions", json=image), 400)
    _error(_post(live_server, "/v1/chat/completions", json={"messages": []}), 400)
    _error(_post(live_server, "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    no_logprobs = {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}
    assert _error(_post(live_server, "/v1/chat/completions", json=no_logprobs), 400)["param"] == "top_logprobs"


def test_prompt_plus_max_tokens_over_context_names_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="one two three", max_tokens=600)
    message = caught.value.body["message"]
    assert "512" in message and "600" in message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=1000)
    assert "512" in caught.value.body["message"] and "1000" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=[7] * 600, max_tokens=1)
    assert "512" in caught.value.body["message"] and "600" in caught.value.body["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])


def test_unknown_route_is_404_in_openai_shape(live_server):
    _error(httpx.get(live_server.base_url + "/v1/nothing-here"), 404)


@pytest.fixture(scope="module")
def guarded_server(tiny_model_dir, tmp_path_factory):
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("guarded-logs"), "--api-key", "sesame",
                          "--max-queue", "1", "--max-num-seqs", "1", "--max-tokens-cap", "200")
    yield server
    server.stop()


def test_api_key_is_required(guarded_server):
    url = guarded_server.base_url
    body = {"prompt": "hi", "max_tokens": 2}
    assert "missing" in _error(httpx.post(url + "/v1/completions", json=body), 401)["message"]
    _error(httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    _error(httpx.get(url + "/v1/models"), 401)
    assert httpx.get(url + "/health").status_code == 200
    good = openai.OpenAI(base_url=guarded_server.api_url, api_key="sesame", max_retries=0)
    assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded_server.api_url, api_key="nope", max_retries=0).models.list()


def test_full_queue_is_429_with_retry_after(guarded_server):
    async def fire() -> list[httpx.Response]:
        headers = {"Authorization": "Bearer sesame"}
        body = {"prompt": "queue", "max_tokens": 120, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=guarded_server.base_url, headers=headers, timeout=60.0) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(6)))

    responses = asyncio.run(fire())
    statuses = sorted(response.status_code for response in responses)
    assert 200 in statuses and 429 in statuses, statuses
    rejected = next(response for response in responses if response.status_code == 429)
    assert int(rejected.headers["Retry-After"]) >= 1
    assert "max_queue=1" in _error(rejected, 429)["message"]
    assert _error(rejected, 429)["code"] == "queue_full"
    metrics = httpx.get(guarded_server.base_url + "/metrics").text
    line = 'joule_requests_rejected_total{model_name="tiny",reason="queue_full"}'
    assert f"{line} {float(statuses.count(429))}" in metrics


def test_max_tokens_cap_flag_reaches_the_server(guarded_server):
    headers = {"Authorization": "Bearer sesame"}
    response = httpx.post(guarded_server.api_url + "/completions", headers=headers, timeout=30.0,
                          json={"prompt": "hi", "max_tokens": 201})
    error = _error(response, 400)
    assert error["param"] == "max_tokens" and "cap of 200" in error["message"]


@pytest.mark.parametrize("path, extra", [
    ("/v1/completions", {"suffix": "end"}),
    ("/v1/completions", {"best_of": 3}),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True}}),
])
def test_unsupported_features_are_400_not_silently_ignored(live_server, path, extra):
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    error = _error(_post(live_server, path, json={**body, **extra}), 400)
    assert error["param"] == next(iter(extra))


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),  # nothing to return without echo
    ("/v1/completions", {"logit_bias": {"abc": 5}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {"logit_bias": {"99999999": 1}}, "logit_bias"),
    ("/v1/completions", {"allowed_token_ids": [99999999]}, "allowed_token_ids"),
    ("/v1/completions", {"allowed_token_ids": []}, "allowed_token_ids"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema",
                                                  "json_schema": {"schema": {"type": "nonsense"}}}}, "response_format"),
    ("/v1/completions", {"guided_regex": "[a-"}, "guided_regex"),
    ("/v1/completions", {"guided_choice": []}, "guided_choice"),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs"),
    ("/v1/completions", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
])
def test_prompt_logprobs_echo_and_logit_bias_misuse_is_400(live_server, path, extra, param):
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    error = _error(_post(live_server, path, json={**body, **extra}), 400)
    assert error["param"] == param
