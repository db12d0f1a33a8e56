"""The prompt-token check: a fast path for plain in-range ints, the per-token loop naming anything else."""

import enum

import pytest

from joule.llm_engine import _check_token_ids


class Colour(enum.IntEnum):
    RED = 3


def test_plain_ints_in_range_pass_as_a_new_list():
    ids = (0, 5, 99)
    checked = _check_token_ids(ids, 100)
    assert checked == [0, 5, 99] and isinstance(checked, list)
    assert _check_token_ids([], 100) == []


def test_int_subclasses_pass_through_the_loop():
    assert _check_token_ids([1, Colour.RED], 100) == [1, 3]


@pytest.mark.parametrize(("token_ids", "message"), [
    ([1, True], "must contain integers, got True"),
    ([1, 2.0], "must contain integers, got 2.0"),
    ([1, "7"], "must contain integers"),
    ([1, -1], "contains -1, outside the vocabulary"),
    ([1, 100], "contains 100, outside the vocabulary"),
    ("123", "must be a list of integers, got str"),
])
def test_bad_token_ids_name_the_field_and_the_culprit(token_ids, message):
    with pytest.raises(ValueError, match="prompt_token_ids") as error:
        _check_token_ids(token_ids, 100)
    assert message in str(error.value)
