"""The server through the real `openai` client: completions, chat, streaming, n, stop, seeds, logprobs, usage."""

from __future__ import annotations

import httpx
import pytest


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [model.id for model in models.data] == ["tiny"]


def test_completion_counts_usage_and_respects_max_tokens(client):
    result = client.completions.create(model="tiny", prompt="Hello there", max_tokens=7, temperature=0.0,
                                       extra_body={"ignore_eos": True})
    assert result.object == "text_completion"
    choice = result.choices[0]
    assert choice.finish_reason == "length"
    assert isinstance(choice.text, str) and choice.text
    assert result.usage.completion_tokens == 7
    assert result.usage.prompt_tokens == len(client_tokenize(client, "Hello there"))
    assert result.usage.total_tokens == result.usage.prompt_tokens + 7


def test_usage_says_how_many_prompt_tokens_the_prefix_cache_served(client):
    """OpenAI's ``usage.prompt_tokens_details.cached_tokens``: 0 for a prompt never seen, whole cached blocks of
    it when the same prompt comes again (the last token is always computed), for completions and chat."""
    import random

    ids = [random.Random(11).randrange(5, 200) for _ in range(45)]
    greedy = dict(model="tiny", max_tokens=2, temperature=0.0, extra_body={"ignore_eos": True})
    first = client.completions.create(prompt=ids, **greedy).usage
    again = client.completions.create(prompt=ids, **greedy).usage
    assert first.prompt_tokens == again.prompt_tokens == 45
    assert first.prompt_tokens_details.cached_tokens == 0
    assert 0 < again.prompt_tokens_details.cached_tokens < 45
    message = [{"role": "user", "content": "tell me about the sea and the mountains and rivers " * 4}]
    client.chat.completions.create(messages=message, **greedy)
    chat = client.chat.completions.create(messages=message, **greedy).usage
    assert 0 < chat.prompt_tokens_details.cached_tokens < chat.prompt_tokens


def client_tokenize(client, text: str) -> list[int]:
    response = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"), json={"prompt": text})
    response.raise_for_status()
    return response.json()["tokens"]


def test_prompt_forms_batch_of_texts_and_token_ids(client):
    ids = client_tokenize(client, "The sky is")
    greedy = dict(model="tiny", max_tokens=5, temperature=0.0, extra_body={"ignore_eos": True})
    from_text = client.completions.create(prompt="The sky is", **greedy).choices[0].text
    from_ids = client.completions.create(prompt=ids, **greedy).choices[0].text
    assert from_ids == from_text
    batch = client.completions.create(prompt=[ids, ids], **greedy)
    assert [choice.index for choice in batch.choices] == [0, 1]
    assert [choice.text for choice in batch.choices] == [from_text, from_text]
    texts = client.completions.create(prompt=["The sky is", "Hello"], **greedy)
    assert texts.choices[0].text == from_text
    assert texts.usage.completion_tokens == 10


def test_streaming_completion_matches_non_streaming(client):
    args = dict(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0.0,
                extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].text
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_streaming_and_not_agree(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "more"}]}]
    args = dict(model="tiny", messages=messages, max_completion_tokens=10, temperature=0.0,
                extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_prompt_is_the_models_chat_template(client, live_server):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    tokens = httpx.post(live_server.base_url + "/tokenize", json={"messages": messages}).json()["tokens"]
    text = httpx.post(live_server.base_url + "/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    result = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert result.usage.prompt_tokens == len(tokens)


def test_n_two_gives_two_distinct_seeded_choices(client):
    args = dict(model="tiny", prompt="Pick a word:", max_tokens=8, n=2, temperature=1.0, seed=7,
                extra_body={"ignore_eos": True})
    first = client.completions.create(**args)
    assert sorted(choice.index for choice in first.choices) == [0, 1]
    assert first.choices[0].text != first.choices[1].text
    assert first.usage.completion_tokens == 16
    again = client.completions.create(**args)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    streamed = list(client.completions.create(stream=True, **args))
    by_index = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            by_index[choice.index] += choice.text
    assert [by_index[0], by_index[1]] == [c.text for c in first.choices]


def test_seeded_sampling_is_reproducible_and_seed_matters(client):
    args = dict(model="tiny", messages=[{"role": "user", "content": "Say something"}], max_tokens=12,
                temperature=1.0, top_p=0.9, extra_body={"ignore_eos": True, "top_k": 50})
    one = client.chat.completions.create(seed=123, **args).choices[0].message.content
    two = client.chat.completions.create(seed=123, **args).choices[0].message.content
    other = client.chat.completions.create(seed=124, **args).choices[0].message.content
    assert one == two
    assert other != one


def test_stop_string_ends_the_text_before_it(client):
    args = dict(model="tiny", prompt="Count:", max_tokens=20, temperature=0.0, extra_body={"ignore_eos": True})
    full = client.completions.create(**args).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), "the greedy text should have a non-blank middle"
    cut = client.completions.create(stop=[stop], **args).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]
    assert stop not in cut.text
    streamed = list(client.completions.create(stop=stop, stream=True, **args))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text


