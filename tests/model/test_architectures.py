"""Each architecture loaded from a transformers checkpoint gives transformers' logits.

Every prompt runs three ways over the paged cache (block_size 4, shuffled
non-contiguous blocks): one prefill, chunks of several sizes, and a batch that
mixes decode rows with prompt chunks of other sequences.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import transformers

from joule.model.layers import MergedLinear, onednn_packs_weights
from joule.model.loader import load_model
from joule.runtime.attention.base import AttentionMetadata, ForwardContext, KVCache
from joule.runtime.attention.portable import PortableAttentionBackend

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=256, max_position_embeddings=128)
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16, "rope_theta": 500000.0,
}
ARCHITECTURES = {
    "llama-mha-untied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-gqa4-tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE)),
    "llama-linear-rope-bias": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    )),
    "mistral-gqa2": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "qwen2-bias-tied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3-qknorm-headdim32-gqa4": ("Qwen3Config", dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False,
    )),
}
BLOCK_SIZE = 4


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Large random weights (biases and norms included) so attention is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, our loaded model, checkpoint directory); built lazily, once per module."""
    built = {}

    def get(name):
        if name not in built:
            config_class, overrides = ARCHITECTURES[name]
            config = getattr(transformers, config_class)(**TINY, **overrides)
            torch.manual_seed(0)
            reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
            randomize(reference, seed=len(built) + 1)
            directory = tmp_path_factory.mktemp(name)
            reference.save_pretrained(directory)
            built[name] = (reference, load_model(str(directory), torch.float32, "cpu").model, directory)
        return built[name]

    return get


