"""The default model (SmolLM2-135M-Instruct from its GGUF) end to end, against transformers in float32."""

from __future__ import annotations

import pytest
import torch

from joule import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Energy efficiency in data centres matters because " * 6,  # several 16-token blocks
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu", max_model_len=1024, kv_cache_memory_bytes=256 << 20,
               max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def reference_model(llm):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(llm.llm_engine.model_path), dtype=torch.float32).eval()


def _transformers_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return output[0, len(prompt_ids):].tolist()


def test_greedy_tokens_match_transformers(llm, reference_model):
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        prompt_ids = tokenizer.encode(prompt)
        assert output.prompt_token_ids == prompt_ids
        assert output.outputs[0].token_ids == _transformers_greedy(reference_model, prompt_ids, NEW_TOKENS), prompt
        assert output.outputs[0].text == tokenizer.decode(output.outputs[0].token_ids, skip_special_tokens=True)
    again = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outputs]
    assert again[-1].num_cached_tokens >= 32


def test_chat_uses_the_model_template_and_stops_at_end_of_turn(llm, reference_model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    output = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    expected_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert output.prompt == expected_prompt
    assert output.prompt_token_ids == tokenizer.encode(expected_prompt, add_special_tokens=False)
    completion = output.outputs[0]
    assert completion.finish_reason == "stop" and "Paris" in completion.text
    reference = _transformers_greedy(reference_model, output.prompt_token_ids, len(completion.token_ids))
    assert completion.token_ids == reference


def test_chat_takes_a_template_tools_and_a_final_message_to_continue(llm):
    template = ("{% for tool in tools or [] %}[tool {{ tool.function.name }}]{% endfor %}"
                "{% for message in messages %}<{{ message.role }}>{{ message.content }}{% endfor %}")
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I am"}]
    params = SamplingParams(temperature=0.0, max_tokens=2)
    output = llm.chat(messages, params, use_tqdm=False, chat_template=template, tools=tools,
                      continue_final_message=True)[0]
    assert output.prompt == "[tool get_time]<user>Hi<assistant>Hello, I am"


def test_stop_strings_cut_the_text(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = llm.generate(["The capital of France is"], params, use_tqdm=False)[0].outputs[0].text
    stop = full[3:7]
    cut = llm.generate(["The capital of France is"], params.clone(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate(["The capital of France is"], params.clone(stop=stop, include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full[: full.index(stop) + len(stop)]
