"""On a GPU, a batch-1 decode step runs fused kernels (norm in the GEMVs, q/k/v + rotary + cache write in one,
SwiGLU in the gate/up GEMV; attention + o in one, or the split merge inside the o projection). The same step
through the unfused kernels must give the same hidden states and write the same cache entries, within bf16
rounding."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _decode_once(mode: str, monkeypatch, with_bias: bool, length: int = 20):
    """``mode``: "fused" (attention + o in one kernel), "merged" (the split merge in the o projection) or
    "unfused" (cuBLAS projections, the backend writing the cache). ``length``: the prompt's tokens before the
    decoded one (260: two splits of the decode attention)."""
    from joule.model.config import ModelConfig
    from joule.model.layers import MergedLinear
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
    model.merge_projections()
    backend = TritonAttentionBackend(fuse_output_projection=mode == "fused",
                                     merge_output_projection=mode == "merged")
    with monkeypatch.context() as patches:
        if mode == "unfused":  # every projection through cuBLAS, the backend writing the cache
            patches.setattr(MergedLinear, "runs_row_gemv", lambda self, hidden: False)
            patches.setattr(TritonAttentionBackend, "accepts_stored_kv", False)
        num_blocks = length // 16 + 3
        cache = KVCache.allocate(2, num_blocks, 16, 2, 32, torch.bfloat16, "cuda")
        blocks = list(range(num_blocks))[::-1][: length // 16 + 1]  # reversed: not the identity table
        table = torch.tensor([blocks], dtype=torch.int32, device="cuda")
        slots = torch.tensor([blocks[position // 16] * 16 + position % 16 for position in range(length + 1)],
                             device="cuda")
        prompt = torch.randint(0, 512, (length + 1,), device="cuda")
        with torch.inference_mode():
            prefill = AttentionMetadata(torch.tensor([0, length], device="cuda"), slots[:length], table, [length],
                                        [0], [length])
            model(prompt[:length], torch.arange(length, device="cuda"), ForwardContext(backend, cache, prefill))
            decode = AttentionMetadata(torch.tensor([0, 1], device="cuda"), slots[length:], table, [1], [length],
                                       [length + 1])
            hidden = model(prompt[length:], torch.tensor([length], device="cuda"),
                           ForwardContext(backend, cache, decode))
    return hidden.float(), cache, slots[length].item()


@pytest.mark.parametrize("mode,length", [("fused", 20), ("fused", 260), ("merged", 260)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_batch_one_step_matches_the_unfused_kernels(monkeypatch, with_bias, mode, length):
    fused_hidden, fused_cache, new_slot_index = _decode_once(mode, monkeypatch, with_bias, length)
    unfused_hidden, unfused_cache, _ = _decode_once("unfused", monkeypatch, with_bias, length)
    scale = unfused_hidden.abs().max().item()
    assert (fused_hidden - unfused_hidden).abs().max().item() < 0.03 * scale
    for layer in range(2):
        for fused, unfused in ((fused_cache.key_caches[layer], unfused_cache.key_caches[layer]),
                               (fused_cache.value_caches[layer], unfused_cache.value_caches[layer])):
            new_slot = fused.flatten(0, 1)[new_slot_index].float(), unfused.flatten(0, 1)[new_slot_index].float()
            assert new_slot[1].abs().sum() > 0
            assert (new_slot[0] - new_slot[1]).abs().max().item() <= 0.03 * new_slot[1].abs().max().item()
