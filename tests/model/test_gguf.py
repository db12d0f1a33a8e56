"""GGUF conversion: the bundled default model against transformers, caching, and synthetic files."""

from __future__ import annotations

import math
import os
import time

import gguf
import numpy as np
import pytest
import torch
import transformers

from joule.model.config import ModelConfig, ModelLoadError
from joule.model.default_model import default_gguf_path
from joule.model.gguf_loader import convert_gguf, undo_rope_permutation
from joule.model.loader import load_model, resolve_model_path
from joule.runtime.attention.base import AttentionMetadata, ForwardContext, KVCache
from joule.runtime.attention.portable import PortableAttentionBackend


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory):
    """The default model converted once into a private cache; yields (directory, seconds taken)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JOULE_CACHE_DIR", str(tmp_path_factory.mktemp("joule-cache")))
        started = time.perf_counter()
        directory = resolve_model_path(None)
        yield directory, time.perf_counter() - started


@pytest.fixture(scope="session")
def transformers_default_weights():
    """transformers' own dequantization of the bundled GGUF: (config, tensors by HF name)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_gguf_path()
    config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    return config, tensors


def prefill_logits(model, tokens):
    config = model.config
    count = len(tokens)
    cache = KVCache.allocate(config.num_hidden_layers, -(-count // 4), 4, config.num_key_value_heads,
                             config.head_dim, next(model.parameters()).dtype, "cpu")
    metadata = AttentionMetadata(
        query_start_locations=torch.tensor([0, count]), slot_mapping=torch.arange(count),
        block_tables=torch.arange(cache.num_blocks, dtype=torch.int32)[None], query_lengths=[count],
        context_lengths=[0], sequence_lengths=[count],
    )
    with torch.no_grad():
        hidden = model(torch.tensor(tokens), torch.arange(count), ForwardContext(PortableAttentionBackend(), cache, metadata))
        return model.compute_logits(hidden)


@pytest.mark.slow
def test_default_model_weights_equal_transformers_dequantization(default_model_dir, transformers_default_weights):
    from safetensors.torch import load_file

    directory, _ = default_model_dir
    ours = load_file(str(directory / "model.safetensors"))
    _, theirs = transformers_default_weights
    assert set(ours) == set(theirs)
    different = [name for name in ours if not torch.equal(ours[name], theirs[name].float())]
    assert not different, f"weights differ from transformers: {different[:5]}"


@pytest.mark.slow
def test_default_model_logits_match_transformers(default_model_dir, transformers_default_weights):
    directory, _ = default_model_dir
    config, tensors = transformers_default_weights
    with torch.device("meta"):  # skip a slow random init of 135M parameters
        reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    reference.load_state_dict({name: t.float() for name, t in tensors.items()}, strict=False, assign=True)
    reference.tie_weights()
    reference.model.rotary_emb = type(reference.model.rotary_emb)(config)  # its buffers were on meta
    assert not any(p.is_meta for p in reference.parameters())
    loaded = load_model(str(directory), torch.float32, "cpu")
    assert loaded.config.architecture == "LlamaForCausalLM" and loaded.config.tie_word_embeddings
    tokens = [1, 504, 3458, 282, 4649, 314, 253, 3459, 30, 378, 2]
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(prefill_logits(loaded.model, tokens), expected, atol=1e-3, rtol=1e-4)


def test_default_conversion_is_cached_and_complete(default_model_dir):
    directory, first_seconds = default_model_dir
    weights = directory / "model.safetensors"
    written_at = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert resolve_model_path("smollm2-135m") == directory
    assert time.perf_counter() - started < 2.0, f"second resolve reconverted (first took {first_seconds:.1f}s)"
    assert weights.stat().st_mtime_ns == written_at
    assert sorted(p.name for p in directory.parent.iterdir()) == [directory.name], "staging dirs left behind"
    assert {"config.json", "model.safetensors"} <= {p.name for p in directory.iterdir()}


def test_default_conversion_includes_tokenizer_files(default_model_dir):
    pytest.importorskip("joule.model.gguf_tokenizer")
    directory, _ = default_model_dir
    assert (directory / "tokenizer.json").is_file() and (directory / "tokenizer_config.json").is_file()


# --- synthetic GGUF files -----------------------------------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128, max_position_embeddings=64,
            num_attention_heads=4, rms_norm_eps=1e-5)
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes for llama q/k: each head's halves interleaved."""
    half = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, 2, half, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, _, suffix = rest.rpartition(".")
    return f"blk.{layer}.{GGUF_NAMES[module]}.{suffix}"


def write_gguf(path, architecture: str, reference, config, rope_frequency_factors=None) -> None:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    for name, tensor in reference.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weights = tensor.float().numpy().copy()
        if architecture == "llama" and ".q_proj." in name:
            weights = llama_cpp_permute(weights, config.num_attention_heads)
        elif architecture == "llama" and ".k_proj." in name:
            weights = llama_cpp_permute(weights, config.num_key_value_heads)
        writer.add_tensor(gguf_name(name), weights)
    if rope_frequency_factors is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_frequency_factors, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


SYNTHETIC = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)),
}