def test_completion_logprobs_shape(client):
    result = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, logprobs=3, temperature=0.0,
                                       extra_body={"ignore_eos": True})
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == result.choices[0].text
    assert logprobs.text_offset[0] == 0
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0.0
        assert 3 <= len(top) <= 4 and top[token] == pytest.approx(logprob)
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the most likely token


def test_chat_logprobs_shape(client):
    result = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=3, logprobs=True, top_logprobs=2, temperature=0.0,
                                            extra_body={"ignore_eos": True})
    content = result.choices[0].logprobs.content
    assert len(content) == 3
    assert "".join(item.token for item in content) == result.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        assert bytes(item.bytes).decode() == item.token
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_sampling_extras_are_accepted(client):
    result = client.completions.create(
        model="tiny", prompt="Go", max_tokens=6, presence_penalty=0.5, frequency_penalty=0.5, user="tester",
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 6, "priority": 1},
    )
    assert result.usage.completion_tokens == 6


def test_health_and_metrics_endpoints(live_server, client):
    assert httpx.get(live_server.base_url + "/health").status_code == 200
    assert httpx.get(live_server.base_url + "/version").json()["version"]
    client.completions.create(model="tiny", prompt="metrics", max_tokens=3, extra_body={"ignore_eos": True})
    text = httpx.get(live_server.base_url + "/metrics").text
    for name in ("joule:time_to_first_token_seconds_bucket", "joule:inter_token_latency_seconds_count",
                 "joule:e2e_request_latency_seconds_sum", "joule:request_queue_time_seconds_count",
                 "joule:num_requests_running", "joule:num_requests_waiting", "joule:kv_cache_usage_perc",
                 "joule:kv_cache_blocks_used", "joule:prompt_tokens_total", "joule:generation_tokens_total",
                 "joule:prefix_cache_queries_total", "joule:prefix_cache_hits_total", "joule:num_preemptions_total",
                 "joule:request_time_per_output_token_seconds_count", "joule:request_prefill_time_seconds_sum",
                 "joule:request_prompt_tokens_bucket", "joule:request_generation_tokens_count",
                 'joule:request_success_total{finished_reason="length",model_name="tiny"}'):
        assert name in text, name


def test_continuous_usage_stats_count_up_in_every_chunk(client):
    chunks = list(client.completions.create(
        model="tiny", prompt="Tick", max_tokens=6, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    ))
    counts = [chunk.usage.completion_tokens for chunk in chunks if chunk.choices]
    assert counts == sorted(counts) and counts[-1] == 6
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_long_prompts_tokenized_off_the_loop_give_the_same_answer(client):
    long_text = "-" * 9000  # over the off-loop threshold in characters, well under the context in tokens
    tokens = client_tokenize(client, long_text)
    assert len(tokens) < 512
    result = client.completions.create(model="tiny", prompt=long_text, max_tokens=2, temperature=0.0,
                                       extra_body={"ignore_eos": True})
    assert result.usage.prompt_tokens == len(tokens)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long_text}],
                                          max_tokens=2, temperature=0.0)
    assert chat.usage.prompt_tokens > len(tokens)
