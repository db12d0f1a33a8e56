"""The `joule` command line on the default model: generate, chat, info, bench throughput."""

from __future__ import annotations

import builtins
import json
import re

import pytest

from joule.cli import main

pytestmark = pytest.mark.slow

SMALL_ENGINE = ["--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "512"]


def test_generate_prints_outputs_and_throughput(capsys):
    assert main(["generate", *SMALL_ENGINE, "--prompt", "The capital of France is", "--max-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "### Output (8 tokens" in printed
    assert "tok/s" in printed


def test_generate_reads_a_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\n\nOne two three\n", encoding="utf-8")
    assert main(["generate", *SMALL_ENGINE, "--prompts-file", str(prompts), "--max-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("### Prompt:") == 2


def test_info_reports_architecture_and_kv_capacity(capsys):
    assert main(["info", *SMALL_ENGINE]) == 0
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM" in printed
    assert "134,515,008" in printed  # SmolLM2-135M parameters
    assert "KV cache capacity" in printed and "tokens" in printed


def test_chat_streams_and_keeps_history(monkeypatch, capsys):
    replies = iter(["What is the capital of France?", "And of Italy?", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(replies))
    assert main(["chat", *SMALL_ENGINE, "--max-tokens", "24"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("assistant> ") == 2
    assert "Paris" in printed


def test_bad_engine_option_is_a_clear_error(capsys):
    assert main(["info", "--model", "/no/such/model/dir"]) == 2
    assert "/no/such/model/dir" in capsys.readouterr().err


def test_bench_throughput_writes_json(tmp_path, capsys):
    output = tmp_path / "result.json"
    assert main(["bench", "throughput", *SMALL_ENGINE, "--num-prompts", "4", "--input-len", "16",
                 "--output-len", "4", "--output-json", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["results"][0]["output_tokens"] == 16
    assert "output tok/s" in capsys.readouterr().out


def test_generate_with_a_gbnf_grammar_file_and_a_json_schema(tmp_path, capsys):
    grammar = tmp_path / "answer.gbnf"
    grammar.write_text('root ::= "Answer: " ("yes" | "no")\n')
    assert main(["generate", *SMALL_ENGINE, "--prompt", "Is water wet?", "--max-tokens", "8",
                 "--grammar-file", str(grammar)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"finish: stop\):\nAnswer: (yes|no)\n", printed), printed
    schema = '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}'
    assert main(["generate", *SMALL_ENGINE, "--prompt", "Status?", "--max-tokens", "12", "--json-schema", schema]) == 0
    printed = capsys.readouterr().out
    assert re.search(r'finish: stop\):\n\{"ok": (true|false)\}\n', printed), printed
    assert main(["generate", *SMALL_ENGINE, "--prompt", "x", "--regex", "[a-"]) == 0
    assert "error: structured_outputs regex is invalid" in capsys.readouterr().out