def random_reference(config):
    """A transformers model with random weights large enough that every layer matters (norms near 1)."""
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return reference


@pytest.mark.parametrize("architecture", SYNTHETIC)
def test_synthetic_gguf_converts_to_matching_model(tmp_path, monkeypatch, architecture):
    monkeypatch.setenv("JOULE_CACHE_DIR", str(tmp_path / "cache"))
    config_class, overrides = SYNTHETIC[architecture]
    config = getattr(transformers, config_class)(**TINY, **overrides)
    reference = random_reference(config)
    gguf_path = tmp_path / f"tiny-{architecture}.gguf"
    write_gguf(gguf_path, architecture, reference, config)

    loaded = load_model(str(gguf_path), torch.float32, "cpu")
    assert loaded.path.parent == tmp_path / "cache" / "models"
    assert loaded.config.tie_word_embeddings == config.tie_word_embeddings
    tokens = [3, 17, 99, 4, 56, 8, 120, 7, 1]
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(prefill_logits(loaded.model, tokens), expected, atol=1e-4, rtol=1e-4)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 48, "rope_theta": 500000.0}


def llama_cpp_rope_factors(head_dim: int, rope: dict) -> list[float]:
    """The per-pair divisors llama.cpp's converter stores as ``rope_freqs`` for a Llama 3.1+ checkpoint."""
    original = rope["original_max_position_embeddings"]
    low, high, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
    factors = []
    for pair in range(head_dim // 2):
        wavelength = 2 * math.pi * rope["rope_theta"] ** (2 * pair / head_dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def test_llama3_gguf_with_rope_frequency_factors_matches_transformers(tmp_path, monkeypatch):
    """Llama 3.1 / 3.2 GGUFs carry their rope scaling as a rope_freqs tensor, not as metadata."""
    monkeypatch.setenv("JOULE_CACHE_DIR", str(tmp_path / "cache"))
    config = transformers.LlamaConfig(**TINY, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)
    reference = random_reference(config)
    factors = llama_cpp_rope_factors(config.hidden_size // config.num_attention_heads, LLAMA3_ROPE)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[1] < 8.0, "all three bands exercised"
    gguf_path = tmp_path / "tiny-llama3.gguf"
    write_gguf(gguf_path, "llama", reference, config, rope_frequency_factors=factors)

    loaded = load_model(str(gguf_path), torch.float32, "cpu")
    assert loaded.config.rope_scaling["rope_type"] == "frequency_factors"
    assert loaded.config.rope_scaling["factors"] == pytest.approx(factors, rel=1e-6)
    tokens = [(7 * position + 3) % TINY["vocab_size"] for position in range(60)]
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits[0]
    actual = prefill_logits(loaded.model, tokens)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))

    # Without the factors the far positions rotate differently: the test would notice a loader that dropped them.
    plain_path = tmp_path / "tiny-llama3-plain.gguf"
    write_gguf(plain_path, "llama", reference, config)
    plain = prefill_logits(load_model(str(plain_path), torch.float32, "cpu").model, tokens)
    assert (plain - expected).abs().max() > 1e-2


def test_rope_frequency_factors_of_the_wrong_length_are_refused():
    config = {**transformers.LlamaConfig(**TINY).to_dict(), "architectures": ["LlamaForCausalLM"]}
    config["rope_scaling"] = {"rope_type": "frequency_factors", "factors": [1.0, 2.0]}
    config.pop("rope_parameters", None)
    with pytest.raises(ModelLoadError, match="head_dim / 2 = 8"):
        ModelConfig.from_hf_config(config)


def test_undo_rope_permutation_inverts_llama_cpp_order():
    weights = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    assert np.array_equal(undo_rope_permutation(llama_cpp_permute(weights, 2), 2), weights)
    # Head 0 of a permuted matrix starts with HF rows 0, 4, 1, 5 (first and second half interleaved).
    assert llama_cpp_permute(weights, 2)[:4, 0].tolist() == [0.0, 12.0, 3.0, 15.0]


def test_unsupported_gguf_architecture_lists_supported(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"architecture 'gpt2'.*llama, qwen2, qwen3"):
        resolve_model_path(str(path))
    assert os.listdir(tmp_path / "cache" / "models") == [], "a failed conversion left a directory behind"


def test_corrupt_gguf_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"broken\.gguf"):
        resolve_model_path(str(path))
    assert os.listdir(tmp_path / "cache" / "models") == []


def test_abandoned_staging_directory_is_cleaned_up(tmp_path, monkeypatch):
    monkeypatch.setenv("JOULE_CACHE_DIR", str(tmp_path / "cache"))
    config = transformers.LlamaConfig(**TINY, num_key_value_heads=2)
    torch.manual_seed(0)
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(gguf_path, "llama", transformers.LlamaForCausalLM(config), config)
    from joule.model.gguf_loader import converted_directory

    target = converted_directory(gguf_path)
    target.parent.mkdir(parents=True)
    dead_pid = 2**22 + 12345  # above the default pid_max, so no live process has it
    abandoned = target.parent / f".{target.name}.{dead_pid}.abc123"
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"half written")
    assert resolve_model_path(str(gguf_path)) == target
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
