"""Structured outputs on the default model: every output matches its JSON schema, regex, choice or grammar,
sampled or greedy, beside unconstrained requests in the same batch; a bad spec fails its request alone."""

from __future__ import annotations

import json
import re

import pytest

from joule import LLM, SamplingParams, StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"enum": ["en", "fr", "de"]}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu", max_model_len=512, kv_cache_memory_bytes=64 << 20)


def _check_person(text: str) -> None:
    person = json.loads(text)
    assert set(person) == {"name", "age", "languages"}
    assert isinstance(person["name"], str) and len(person["name"]) <= 16
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 120
    assert set(person["languages"]) <= {"en", "fr", "de"} and len(person["languages"]) <= 3


def test_json_schema_is_always_met_greedy_sampled_and_n(llm):
    constrained = StructuredOutputsParams(json=PERSON)
    prompts = ["Describe a person as JSON.", "Tell me a story.", "Who wrote Hamlet?"]
    params = [
        SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=constrained),
        SamplingParams(temperature=0.0, max_tokens=12),  # unconstrained, in the same batch
        SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=80, structured_outputs=StructuredOutputsParams(
            json=json.dumps(PERSON))),
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    _check_person(outputs[0].outputs[0].text)
    assert outputs[0].outputs[0].finish_reason == "stop"
    plain = llm.generate(prompts[1:2], params[1], use_tqdm=False)[0].outputs[0]
    assert outputs[1].outputs[0].token_ids == plain.token_ids, "a neighbour's grammar changes nothing of ours"
    assert len(outputs[2].outputs) == 3
    for completion in outputs[2].outputs:
        _check_person(completion.text)


def test_regex_choice_grammar_and_json_object(llm):
    cases = [
        (StructuredOutputsParams(regex=r"[A-Z]{2}-\d{3}"), lambda text: re.fullmatch(r"[A-Z]{2}-\d{3}", text)),
        (StructuredOutputsParams(choice=["positive", "negative", "neutral"]),
         lambda text: text in ("positive", "negative", "neutral")),
        (StructuredOutputsParams(grammar='root ::= "The answer is " [0-9] [0-9]? "."'),  # GBNF, as llama.cpp's
         lambda text: re.fullmatch(r"The answer is \d\d?\.", text)),
    ]
    prompts = ["A licence plate:", "Review: the food was great. Sentiment:", "What is 6 x 7?"]
    params = [SamplingParams(temperature=0.7, seed=index, max_tokens=60, structured_outputs=spec)
              for index, (spec, _) in enumerate(cases)]
    # Any JSON object has no length bound: greedy, on a prompt this model answers briefly.
    prompts.append("Give a JSON object describing a cat.")
    params.append(SamplingParams(temperature=0.0, max_tokens=60,
                                 structured_outputs=StructuredOutputsParams(json_object=True)))
    cases.append((params[-1].structured_outputs, lambda text: isinstance(json.loads(text), dict)))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for output, (spec, matches) in zip(outputs, cases):
        text = output.outputs[0].text
        assert output.outputs[0].finish_reason == "stop" and matches(text), f"{spec.kind}: {text!r}"


def test_invalid_specs_fail_their_request_only(llm):
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    bad_specs = [StructuredOutputsParams(regex="[a-"), StructuredOutputsParams(json="{not json"),
                 StructuredOutputsParams(json={"type": "no-such-type"}), StructuredOutputsParams(grammar="root ::= (")]
    params = [SamplingParams(max_tokens=8, structured_outputs=spec) for spec in bad_specs]
    params.append(SamplingParams(temperature=0.0, max_tokens=8))
    outputs = llm.generate(["Hi"] * len(params), params, use_tqdm=False)
    for output, spec in zip(outputs, bad_specs):
        assert output.error is not None and str(output.error).startswith(f"structured_outputs {spec.kind}")
    assert outputs[-1].error is None and len(outputs[-1].outputs[0].token_ids) == 8
    engine = llm.llm_engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_grammar_that_ends_before_min_tokens_still_ends(llm):
    params = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4,
                            structured_outputs=StructuredOutputsParams(regex="[0-9]"))
    completion = llm.generate(["A digit:"], params, use_tqdm=False)[0].outputs[0]
    assert re.fullmatch(r"[0-9]", completion.text) and completion.finish_reason == "stop"
    assert len(completion.token_ids) == 5, "the digit, then EOS until min_tokens lets it stop"
