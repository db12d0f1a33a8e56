"""Decode CUDA graphs, the CPU-checkable parts: the batch-size ladder, padding, when graphs are off,
and that the padded static-buffer decode path (what a graph captures) gives the eager path's tokens.

On the CPU the runner's forward runs without capture, through the Triton backend under
TRITON_INTERPRET=1; the GPU script ``benchmarks/gpu/engine_bench.py`` checks real replays.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from helpers.markers import interpreted_triton_on_cpu
from helpers.tiny_models import build_tiny_checkpoint

from joule.llm_engine import LLMEngine
from joule.runtime.cuda_graphs import (
    DISABLE_ENV,
    DecodeGraphRunner,
    graph_batch_sizes,
    graphs_disabled_reason,
    padded_batch_size,
)
from joule.sampling_params import RequestOutputKind, SamplingParams


def test_ladder_follows_the_documented_sizes_and_ends_at_max_num_seqs():
    assert graph_batch_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert graph_batch_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


def test_padding_picks_the_next_size_up():
    sizes = graph_batch_sizes(128)
    assert [padded_batch_size(n, sizes) for n in (1, 3, 9, 24, 25, 100, 128)] == [1, 4, 16, 24, 32, 128, 128]
    assert padded_batch_size(129, sizes) is None


def test_graphs_are_off_on_cpu_with_portable_backend_or_when_disabled(monkeypatch):
    class Triton:
        name = "triton"

    class Portable:
        name = "portable"

    cuda = torch.device("cuda")
    assert graphs_disabled_reason(cuda, Triton(), enforce_eager=False) is None
    assert "enforce_eager" in graphs_disabled_reason(cuda, Triton(), enforce_eager=True)
    assert "cpu" in graphs_disabled_reason(torch.device("cpu"), Triton(), enforce_eager=False)
    assert "portable" in graphs_disabled_reason(cuda, Portable(), enforce_eager=False)
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert DISABLE_ENV in graphs_disabled_reason(cuda, Triton(), enforce_eager=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("graph-llama")
    build_tiny_checkpoint("llama-gqa4-tied", directory)
    return directory


def _generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"req-{index}", {"prompt_token_ids": prompt}, params)
    results = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            results[output.request_id] = list(output.outputs[0].token_ids)
    return [results[f"req-{index}"] for index in range(len(prompts))]


def test_cpu_engine_builds_no_graph_runner(tiny_dir):
    engine = LLMEngine.from_kwargs(model=str(tiny_dir), device="cpu", dtype="float32",
                                   kv_cache_memory_bytes=1 << 22)
    executor = engine.core.executor
    assert executor.graph_runner is None and not executor.use_cuda_graphs
    assert not executor.enable_cuda_graphs(max_model_len=256, max_num_seqs=8)  # cpu: refused, stays eager


@interpreted_triton_on_cpu
def test_padded_static_decode_matches_eager_tokens(tiny_dir):
    from joule.runtime.attention.triton_backend import TritonAttentionBackend

    engine = LLMEngine.from_kwargs(model=str(tiny_dir), device="cpu", dtype="float32",
                                   kv_cache_memory_bytes=1 << 22, max_model_len=256, max_num_seqs=5)
    executor = engine.core.executor
    executor.backend = TritonAttentionBackend()
    generator = torch.Generator().manual_seed(7)
    # 5 requests step down to 4, 3, ... decodes as they finish: padded to 4 and 5 rows; 17+ tokens cross blocks
    prompts = [torch.randint(3, 200, (length,), generator=generator).tolist() for length in (5, 17, 3, 30, 9)]
    lengths = [6, 4, 8, 5, 7]
    eager = [_generate(engine, [prompt], length)[0] for prompt, length in zip(prompts, lengths)]

    engine.block_manager.reset_prefix_cache()
    runner = DecodeGraphRunner(executor.model, executor.kv_cache, executor.backend, executor.device,
                               max_num_seqs=5, max_model_len=256)
    assert runner.batch_sizes == [1, 2, 4, 5]
    runner._warm_feeds()  # what capture() sends first: padding's inputs, rewritten before every step
    executor.graph_runner, executor.use_cuda_graphs = runner, True
    calls = []
    original_run = runner.run
    runner.run = lambda plan, token_source=None: calls.append(len(plan.sequences)) or original_run(plan, token_source)
    params = [SamplingParams(temperature=0.0, max_tokens=length, ignore_eos=True,
                             output_kind=RequestOutputKind.FINAL_ONLY) for length in lengths]
    for index, (prompt, param) in enumerate(zip(prompts, params)):
        engine.add_request(f"g-{index}", {"prompt_token_ids": prompt}, param)
    padded = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            padded[output.request_id] = list(output.outputs[0].token_ids)
    assert calls, "no decode step went through the static-buffer path"
    assert 3 in calls  # a padded step (3 rows run as 4)
    assert [padded[f"g-{index}"] for index in range(len(prompts))] == eager


@interpreted_triton_on_cpu
def test_feeds_are_warmed_at_every_size_with_no_full_and_one_short_row_of_tokens(tiny_dir, monkeypatch):
    from joule.runtime.attention.triton_backend import TritonAttentionBackend

    engine = LLMEngine.from_kwargs(model=str(tiny_dir), device="cpu", dtype="float32",
                                   kv_cache_memory_bytes=1 << 22, max_model_len=256, max_num_seqs=5)
    executor = engine.core.executor
    runner = DecodeGraphRunner(executor.model, executor.kv_cache, TritonAttentionBackend(), executor.device,
                               max_num_seqs=5, max_model_len=256)
    sent = []
    monkeypatch.setattr(runner, "_send", lambda size, tokens=None: sent.append(
        (size, 0 if tokens is None else tokens.numel())))
    runner._warm_feeds()
    assert sent == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (4, 0), (4, 3), (4, 4), (5, 0), (5, 4), (5, 5)]
    sent.clear()
    runner._feeds = False  # the plain copy path (JOULE_GRAPH_FEED=0) has no kernel to warm
    runner._warm_feeds()
    assert sent == []


def test_chunk_graph_sizes_double_up_to_the_budget():
    from joule.runtime.prefill_graphs import chunk_graph_sizes

    assert chunk_graph_sizes(100) == [16, 32, 64, 100]
    assert chunk_graph_sizes(8192)[-3:] == [2048, 4096, 8192]
    assert chunk_graph_sizes(65536)[-1] == 8192  # longer chunks stay eager
    assert chunk_graph_sizes(10) == [10]
    with pytest.raises(ValueError):
        chunk_graph_sizes(1)


def test_chunk_pieces_split_off_captured_sizes_while_padding_would_waste_rows():
    from joule.runtime.prefill_graphs import chunk_pieces

    sizes = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert chunk_pieces(4608, sizes) == [4096, 512]
    assert chunk_pieces(1100, sizes) == [1024, 76]  # 76 pads to 128: 52 rows, kept as one pass
    assert chunk_pieces(3000, sizes) == [2048, 952]
    assert chunk_pieces(4096, sizes) == [4096]
    assert chunk_pieces(4097, sizes) == [4096, 1]
    assert chunk_pieces(300, sizes) == [300]  # 212 padding rows: below the threshold
    assert chunk_pieces(33, [16, 32, 40], min_padding_to_split=4) == [32, 1]
    assert chunk_pieces(100, [16, 32, 64, 100]) == [100]
    for count in range(2, 8193, 37):
        pieces = chunk_pieces(count, sizes)
        assert sum(pieces) == count and all(piece > 0 for piece in pieces)
        assert all(piece in sizes for piece in pieces[:-1])
    assert chunk_pieces(9000, sizes) == [8192, 808]  # longer than every graph: the largest first


@interpreted_triton_on_cpu
@pytest.mark.parametrize("min_padding_to_split", [256, 4])
def test_mixed_steps_through_static_chunk_buffers_match_eager_tokens(tiny_dir, monkeypatch, min_padding_to_split):
    """Decodes through the decode runner, each prompt chunk through the padded chunk runner (what the
    graphs capture): the same greedy tokens as one eager forward, with chunks starting mid-prompt."""
    from joule.runtime.attention.triton_backend import TritonAttentionBackend
    from joule.runtime.prefill_graphs import STAGING_SETS, PrefillChunkGraphRunner, chunk_pieces

    engine = LLMEngine.from_kwargs(model=str(tiny_dir), device="cpu", dtype="float32", kv_cache_memory_bytes=1 << 22,
                                   max_model_len=256, max_num_seqs=6, max_num_batched_tokens=40, block_size=8)
    executor = engine.core.executor
    executor.backend = TritonAttentionBackend()
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 200, (length,), generator=generator).tolist() for length in (70, 5, 33, 90, 12, 1)]
    lengths = [5, 9, 6, 4, 7, 8]

    def run_all(tag):
        params = [SamplingParams(temperature=0.0, max_tokens=length, ignore_eos=True,
                                 output_kind=RequestOutputKind.FINAL_ONLY) for length in lengths]
        for index, (prompt, param) in enumerate(zip(prompts, params)):
            engine.add_request(f"{tag}-{index}", {"prompt_token_ids": prompt}, param)
        results = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                results[output.request_id] = list(output.outputs[0].token_ids)
        engine.block_manager.reset_prefix_cache()
        return [results[f"{tag}-{index}"] for index in range(len(prompts))]

    eager = run_all("eager")
    executor.graph_runner = DecodeGraphRunner(executor.model, executor.kv_cache, executor.backend, executor.device,
                                              max_num_seqs=6, max_model_len=256)
    executor.chunk_runner = PrefillChunkGraphRunner(executor.model, executor.kv_cache, executor.backend,
                                                    executor.device, max_num_batched_tokens=40, max_model_len=256,
                                                    min_padding_to_split=min_padding_to_split)
    executor.use_cuda_graphs = True
    import joule.runtime.executor as executor_module

    mixed_decodes = []
    original_mixed = executor_module.run_mixed_step

    def counting_mixed(plan, decode_runner, chunk_runner, decode_tokens=None):
        mixed_decodes.append(sum(1 for sequence in plan.sequences if sequence.num_tokens == 1))
        return original_mixed(plan, decode_runner, chunk_runner, decode_tokens)

    monkeypatch.setattr(executor_module, "run_mixed_step", counting_mixed)
    chunk_sizes, staging_sets = [], []
    original = executor.chunk_runner.run_chunk
    executor.chunk_runner.run_chunk = lambda sequence: chunk_sizes.append(sequence.num_tokens) or original(sequence)
    original_use_set = executor.chunk_runner._use_set
    executor.chunk_runner._use_set = lambda index: staging_sets.append(index) or original_use_set(index)
    assert run_all("static") == eager
    # Each piece fills the next pinned staging set (a step's second piece must not wait for the first one's copy).
    assert staging_sets == [(index + 1) % STAGING_SETS for index in range(len(staging_sets))]
    assert chunk_sizes and any(size not in executor.chunk_runner.sizes for size in chunk_sizes)  # padded chunks ran
    if min_padding_to_split == 4:  # some chunk ran as several passes (e.g. 33 tokens as 32 + 1)
        assert any(len(chunk_pieces(size, executor.chunk_runner.sizes, 4)) > 1 for size in chunk_sizes)
    assert any(count > 0 for count in mixed_decodes)  # decodes and chunks in one step, split between runners


def test_block_table_rows_follow_a_request_whose_blocks_grow_or_are_replaced(tiny_dir):
    """The runner keeps an array of each request's blocks between steps: it must be rebuilt when the list
    grows (a new block) or is replaced (preemption frees it; recomputing allocates anew, maybe as long), and a
    table row rewritten whenever it held anything else last step."""
    from joule.engine.plan import ScheduledSequence, StepPlan
    from joule.engine.request import Request
    from joule.runtime.attention.triton_backend import TritonAttentionBackend

    engine = LLMEngine.from_kwargs(model=str(tiny_dir), device="cpu", dtype="float32",
                                   kv_cache_memory_bytes=1 << 22, max_model_len=256, max_num_seqs=4)
    executor = engine.core.executor
    runner = DecodeGraphRunner(executor.model, executor.kv_cache, TritonAttentionBackend(), executor.device,
                               max_num_seqs=4, max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    first, second = Request("a", [1] * 20, params, 4), Request("b", [1] * 5, params, 4)

    def fill(*requests):
        plan = StepPlan([ScheduledSequence(r, [1], r.num_tokens - 1, r.block_ids, True) for r in requests])
        runner._fill(plan)
        return [runner.host_block_tables[row, : len(r.block_ids)].tolist() for row, r in enumerate(requests)]

    first.block_ids, second.block_ids = [3, 4], [9]
    assert fill(first, second) == [[3, 4], [9]]
    first.block_ids.append(5)  # grew in place
    assert fill(first, second) == [[3, 4, 5], [9]]
    first.block_ids = [7, 8, 6]  # replaced by a list just as long
    assert fill(second, first) == [[9], [7, 8, 6]]  # rows swapped too
    assert runner.host_slots[1].item() == 8 * runner.block_size + 19 % runner.block_size  # position 19: block 8
    # Rows holding what they held last step are not copied again; every other row is, whatever came before.
    assert fill(second, first) == [[9], [7, 8, 6]]
    assert fill(first) == [[7, 8, 6]]  # first moved up a row, second left
    assert fill(second, first) == [[9], [7, 8, 6]]  # back, after a step without them in place
    second.block_ids.append(2)
    assert fill(second, first) == [[9, 2], [7, 8, 6]]
    first.block_ids.clear()  # emptied and refilled in place, shorter: the same list object, fewer blocks
    first.block_ids.extend([11, 12])
    assert fill(second, first) == [[9, 2], [11, 12]]
    # The other mirrors, row by row: each row's token, its position, its slot and its length.
    size = runner.block_size
    assert runner.host_positions[:2].tolist() == [4, 19]
    assert runner.host_sequence_lengths[:2].tolist() == [5, 20]
    assert runner.host_slots[:2].tolist() == [9 * size + 4, 12 * size + 19 % size]
    assert runner.host_input_ids[:2].tolist() == [1, 1]


@interpreted_triton_on_cpu
def test_short_context_variants_split_less_and_give_the_same_tokens(tiny_dir):
    """Small batches get a second metadata (graph on CUDA) split for short contexts; the runner picks it
    while every row is within the bound and the long one after, with the eager path's tokens either way."""
    from joule.runtime.attention.triton_backend import TritonAttentionBackend

    class SplitByLength(TritonAttentionBackend):
        """More splits for longer bounds (a GPU's choice), so variants exist on the CPU too."""

        def graph_num_splits(self, batch_size, num_kv_heads, max_length_bound, device):
            return max(1, max_length_bound // (32 * batch_size))

    engine = LLMEngine.from_kwargs(model=str(tiny_dir), device="cpu", dtype="float32",
                                   kv_cache_memory_bytes=1 << 22, max_model_len=256, max_num_seqs=4)
    executor = engine.core.executor
    executor.backend = SplitByLength()
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 200, (length,), generator=generator).tolist() for length in (40, 60)]
    eager = [_generate(engine, [prompt], 12)[0] for prompt in prompts]

    engine.block_manager.reset_prefix_cache()
    runner = DecodeGraphRunner(executor.model, executor.kv_cache, executor.backend, executor.device,
                               max_num_seqs=4, max_model_len=256, short_context_tokens=64)
    assert {size: runner.metadata[size].num_splits for size in runner.batch_sizes} == {1: 8, 2: 4, 4: 2}
    assert {size: m.num_splits for size, m in runner.short_metadata.items()} == {1: 2, 2: 1, 4: 1}
    assert runner.is_short(1, 64) and not runner.is_short(1, 65)
    wide = DecodeGraphRunner(executor.model, executor.kv_cache, executor.backend, executor.device,
                             max_num_seqs=4, max_model_len=256, short_context_tokens=160)
    assert list(wide.short_metadata) == [2, 4]  # size 1: 5 splits against 8 is not worth a second graph

    executor.graph_runner, executor.use_cuda_graphs = runner, True
    variants = []
    original = runner._forward
    runner._forward = lambda size, short=False: variants.append(short) or original(size, short)
    static = [_generate(engine, [prompt], 12)[0] for prompt in prompts]
    assert static == eager
    assert True in variants and False in variants  # 40 + 12 tokens stay short; 60 + 12 cross the bound
