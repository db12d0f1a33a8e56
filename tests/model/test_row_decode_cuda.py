"""On a GPU, a batch-1 decode step runs fused kernels (norm in the GEMVs, q/k/v + rotary + cache write in one,
SwiGLU in the gate/up GEMV). The same step through the unfused kernels must give the same hidden states and
write the same cache entries, within bf16 rounding."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _decode_once(fused: bool, monkeypatch, with_bias: bool):
    from joule.model.config import ModelConfig
    from joule.model.layers import MergedLinear, RotaryEmbedding
    from joule.model.llama import LlamaForCausalLM
    from joule.runtime.attention.base import AttentionMetadata, ForwardContext, KVCache
    from joule.runtime.attention.triton_backend import TritonAttentionBackend

    torch.manual_seed(0)
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                         attention_bias=with_bias)
    model = LlamaForCausalLM(config)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.2)
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.data = 1 + 0.1 * torch.randn_like(parameter.data)
    model = model.to("cuda", torch.bfloat16)
    # The rotary table stays float32, as the loader keeps it: the fused q/k/v + rotary kernel's condition.
    model.model.rotary_emb.cos_sin_table = RotaryEmbedding(config).cos_sin_table.to("cuda")
    model.merge_projections()
    backend = TritonAttentionBackend(fuse_output_projection=fused)  # the attention + o kernel too
    if not fused:  # every projection through cuBLAS, the backend writing the cache
        monkeypatch.setattr(MergedLinear, "runs_row_gemv", lambda self, hidden: False)
        monkeypatch.setattr(TritonAttentionBackend, "accepts_stored_kv", False)
    cache = KVCache.allocate(2, 4, 16, 2, 32, torch.bfloat16, "cuda")
    table = torch.tensor([[2, 0]], dtype=torch.int32, device="cuda")
    prompt = torch.randint(0, 512, (21,), device="cuda")
    with torch.inference_mode():
        prefill = AttentionMetadata(torch.tensor([0, 20], device="cuda"), torch.arange(32, 52, device="cuda"),
                                    table, [20], [0], [20])
        model(prompt[:20], torch.arange(20, device="cuda"), ForwardContext(backend, cache, prefill))
        decode = AttentionMetadata(torch.tensor([0, 1], device="cuda"), torch.tensor([52], device="cuda"),
                                   table, [1], [20], [21])
        hidden = model(prompt[20:], torch.tensor([20], device="cuda"), ForwardContext(backend, cache, decode))
    return hidden.float(), cache


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_batch_one_step_matches_the_unfused_kernels(monkeypatch, with_bias):
    fused_hidden, fused_cache = _decode_once(True, monkeypatch, with_bias)
    unfused_hidden, unfused_cache = _decode_once(False, monkeypatch, with_bias)
    scale = unfused_hidden.abs().max().item()
    assert (fused_hidden - unfused_hidden).abs().max().item() < 0.03 * scale
    for layer in range(2):
        for fused, unfused in ((fused_cache.key_caches[layer], unfused_cache.key_caches[layer]),
                               (fused_cache.value_caches[layer], unfused_cache.value_caches[layer])):
            new_slot = fused.flatten(0, 1)[52].float(), unfused.flatten(0, 1)[52].float()
            assert new_slot[1].abs().sum() > 0
            assert (new_slot[0] - new_slot[1]).abs().max().item() <= 0.03 * new_slot[1].abs().max().item()


