"""SamplingParams: vLLM's defaults, validation that names the bad field, greedy normalisation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from joule.sampling_params import RequestOutputKind, SamplingParams

INVALID_VALUES = [
    ("temperature", -0.5),
    ("temperature", "hot"),
    ("temperature", None),
    ("temperature", True),
    ("temperature", math.nan),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("top_k", -2),
    ("top_k", 1.5),
    ("min_p", 2.0),
    ("min_p", -0.1),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 2.5),
    ("n", 0),
    ("n", True),
    ("stop", 5),
    ("stop", [1]),
    ("stop", ["ok", None]),
    ("stop_token_ids", ["a"]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", "7"),
    ("logprobs", -1),
    ("presence_penalty", 3.0),
    ("presence_penalty", -2.5),
    ("frequency_penalty", 2.01),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("min_tokens", -1),
    ("seed", "42"),
    ("output_kind", "sometimes"),
]


@pytest.mark.parametrize(("field_name", "value"), INVALID_VALUES, ids=[f"{f}={v!r}" for f, v in INVALID_VALUES])
def test_invalid_value_raises_value_error_naming_the_field(field_name, value):
    with pytest.raises(ValueError, match=field_name):
        SamplingParams(**{field_name: value})


def test_min_tokens_above_max_tokens_names_both_fields():
    with pytest.raises(ValueError, match="min_tokens") as error:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert "max_tokens" in str(error.value)
    # Without a max_tokens cap any min_tokens is allowed.
    assert SamplingParams(max_tokens=None, min_tokens=100).min_tokens == 100


def test_defaults_match_vllm():
    params = SamplingParams()
    assert params.max_tokens == 16
    assert params.temperature == 1.0
    assert params.n == 1
    assert (params.top_p, params.top_k, params.min_p) == (1.0, 0, 0.0)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert params.min_tokens == 0 and params.logprobs is None and params.seed is None
    assert params.stop == [] and params.stop_token_ids == []
    assert params.ignore_eos is False and params.skip_special_tokens is True
    assert params.output_kind is RequestOutputKind.CUMULATIVE
    assert not params.is_greedy


def test_boundary_values_are_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, logprobs=0, max_tokens=1)
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1e-3, top_p=1e-9)
    SamplingParams(top_k=1, min_p=0.0, n=5, seed=0, min_tokens=16)


@settings(max_examples=50, deadline=None)
@given(
    temperature=st.floats(0.0, 1e-5, exclude_max=True),
    top_p=st.floats(0.01, 1.0),
    top_k=st.integers(-1, 100),
    min_p=st.floats(0.0, 1.0),
)
def test_greedy_ignores_and_resets_the_filters(temperature, top_p, top_k, min_p):
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
    assert params.is_greedy
    assert (params.top_p, params.top_k, params.min_p) == (1.0, 0, 0.0)


def test_sampling_keeps_its_filters():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05)
    assert not params.is_greedy
    assert (params.top_p, params.top_k, params.min_p) == (0.9, 40, 0.05)


def test_stop_and_stop_token_ids_are_normalised_to_lists():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop="").stop == []
    assert SamplingParams(stop=("a", "", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=7).stop_token_ids == [7]
    assert SamplingParams(stop_token_ids=(1, 2)).stop_token_ids == [1, 2]
    assert SamplingParams(stop=["x"]).stop_strings == ["x"]
    assert SamplingParams(output_kind="delta").output_kind is RequestOutputKind.DELTA


def test_clone_copies_lists_and_revalidates():
    original = SamplingParams(stop=["a"], stop_token_ids=[3], extra_args={"k": 1})
    clone = original.clone(seed=7)
    assert clone.seed == 7 and clone.stop == ["a"] and clone.stop_token_ids == [3]
    clone.stop.append("b")
    clone.stop_token_ids.append(4)
    clone.extra_args["k"] = 2
    assert original.stop == ["a"] and original.stop_token_ids == [3] and original.extra_args == {"k": 1}
    with pytest.raises(ValueError, match="top_p"):
        original.clone(top_p=0)
