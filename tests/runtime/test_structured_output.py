"""Grammar masks on the default model's tokenizer: exactly the tokens a grammar allows, advanced per token."""

from __future__ import annotations

import math

import pytest
import torch

from joule.runtime.sampler import Sampler, SamplingRow, apply_bans_and_penalties
from joule.runtime.structured_output import GrammarCompiler, apply_token_masks
from joule.sampling_params import StructuredOutputsParams

EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    from joule.model.loader import resolve_model_path
    from joule.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(resolve_model_path(None))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer.backend.to_str(), tokenizer.vocab_size, [EOS])


def _allowed(constraint, vocab_size: int) -> set[int]:
    logits = torch.zeros(1, vocab_size)
    apply_token_masks(logits, [constraint])
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_digit_regex_allows_exactly_the_single_digit_tokens_then_only_eos(compiler, tokenizer):
    constraint = compiler.constraint(StructuredOutputsParams(regex="[0-9]"))
    digits = {tokenizer.convert_tokens_to_ids(str(digit)) for digit in range(10)}
    assert _allowed(constraint, tokenizer.vocab_size) == digits
    constraint.accept(tokenizer.convert_tokens_to_ids("7"))
    assert _allowed(constraint, tokenizer.vocab_size) == {EOS}
    constraint.accept(EOS)
    assert not constraint.matcher.is_error()


def test_choice_allows_the_first_tokens_of_each_choice(compiler, tokenizer):
    constraint = compiler.constraint(StructuredOutputsParams(choice=["yes", "no"]))
    allowed = _allowed(constraint, tokenizer.vocab_size)
    texts = {tokenizer.decode([token]) for token in allowed}
    assert texts and all("yes".startswith(text) or "no".startswith(text) for text in texts)
    assert tokenizer.encode("yes", add_special_tokens=False)[0] in allowed


def test_masks_apply_per_row_and_win_over_logit_bias(compiler, tokenizer):
    vocab_size = tokenizer.vocab_size
    logits = torch.randn(2, vocab_size, generator=torch.Generator().manual_seed(0))
    constraint = compiler.constraint(StructuredOutputsParams(regex="[0-9]"))
    letter = tokenizer.convert_tokens_to_ids("a")
    rows = [SamplingRow(temperature=0.0, logit_bias={letter: 100.0}, constraint=constraint),
            SamplingRow(temperature=0.0, logit_bias={letter: 100.0})]
    processed = apply_bans_and_penalties(logits, rows)
    assert processed[0, letter] == -math.inf and processed[1, letter] == logits[1, letter] + 100.0
    assert torch.equal(processed[1] - logits[1], torch.where(torch.arange(vocab_size) == letter, 100.0, 0.0))
    tokens = Sampler().sample(logits, rows).token_ids
    assert tokenizer.decode([tokens[0]]).isdigit() and tokens[1] == letter


@pytest.mark.parametrize("spec, message", [
    (StructuredOutputsParams(regex="[a-"), "structured_outputs regex is invalid"),
    (StructuredOutputsParams(json="{not json"), "structured_outputs json is invalid"),
    (StructuredOutputsParams(grammar="root ::= ("), "structured_outputs grammar is invalid"),
])
def test_invalid_grammars_are_value_errors_naming_the_field(compiler, spec, message):
    with pytest.raises(ValueError, match=message):
        compiler.constraint(spec)


def test_the_grammar_wins_where_bans_leave_no_token(compiler, tokenizer):
    constraint = compiler.constraint(StructuredOutputsParams(regex="[0-9]"))
    constraint.accept(tokenizer.convert_tokens_to_ids("7"))  # now only EOS may come, and min_tokens bans it
    logits = torch.randn(2, tokenizer.vocab_size, generator=torch.Generator().manual_seed(1))
    rows = [SamplingRow(temperature=0.0, banned_token_ids=[EOS], constraint=constraint),
            SamplingRow(temperature=0.0, banned_token_ids=[EOS])]
    processed = apply_bans_and_penalties(logits, rows)
    assert torch.isfinite(processed[0]).nonzero().flatten().tolist() == [EOS]
    assert processed[1, EOS] == -math.inf, "a row without a grammar keeps its bans"
    assert Sampler().sample(logits, rows).token_ids[0] == EOS
