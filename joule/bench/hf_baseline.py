"""Hugging Face transformers `generate` on the same prompts, as the peer in the same run."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from joule.bench.workload import SyntheticRequest


def run_transformers_generate(
    model_path: Path, requests: list[SyntheticRequest], dtype: torch.dtype, device: torch.device, batch_size: int,
    model: torch.nn.Module | None = None,
) -> dict:
    """Batched greedy generate with a fixed output length; prompts of equal length need no padding.

    ``model``: one already loaded by ``hf_continuous.load_transformers_model`` (repeated runs load it once).
    """
    if model is None:
        from joule.bench.hf_continuous import load_transformers_model

        model = load_transformers_model(model_path, dtype, device)  # random weights for a config-only directory
    started = time.perf_counter()
    output_tokens = 0
    for begin in range(0, len(requests), batch_size):
        batch = requests[begin : begin + batch_size]
        lengths = {len(request.prompt_token_ids) for request in batch}
        outputs = {request.output_len for request in batch}
        if len(lengths) != 1 or len(outputs) != 1:
            raise ValueError("the transformers baseline needs equal input and output lengths within a batch")
        input_ids = torch.tensor([request.prompt_token_ids for request in batch], device=device)
        new_tokens = outputs.pop()
        with torch.inference_mode():
            generated = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        output_tokens += (generated.shape[1] - input_ids.shape[1]) * generated.shape[0]
    elapsed = time.perf_counter() - started
    return {"engine": "transformers generate", "elapsed_s": elapsed, "output_tokens": output_tokens,
            "output_tok_per_s": output_tokens / elapsed, "batch_size": batch_size}
