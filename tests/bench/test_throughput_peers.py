"""`joule bench throughput --compare hf hf-batch`: both transformers peers on the same prompts, a ratio for each.

Slow: transformers' generate_batch sizes its paged cache from the free memory and takes ~7 s a call on the CPU."""

from __future__ import annotations

import json

import pytest

from joule.cli import main

pytest.importorskip("transformers")


@pytest.fixture
def config_only_model(tmp_path):
    from transformers import LlamaConfig

    directory = tmp_path / "tiny-llama"
    LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256).save_pretrained(directory)
    return directory


def tiny_engine(model) -> list[str]:
    return ["--model", str(model), "--load-format", "dummy", "--dtype", "float32",
            "--kv-cache-memory-bytes", str(8 << 20), "--max-model-len", "128"]


@pytest.mark.slow
def test_both_peers_run_after_joule_with_a_ratio_each(config_only_model, tmp_path, capsys):
    output = tmp_path / "result.json"
    assert main(["bench", "throughput", *tiny_engine(config_only_model), "--num-prompts", "4", "--input-len", "12",
                 "--output-len", "5", "--compare", "hf", "hf-batch", "--hf-batch-size", "2",
                 "--output-json", str(output)]) == 0
    saved = json.loads(output.read_text())
    engines = [result["engine"] for result in saved["results"]]
    assert engines[:2] == ["joule", "transformers generate"]
    assert engines[2].startswith("transformers generate_batch (")
    assert [result["output_tokens"] for result in saved["results"]] == [20, 20, 20]
    assert saved["results"][1]["batch_size"] == 2
    ratios = saved["info"]["ratios"]
    assert list(ratios) == engines[1:]
    for result in saved["results"][1:]:
        assert ratios[result["engine"]] == pytest.approx(saved["results"][0]["output_tok_per_s"]
                                                         / result["output_tok_per_s"])
    assert saved["info"]["ratio"] == ratios["transformers generate"]
    printed = capsys.readouterr().out
    assert "Joule / transformers generate: " in printed and "Joule / transformers generate_batch (" in printed


@pytest.mark.slow
def test_alternated_rounds_keep_each_peers_best_run_over_prompts_of_any_length(config_only_model, tmp_path):
    output = tmp_path / "result.json"
    assert main(["bench", "throughput", *tiny_engine(config_only_model), "--num-prompts", "3",
                 "--input-len", "uniform:4:20", "--output-len", "4", "--compare", "hf-batch", "--repeat", "2",
                 "--output-json", str(output)]) == 0
    results = json.loads(output.read_text())["results"]
    assert len(results) == 2 and results[1]["engine"].startswith("transformers generate_batch (")
    for result in results:
        assert result["output_tokens"] == 12
        assert len(result["all_output_tok_per_s"]) == 2
        assert result["output_tok_per_s"] == max(result["all_output_tok_per_s"])


def test_generate_batch_needs_one_output_length(config_only_model, capsys):
    assert main(["bench", "throughput", *tiny_engine(config_only_model), "--output-len", "uniform:2:6",
                 "--compare", "hf-batch"]) == 2
    assert "--compare hf-batch needs a fixed --output-len" in capsys.readouterr().err


def test_an_unknown_peer_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--compare", "vllm"])
    assert "invalid choice: 'vllm'" in capsys.readouterr().err
