"""The transformers generate_batch peer runs on a config-only (dummy-weight) model and counts its tokens."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from joule.bench import hf_continuous  # noqa: E402
from joule.bench.hf_continuous import load_transformers_model, run_transformers_generate_batch  # noqa: E402
from joule.bench.workload import fixed_length_workload  # noqa: E402


@pytest.fixture
def config_only_model(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=128).save_pretrained(tmp_path)
    return tmp_path


def test_config_only_directory_builds_random_weights(config_only_model):
    model = load_transformers_model(config_only_model, torch.float32, torch.device("cpu"))
    assert model.config.hidden_size == 32
    assert model.model.embed_tokens.weight.abs().sum() > 0


@pytest.mark.slow
def test_generate_batch_produces_every_requested_token(config_only_model):
    requests = fixed_length_workload(3, 12, 5, 500, seed=0)
    result = run_transformers_generate_batch(config_only_model, requests, torch.float32, torch.device("cpu"))
    assert result["requests"] == 3 and result["failed_requests"] == 0
    assert result["output_tokens"] == 15  # EOS is off: every request generates all 5 tokens
    assert result["output_tok_per_s"] > 0


@pytest.mark.slow
def test_generate_batch_repeats_report_the_median_run(config_only_model):
    requests = fixed_length_workload(2, 8, 3, 500, seed=4)
    result = run_transformers_generate_batch(config_only_model, requests, torch.float32, torch.device("cpu"),
                                             repeats=3)
    runs = result["runs_tok_per_s"]
    assert len(runs) == 3 and result["output_tokens"] == 6
    assert result["output_tok_per_s"] == sorted(runs)[1]
    with pytest.raises(ValueError, match="repeats"):
        run_transformers_generate_batch(config_only_model, requests, torch.float32, torch.device("cpu"), repeats=0)


def test_generate_batch_needs_one_output_length(config_only_model):
    requests = fixed_length_workload(2, 8, 4, 500, seed=0) + fixed_length_workload(1, 8, 6, 500, seed=1)
    with pytest.raises(ValueError, match="one output length"):
        run_transformers_generate_batch(config_only_model, requests, torch.float32, torch.device("cpu"))


def test_transformers_generate_peer_counts_fixed_batches(config_only_model):
    from joule.bench.hf_baseline import run_transformers_generate

    requests = fixed_length_workload(5, 10, 4, 500, seed=2)
    result = run_transformers_generate(config_only_model, requests, torch.float32, torch.device("cpu"), batch_size=2)
    assert result["output_tokens"] == 20 and result["batch_size"] == 2


def test_the_paged_prefix_loads_without_its_deprecation_warning(config_only_model):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, attention = hf_continuous.load_paged_model(config_only_model, torch.float32, torch.device("cpu"))
    assert attention == "paged|sdpa" and model.config.hidden_size == 32
    assert not [warning for warning in caught if "paged|" in str(warning.message)]


def test_a_transformers_without_the_paged_prefix_gets_the_plain_name(config_only_model, monkeypatch):
    original, asked = hf_continuous.load_transformers_model, []

    def refusing_the_prefix(model_path, dtype, device, attn_implementation=None):
        asked.append(attn_implementation)
        if attn_implementation and attn_implementation.startswith("paged|"):
            raise ValueError(f"Specified `attn_implementation={attn_implementation}` is not supported")
        return original(model_path, dtype, device, attn_implementation)

    monkeypatch.setattr(hf_continuous, "load_transformers_model", refusing_the_prefix)
    requests = fixed_length_workload(2, 8, 3, 500, seed=3)
    result = run_transformers_generate_batch(config_only_model, requests, torch.float32, torch.device("cpu"))
    assert asked == ["paged|sdpa", "sdpa"]
    assert result["engine"] == "transformers generate_batch (sdpa)" and result["output_tokens"] == 6
