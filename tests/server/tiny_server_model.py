"""A tiny random Llama that shares the default model's tokenizer, so server tests run in seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def build_tiny_chat_model(directory: Path) -> Path:
    """Save a 2-layer Llama (hidden 64) with the default model's vocab, tokenizer and chat template."""
    import torch
    import transformers

    from joule.model.loader import resolve_model_path

    source = resolve_model_path(None)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper than the default init, so sampling and logprobs are not flat
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    return directory
