"""Scoring prompts through the API, as evaluation harnesses do: completions' ``echo`` with ``logprobs`` (and
``max_tokens: 0``), and vLLM's ``prompt_logprobs`` on completions and chat, checked against transformers; and
``logit_bias``, which classification-style callers pair with them."""

from __future__ import annotations

import httpx
import pytest
import torch

PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """transformers' log-softmax after each prompt token, and the prompt's token ids (the server's tokenizer)."""
    import transformers

    from joule.tokenizer import Tokenizer

    prompt_ids = Tokenizer.from_pretrained(tiny_model_dir).encode(PROMPT)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0]
    return prompt_ids, torch.log_softmax(logits.float(), dim=-1)


def _post(live_server, path: str, body: dict) -> dict:
    response = httpx.post(live_server.api_url + path, json={"model": "tiny", **body}, timeout=60.0)
    assert response.status_code == 200, response.text
    return response.json()


def test_echo_without_generation_scores_the_prompt(live_server, reference):
    prompt_ids, expected = reference
    result = _post(live_server, "/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 2})
    choice = result["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 0 and result["usage"]["prompt_tokens"] == len(prompt_ids)
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt_ids) and "".join(logprobs["tokens"]) == PROMPT
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["text_offset"][0] == 0
    for position in range(1, len(prompt_ids)):
        row = expected[position - 1]
        assert logprobs["token_logprobs"][position] == pytest.approx(row[prompt_ids[position]].item(), abs=1e-3)
        top = logprobs["top_logprobs"][position]
        assert 2 <= len(top) <= 3 and max(top.values()) == pytest.approx(row.max().item(), abs=1e-3)
        token = logprobs["tokens"][position]
        assert logprobs["text_offset"][position] == len("".join(logprobs["tokens"][:position]))
        assert top[token] == pytest.approx(logprobs["token_logprobs"][position])


def test_echo_with_generation_puts_the_prompt_ahead(live_server, reference):
    prompt_ids, _ = reference
    body = {"prompt": PROMPT, "max_tokens": 5, "echo": True, "logprobs": 1, "temperature": 0.0}
    echoed = _post(live_server, "/completions", body)["choices"][0]
    plain = _post(live_server, "/completions", {**body, "echo": False})["choices"][0]
    assert echoed["text"] == PROMPT + plain["text"]
    logprobs = echoed["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt_ids) + 5
    assert logprobs["token_logprobs"][len(prompt_ids):] == pytest.approx(plain["logprobs"]["token_logprobs"])
    assert logprobs["text_offset"][len(prompt_ids)] == len(PROMPT)

    with httpx.stream("POST", live_server.api_url + "/completions", timeout=60.0,
                      json={"model": "tiny", **body, "stream": True}) as response:
        chunks = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: {")]
    import json

    streamed = [json.loads(chunk)["choices"][0] for chunk in chunks]
    assert "".join(choice["text"] for choice in streamed) == echoed["text"]
    assert sum(len(choice["logprobs"]["tokens"]) for choice in streamed) == len(prompt_ids) + 5


def test_echo_of_token_id_prompts_decodes_them(live_server, reference):
    prompt_ids, _ = reference
    result = _post(live_server, "/completions", {"prompt": [prompt_ids, prompt_ids[:4]], "max_tokens": 0,
                                                 "echo": True})
    assert [choice["text"] for choice in result["choices"]][0] == PROMPT
    assert len(result["choices"]) == 2 and PROMPT.startswith(result["choices"][1]["text"])


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_prompt_logprobs_field_in_vllm_shape(live_server, reference, path):
    prompt_ids, expected = reference
    if path == "/completions":
        body = {"prompt": PROMPT}
    else:
        body = {"messages": [{"role": "user", "content": "Hello there"}]}
    result = _post(live_server, path, {**body, "max_tokens": 2, "prompt_logprobs": 1})
    prompt_logprobs = result["choices"][0]["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == result["usage"]["prompt_tokens"]
    for entry in prompt_logprobs[1:]:
        assert 1 <= len(entry) <= 2 and any(item["rank"] == 1 for item in entry.values())
        assert all(item["logprob"] <= 0.0 and item["decoded_token"] is not None for item in entry.values())
    if path == "/completions":
        for position in range(1, len(prompt_ids)):
            token_id = prompt_ids[position]
            item = prompt_logprobs[position][str(token_id)]
            assert item["logprob"] == pytest.approx(expected[position - 1][token_id].item(), abs=1e-3)
    plain = _post(live_server, path, {**body, "max_tokens": 2})
    assert "prompt_logprobs" not in plain["choices"][0], "absent unless asked for"


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_logit_bias_forces_and_forbids_tokens(live_server, reference, tiny_model_dir, path):
    from joule.tokenizer import Tokenizer

    prompt_ids, expected = reference
    body = {"prompt": PROMPT} if path == "/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    forced_id = prompt_ids[2]
    forced = _post(live_server, path, {**body, "max_tokens": 3, "temperature": 0.0,
                                       "logit_bias": {str(forced_id): 100}})
    choice = forced["choices"][0]
    text = choice["text"] if path == "/completions" else choice["message"]["content"]
    assert text == Tokenizer.from_pretrained(tiny_model_dir).decode([forced_id] * 3)
    assert forced["usage"]["completion_tokens"] == 3

    greedy_id = int(expected[-1].argmax())  # what the model says after the whole prompt
    plain = _post(live_server, "/completions", {"prompt": PROMPT, "max_tokens": 1, "temperature": 0.0})
    avoided = _post(live_server, "/completions", {"prompt": PROMPT, "max_tokens": 1, "temperature": 0.0,
                                                  "logit_bias": {str(greedy_id): -100}})
    assert plain["choices"][0]["text"] == Tokenizer.from_pretrained(tiny_model_dir).decode([greedy_id])
    assert avoided["choices"][0]["text"] != plain["choices"][0]["text"]


def test_truncate_prompt_tokens_keeps_the_prompts_end(live_server, reference, tiny_model_dir):
    prompt_ids, _ = reference
    result = _post(live_server, "/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True,
                                                 "truncate_prompt_tokens": 4})
    assert result["usage"]["prompt_tokens"] == 4
    from joule.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    assert result["choices"][0]["text"] == tokenizer.decode(prompt_ids[-4:]), "echo shows what the model read"
    chat = _post(live_server, "/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1,
                                                    "truncate_prompt_tokens": 5})
    assert chat["usage"]["prompt_tokens"] == 5
