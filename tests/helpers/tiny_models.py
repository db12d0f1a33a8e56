"""Tiny random-weight Hugging Face checkpoints of every supported architecture, built once per session."""

from __future__ import annotations

import torch

TINY_COMMON = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

ARCHITECTURES = {
    "llama-gqa4-tied": ("LlamaConfig", "LlamaForCausalLM",
                        dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("LlamaConfig", "LlamaForCausalLM",
                            dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                 rope_theta=500000.0,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM",
                   dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qk-norm": ("Qwen3Config", "Qwen3ForCausalLM",
                      dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24, tie_word_embeddings=False)),
}


def build_tiny_checkpoint(name: str, directory) -> "torch.nn.Module":
    import transformers

    config_class, model_class, extra = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**TINY_COMMON, **extra)
    torch.manual_seed(1234)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # random init is too flat to tell models apart; sharpen it
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.08)
        if name == "qwen2-bias":
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0.0, 0.2)
                layer.self_attn.k_proj.bias.normal_(0.0, 0.2)
    model.save_pretrained(directory)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def transformers_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return output[0, len(prompt_ids):].tolist()
