"""`joule bench throughput --repeat N` alternates the engines and keeps each one's best run."""

from __future__ import annotations

import json

import pytest

from joule.cli import main

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

SMALL_ENGINE = ["--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "512"]


def test_repeat_reports_every_run_and_the_best(tmp_path, capsys):
    output = tmp_path / "result.json"
    assert main(["bench", "throughput", *SMALL_ENGINE, "--num-prompts", "2", "--input-len", "8", "--output-len", "3",
                 "--compare", "hf", "--repeat", "2", "--output-json", str(output)]) == 0
    results = json.loads(output.read_text())["results"]
    assert [result["engine"] for result in results] == ["joule", "transformers generate"]
    for result in results:
        assert result["output_tokens"] == 6
        assert len(result["all_output_tok_per_s"]) == 2
        assert result["output_tok_per_s"] == max(result["all_output_tok_per_s"])
    assert "all 2 runs" in capsys.readouterr().out


def test_repeat_below_one_is_rejected(capsys):
    assert main(["bench", "throughput", *SMALL_ENGINE, "--repeat", "0"]) == 2
    assert "--repeat must be at least 1" in capsys.readouterr().err
