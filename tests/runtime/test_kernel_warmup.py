"""Start-up warm-up steps: the contexts cover every split class, plans fit the cache, and running them
(Triton backend under TRITON_INTERPRET=1 on the CPU) leaves the engine's outputs unchanged."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from helpers.markers import interpreted_triton_on_cpu
from helpers.tiny_models import build_tiny_checkpoint

from joule.kernels.paged_decode import MAX_SPLITS, MIN_SPLIT_TOKENS, choose_num_splits
from joule.llm_engine import LLMEngine
from joule.runtime.kernel_warmup import FIRST_SPLIT_CONTEXT, warmup_contexts, warmup_plans
from joule.sampling_params import RequestOutputKind, SamplingParams


def _pow2(value: int) -> int:
    return 1 << (value - 1).bit_length()


def test_contexts_double_from_the_first_split_to_max_model_len():
    assert warmup_contexts(4096) == [16, 256, 512, 1024, 2048, 4096]
    assert warmup_contexts(3000) == [16, 256, 512, 1024, 2048, 3000]
    assert warmup_contexts(100) == [16, 100]


@pytest.mark.parametrize("max_model_len", [1000, 4096, 32768])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 8])
def test_contexts_reach_every_split_padding_a_step_can_choose(max_model_len, num_kv_heads):
    """Any step's decodes (any count, any length up to max_model_len) pick a split count whose padded
    power of two (the merge kernel's constexpr) one of the one-decode warm-up contexts also picks."""
    processors = 132
    warmed = {_pow2(choose_num_splits(1, num_kv_heads, context, processors))
              for context in warmup_contexts(max_model_len)}
    for num_decodes in (1, 2, 3, 16, 100, 256):
        for length in range(1, max_model_len + 1, 97):
            assert _pow2(choose_num_splits(num_decodes, num_kv_heads, length, processors)) in warmed
    assert max(warmed) <= _pow2(MAX_SPLITS) and MIN_SPLIT_TOKENS * 2 == FIRST_SPLIT_CONTEXT


def test_plans_are_mixed_and_decode_only_steps_within_the_cache():
    plans = warmup_plans(4096, block_size=16, num_blocks=10_000)
    assert len(plans) == 12
    mixed, alone = plans[4], plans[5]  # context 512
    assert [s.num_tokens for s in mixed.sequences] == [1, 16] and mixed.sequences[0].start_position == 511
    assert len(mixed.sequences[0].block_ids) == 32 and mixed.sequences[1].block_ids == [32]
    assert [s.num_tokens for s in alone.sequences] == [1]
    assert len(warmup_plans(4096, block_size=16, num_blocks=70)) == 8  # 2048 needs 129 blocks: stops there


@interpreted_triton_on_cpu
def test_warmup_steps_leave_generation_unchanged(tmp_path):
    from joule.runtime.attention.triton_backend import TritonAttentionBackend

    build_tiny_checkpoint("llama-gqa4-tied", tmp_path)
    engine = LLMEngine.from_kwargs(model=str(tmp_path), device="cpu", dtype="float32",
                                   kv_cache_memory_bytes=1 << 22, max_model_len=512)
    executor = engine.core.executor
    executor.backend = TritonAttentionBackend()
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)

    def generate(tag: str) -> list[int]:
        engine.add_request(tag, {"prompt_token_ids": [5, 9, 13, 40, 41, 42, 7]}, params)
        tokens = []
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens = list(output.outputs[0].token_ids)
        return tokens

    before = generate("before")
    engine.block_manager.reset_prefix_cache()
    assert executor.compile_eager_step_kernels(engine.max_model_len) == 6  # contexts 16, 256 and 512
    assert executor.kv_cache.key_caches[0][:33].abs().sum() > 0  # it ran the model over those blocks
    assert generate("after") == before


@interpreted_triton_on_cpu  # its small tiles run on CPU tensors: under the interpreter only
def test_the_fused_gate_up_gemm_compiles_once_per_weight_shape(monkeypatch):
    from joule.kernels.gate_up_config import GateUpTile
    from joule.model.layers import GatedMLP, MergedLinear
    from joule.runtime.kernel_warmup import compile_fused_gate_up

    monkeypatch.setenv("JOULE_FUSED_GATE_UP", "16x16x16x4x2x2x1")  # small tiles: the interpreter runs them
    mlps = [GatedMLP(32, 48), GatedMLP(32, 48), GatedMLP(32, 24)]
    for mlp in mlps:
        mlp.merge_projections(False)
    model = torch.nn.ModuleList(mlps).to(torch.bfloat16)
    assert mlps[0].fused_tile == GateUpTile(16, 16, 16, 4, 2, 2, True)
    assert compile_fused_gate_up(model) == 0  # on the CPU the MLPs never choose it
    calls = []
    monkeypatch.setattr(MergedLinear, "runs_fused_gate_up", lambda self, hidden: calls.append(hidden.shape) or True)
    assert compile_fused_gate_up(model) == 2  # two weight shapes, three MLPs
    assert all(shape[0] >= 1024 for shape in calls)  # FUSED_MIN_ROWS rows: what a long step passes


@interpreted_triton_on_cpu
def test_logits_are_warmed_at_every_row_count_up_to_the_batch(tmp_path, monkeypatch):
    from joule.runtime.kernel_warmup import compile_logits_rows

    build_tiny_checkpoint("llama-gqa4-tied", tmp_path)
    engine = LLMEngine.from_kwargs(model=str(tmp_path), device="cpu", dtype="float32",
                                   kv_cache_memory_bytes=1 << 22, max_model_len=128)
    model = engine.core.executor.model
    original, rows = model.compute_logits, []

    def counted(hidden):
        rows.append(hidden.shape[0])
        assert hidden.abs().sum() > 0  # random rows, not zeros
        return original(hidden)

    monkeypatch.setattr(model, "compute_logits", counted)
    assert compile_logits_rows(model, 6) == 6
    assert rows == [1, 2, 3, 4, 5, 6]


def test_the_last_layers_tail_is_warmed_at_every_row_count_up_to_the_batch(tmp_path, monkeypatch):
    from joule.runtime.kernel_warmup import compile_last_layer_rows

    build_tiny_checkpoint("llama-gqa4-tied", tmp_path)
    engine = LLMEngine.from_kwargs(model=str(tmp_path), device="cpu", dtype="float32",
                                   kv_cache_memory_bytes=1 << 22, max_model_len=128)
    model = engine.core.executor.model
    last = model.model.layers[-1]
    original, rows = last.feed_forward, []

    def counted(hidden, residual):
        rows.append(hidden.shape[0])
        assert hidden.abs().sum() > 0 and residual is not None and residual.shape == hidden.shape
        output, new_residual = original(hidden, residual)
        assert output.shape == hidden.shape and torch.isfinite(output).all()
        return output, new_residual

    monkeypatch.setattr(last, "feed_forward", counted)
    assert compile_last_layer_rows(model, 5) == 5
    assert rows == [1, 2, 3, 4, 5]
    model.model.layers[-1].self_attn.qkv_proj = None  # as before merging: no step runs such a tail
    assert compile_last_layer_rows(model, 5) == 0
