"""Compile the eager steps' kernels (attention variants, the fused gate/up GEMM) at start-up, not inside steps.

Why: Triton compiles one binary per combination of constexpr values, and an eager mixed step (more
prompt chunks than the chunk graphs take) picks its decode split count from the step itself: direct
output or a merge over 2, 4, ... 64 splits. Each new combination cost ~1 s inside some step on an
H200 (workloads 2 and 3 of issue 3 lost 2-5 s to them; a serving request's TTFT would too). The
capture of CUDA graphs compiles only the decode-only variants.

How (``ModelExecutor.compile_eager_step_kernels``): a few synthetic eager steps on the engine's own
(still empty) KV cache: one decode of context 16, 256, 512, ... up to ``max_model_len`` tokens (every
split class a step can choose), each beside a 16-token prompt chunk (a mixed step) and alone (a
decode-only step). Nothing is sampled and no block manager is involved; the blocks written are free
and get overwritten by the first requests.
"""

from __future__ import annotations

from joule.engine.plan import ScheduledSequence, StepPlan
from joule.engine.request import Request
from joule.sampling_params import SamplingParams

WARMUP_PROMPT_TOKENS = 16
FIRST_SPLIT_CONTEXT = 256  # MIN_SPLIT_TOKENS (joule.kernels.paged_decode) x 2: the shortest context that splits


def warmup_contexts(max_model_len: int) -> list[int]:
    """Decode contexts covering every power-of-two split class up to ``max_model_len``."""
    contexts = [WARMUP_PROMPT_TOKENS]
    context = FIRST_SPLIT_CONTEXT
    while context < max_model_len:
        contexts.append(context)
        context *= 2
    if max_model_len > WARMUP_PROMPT_TOKENS:
        contexts.append(max_model_len)
    return contexts


def warmup_plans(max_model_len: int, block_size: int, num_blocks: int) -> list[StepPlan]:
    """Mixed and decode-only plans over blocks ``0..``; contexts that do not fit the cache are skipped."""
    params = SamplingParams(temperature=0.0, max_tokens=1)
    prompt_blocks = -(-WARMUP_PROMPT_TOKENS // block_size)
    plans = []
    for context in warmup_contexts(max_model_len):
        decode_blocks = -(-context // block_size)
        if decode_blocks + prompt_blocks > num_blocks:
            break
        decode_request = Request(f"warmup-decode-{context}", [1] * context, params, max_tokens=1)
        decode = ScheduledSequence(decode_request, [1], context - 1, list(range(decode_blocks)), samples=True)
        prompt_request = Request(f"warmup-prompt-{context}", [1] * WARMUP_PROMPT_TOKENS, params, max_tokens=1)
        prompt_block_ids = list(range(decode_blocks, decode_blocks + prompt_blocks))
        prompt = ScheduledSequence(prompt_request, [1] * WARMUP_PROMPT_TOKENS, 0, prompt_block_ids, samples=True)
        plans.append(StepPlan(sequences=[decode, prompt]))
        plans.append(StepPlan(sequences=[decode]))
    return plans


def compile_fused_gate_up(model) -> int:
    """Compile the fused gate/up + SiLU GEMM (CUDA) before the first long step; returns how many shapes ran.

    It runs only in steps of ``FUSED_MIN_ROWS`` rows or more, which the plans above are not: graph capture and the
    memory profile run it at start-up, but an eager engine with a given KV budget runs neither, and its first
    ~8k-token step would pay the compile (~2 s). One call of zeros per weight shape."""
    import torch

    from joule.kernels.gate_up_config import FUSED_MIN_ROWS
    from joule.model.layers import GatedMLP

    compiled = set()
    for module in model.modules():
        if not isinstance(module, GatedMLP) or module.fused_tile is None or module.gate_up_proj is None:
            continue
        weight = module.gate_up_proj.weight
        key = (tuple(weight.shape), weight.dtype, module.fused_tile)
        if key in compiled:
            continue
        rows = torch.zeros((FUSED_MIN_ROWS, weight.shape[1]), dtype=weight.dtype, device=weight.device)
        if module.gate_up_proj.runs_fused_gate_up(rows):
            from joule.kernels.gate_up_silu import gate_up_silu

            gate_up_silu(rows, weight, module.fused_tile)
            compiled.add(key)
    return len(compiled)


def compile_logits_rows(model, max_rows: int) -> int:
    """The logits GEMM and the greedy argmax at every row count a step can sample (1..``max_rows``), at start-up.

    Why: the logits of a step's sampling rows are computed outside the CUDA graphs, on exactly those rows, and
    cuBLAS picks its kernel by the row count. The first launch of a kernel the process has not loaded yet held the
    host until the GPU had run everything queued: a fresh engine's first run of issue 3's workload 3 lost the decode
    lookahead's queued steps in every prompt step (each sampling 16 more rows than the last: ~17 ms of host waiting
    a step) and in the tail's shrinking batches (~3 ms a step), 28.0k against 36.7k tok/s for the next run (H100,
    2026-12-06 (n), ``w3_step_phases.py --cold``). Returns how many row counts ran."""
    import torch

    from joule.kernels.argmax import argmax_rows

    parameter = next(model.parameters())
    hidden = torch.randn((max_rows, model.config.hidden_size), dtype=parameter.dtype, device=parameter.device)
    for rows in range(1, max_rows + 1):
        argmax_rows(model.compute_logits(hidden[:rows]))
    return max_rows


def compile_last_layer_rows(model, max_rows: int) -> int:
    """The last layer's output projection and MLP at every row count a step can sample (1..``max_rows``), at
    start-up; returns how many row counts ran.

    Why: an eager prompt step runs them on its sampling rows only (``LlamaForCausalLM.forward``'s
    ``output_rows``), at row counts the decode graphs' ladder never used, and cuBLAS picks its kernel by the row
    count: the same first-load stall as ``compile_logits_rows``'."""
    import torch

    layers = model.model.layers
    if not layers or layers[-1].self_attn.qkv_proj is None:  # projections not merged: no such steps
        return 0
    layer = layers[-1]
    attention = layer.self_attn
    parameter = next(model.parameters())
    attended = torch.randn((max_rows, attention.num_heads * attention.head_dim), dtype=parameter.dtype,
                           device=parameter.device)
    residual = torch.randn((max_rows, model.config.hidden_size), dtype=parameter.dtype, device=parameter.device)
    for rows in range(1, max_rows + 1):
        layer.feed_forward(*attention.o_proj.project_onto(attended[:rows], residual[:rows]))
    return max_rows