class PagedRunner:
    """Drives our model the way the engine does: flattened steps over a paged cache."""

    def __init__(self, model, num_blocks: int = 48, seed: int = 0):
        config = model.config
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = KVCache.allocate(
            config.num_hidden_layers, num_blocks, BLOCK_SIZE, config.num_key_value_heads,
            config.head_dim, next(model.parameters()).dtype, self.device,
        )
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.backend = PortableAttentionBackend()

    def slot(self, sequence_id: int, position: int) -> int:
        return self.block_tables[sequence_id][position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE

    def step(self, chunks: list[tuple[int, list[int], int]], last_rows_only: bool = False) -> list[torch.Tensor]:
        """Run (sequence_id, token_ids, start_position) chunks as one batch; logits per chunk (``last_rows_only``:
        of each chunk's last token, the model given those rows as its ``output_rows``)."""
        input_ids, positions, slots = [], [], []
        for sequence_id, tokens, start in chunks:
            table = self.block_tables.setdefault(sequence_id, [])
            while len(table) * BLOCK_SIZE < start + len(tokens):
                table.append(self.free_blocks.pop())
            input_ids += tokens
            positions += range(start, start + len(tokens))
            slots += [self.slot(sequence_id, p) for p in range(start, start + len(tokens))]
        tables = [self.block_tables[sequence_id] for sequence_id, _, _ in chunks]
        block_tables = torch.zeros(len(chunks), max(map(len, tables)) + 1, dtype=torch.int32)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = torch.tensor(table)
        query_lengths = [len(tokens) for _, tokens, _ in chunks]
        context_lengths = [start for _, _, start in chunks]
        device = self.device
        metadata = AttentionMetadata(
            query_start_locations=torch.tensor([0] + torch.tensor(query_lengths).cumsum(0).tolist(), device=device),
            slot_mapping=torch.tensor(slots, device=device),
            block_tables=block_tables.to(device),
            query_lengths=query_lengths,
            context_lengths=context_lengths,
            sequence_lengths=[c + q for c, q in zip(context_lengths, query_lengths)],
        )
        context = ForwardContext(self.backend, self.cache, metadata)
        output_rows = None
        if last_rows_only:
            output_rows = torch.tensor(query_lengths, device=device).cumsum(0) - 1
        with torch.no_grad():
            hidden = self.model(torch.tensor(input_ids, device=device), torch.tensor(positions, device=device), context,
                                output_rows)
            logits = self.model.compute_logits(hidden).cpu()
        return list(logits.split([1] * len(chunks) if last_rows_only else query_lengths))


def reference_logits(reference, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([tokens])).logits[0].float()


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, TINY["vocab_size"], (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def assert_logits_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_single_prefill_matches_transformers(checkpoints, name):
    reference, model, _ = checkpoints(name)
    tokens = prompt(1, 19)
    (logits,) = PagedRunner(model).step([(0, tokens, 0)])
    assert logits.dtype == torch.float32
    assert_logits_close(logits, reference_logits(reference, tokens))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_chunked_prefill_matches_transformers(checkpoints, name):
    reference, model, _ = checkpoints(name)
    tokens = prompt(2, 23)
    expected = reference_logits(reference, tokens)
    runner = PagedRunner(model, seed=1)
    start = 0
    for size in (3, 1, 6, 2, 5, 4, 2):  # crosses block edges at varied offsets
        (logits,) = runner.step([(0, tokens[start : start + size], start)])
        assert_logits_close(logits, expected[start : start + size])
        start += size
    assert start == len(tokens)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_mixed_decode_and_chunks_batch_matches_transformers(checkpoints, name):
    reference, model, _ = checkpoints(name)
    sequences = {0: prompt(3, 14), 1: prompt(4, 17), 2: prompt(5, 11)}
    expected = {sid: reference_logits(reference, tokens) for sid, tokens in sequences.items()}
    # Each step: (sequence, start, length). Sequence 0 decodes while others prefill in chunks.
    schedule = [
        [(0, 0, 9), (1, 0, 5)],
        [(0, 9, 1), (1, 5, 6), (2, 0, 3)],
        [(2, 3, 5), (0, 10, 1), (1, 11, 1)],
        [(1, 12, 1), (2, 8, 1), (0, 11, 1)],
        [(0, 12, 2), (2, 9, 1), (1, 13, 4)],
        [(2, 10, 1)],
    ]
    runner = PagedRunner(model, seed=2)
    covered = {sid: 0 for sid in sequences}
    for step in schedule:
        chunks = [(sid, sequences[sid][start : start + length], start) for sid, start, length in step]
        for (sid, start, length), logits in zip(step, runner.step(chunks)):
            assert_logits_close(logits, expected[sid][start : start + length])
            covered[sid] = start + length
    assert covered == {sid: len(tokens) for sid, tokens in sequences.items()}
    # Sequences interleaved their block allocations: tables are non-contiguous.
    assert any(sorted(table) != list(range(min(table), min(table) + len(table))) for table in runner.block_tables.values())


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_last_rows_only_match_transformers_and_leave_every_rows_cache(checkpoints, name, merged):
    """Rows past the last layer's attention that are not asked for skip its output projection and MLP; their keys
    and values still reach the cache, so the next steps' logits stay right."""
    reference, model, _ = checkpoints(name)
    if merged:
        model = copy.deepcopy(model)
        model.merge_projections()
    sequences = {0: prompt(6, 13), 1: prompt(7, 10)}
    expected = {sid: reference_logits(reference, tokens) for sid, tokens in sequences.items()}
    schedule = [[(0, 0, 8), (1, 0, 9)], [(1, 9, 1), (0, 8, 5)]]  # chunks, then a decode beside the rest of a prompt
    runner = PagedRunner(model, seed=3)
    for step in schedule:
        chunks = [(sid, sequences[sid][start : start + length], start) for sid, start, length in step]
        for (sid, start, length), logits in zip(step, runner.step(chunks, last_rows_only=True)):
            assert logits.shape[0] == 1
            assert_logits_close(logits, expected[sid][start + length - 1 : start + length])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_residual_added_inside_the_projections_gemm_matches_transformers(checkpoints, name, monkeypatch):
    """``JOULE_RESIDUAL_IN_GEMM``'s path (CUDA steps of several rows in the engine) forced on the CPU: the o and down
    projections hand back the residual stream themselves (no residual left for the next norm) and the logits of a
    mixed batch still match transformers'."""
    reference, _, directory = checkpoints(name)
    monkeypatch.setenv("JOULE_RESIDUAL_IN_GEMM", "1")
    model = load_model(str(directory), torch.float32, "cpu").model
    model.merge_projections(transpose_weight=True)  # as the engine runs a CPU model
    monkeypatch.setattr(MergedLinear, "folds_residual",
                        lambda self, hidden, residual: self.adds_residual and self.bias is None and not self.packed)
    folded = []
    project_onto = MergedLinear.project_onto

    def recording(self, hidden, residual):
        output, left = project_onto(self, hidden, residual)
        folded.append(residual is not None and left is None)
        return output, left

    monkeypatch.setattr(MergedLinear, "project_onto", recording)
    sequences = {0: prompt(8, 12), 1: prompt(9, 9)}
    runner = PagedRunner(model, seed=3)
    for step in ([(0, 0, 8), (1, 0, 7)], [(0, 8, 4), (1, 7, 2)]):
        chunks = [(sid, sequences[sid][start:start + length], start) for sid, start, length in step]
        for (sid, start, length), logits in zip(step, runner.step(chunks)):
            full = sequences[sid][:start + length]
            assert_logits_close(logits, reference_logits(reference, full)[start:start + length])
    layers = model.config.num_hidden_layers
    bias_free = not (model.config.attention_output_bias or model.config.mlp_bias)
    assert len(folded) == 2 * 2 * layers  # o and down, every layer, two steps
    assert sum(folded) == (2 * 2 * layers if bias_free else sum(folded)) and any(folded)


def test_parameter_count_matches_transformers(checkpoints):
    for name in ARCHITECTURES:
        reference, model, _ = checkpoints(name)
        expected = sum(p.numel() for p in reference.parameters())  # tied weights counted once
        assert model.config.num_parameters == expected == sum(p.numel() for p in model.parameters()), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("name", ["llama3-rope-scaling", "qwen3-qknorm-headdim32-gqa4", "qwen2-bias-tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_mixed_batch_is_as_accurate_as_transformers(checkpoints, name, dtype):
    """On CUDA our error against float32 CPU logits is no worse than transformers' own in ``dtype``."""
    reference, _, directory = checkpoints(name)
    model = load_model(str(directory), dtype, "cuda").model
    sequences = {0: prompt(6, 13), 1: prompt(7, 9)}
    expected = {sid: reference_logits(reference, tokens) for sid, tokens in sequences.items()}
    reference_on_device = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).cuda().eval()
    with torch.no_grad():
        theirs = {sid: reference_on_device(torch.tensor([tokens], device="cuda")).logits[0].float().cpu()
                  for sid, tokens in sequences.items()}
    runner = PagedRunner(model, seed=3)
    ours = {0: [], 1: []}
    for step in ([(0, 0, 7), (1, 0, 4)], [(0, 7, 1), (1, 4, 5)], [(0, 8, 5)]):
        chunks = [(sid, sequences[sid][start : start + length], start) for sid, start, length in step]
        for (sid, _, _), logits in zip(step, runner.step(chunks)):
            ours[sid].append(logits)
    for sid in sequences:
        our_error = (torch.cat(ours[sid]) - expected[sid]).abs().max().item()
        their_error = (theirs[sid] - expected[sid]).abs().max().item()
        assert our_error <= 2 * their_error + 1e-3, (sid, our_error, their_error)


def _bfloat16_cpu_logits(directory, sequences: dict, pack: bool) -> dict:
    """Logits of a bf16 CPU model run as the engine merges (and, with ``pack``, packs) it."""
    model = load_model(str(directory), torch.bfloat16, "cpu").model
    model.merge_projections(transpose_weight=not pack)
    if pack:
        model.pack_for_onednn()
    runner = PagedRunner(model, seed=3)
    ours = {sid: [] for sid in sequences}
    for step in ([(0, 0, 7), (1, 0, 4)], [(0, 7, 1), (1, 4, 5)], [(0, 8, 1), (1, 9, 1)], [(0, 9, 4)]):
        chunks = [(sid, sequences[sid][start : start + length], start) for sid, start, length in step]
        for (sid, _, _), logits in zip(step, runner.step(chunks)):
            ours[sid].append(logits.float())
    return {sid: torch.cat(rows) for sid, rows in ours.items()}


@pytest.mark.skipif(not onednn_packs_weights(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16 here")
@pytest.mark.parametrize("name", ["llama-gqa4-tied", "qwen2-bias-tied", "qwen3-qknorm-headdim32-gqa4"])
def test_cpu_bfloat16_packed_weights_are_as_accurate_as_transformers(checkpoints, name):
    """Packed oneDNN weights (bf16 on a CPU) change no logit, and bf16 stays as close as transformers' own."""
    reference, _, directory = checkpoints(name)
    sequences = {0: prompt(6, 13), 1: prompt(7, 10)}
    expected = {sid: reference_logits(reference, tokens) for sid, tokens in sequences.items()}
    bf16_reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        theirs = {sid: bf16_reference(torch.tensor([tokens])).logits[0].float() for sid, tokens in sequences.items()}
    packed = _bfloat16_cpu_logits(directory, sequences, pack=True)
    plain = _bfloat16_cpu_logits(directory, sequences, pack=False)
    for sid in sequences:
        torch.testing.assert_close(packed[sid], plain[sid], atol=0, rtol=0)
        our_error = (packed[sid] - expected[sid]).abs().max().item()
        their_error = (theirs[sid] - expected[sid]).abs().max().item()
        assert our_error <= 2 * their_error + 1e-3, (sid, our_error, their_error)
