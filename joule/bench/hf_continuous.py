"""transformers' own continuous batching (``generate_batch``, paged attention) as a peer in the same run.

``generate_batch`` schedules requests through a paged KV cache like Joule does,
so it is the fairest transformers baseline for throughput; ``generate`` with a
fixed batch is the other (``joule.bench.hf_baseline``). Benchmarks with
``load_format="dummy"`` have only a ``config.json``: the transformers model is
then built from the config with random weights too (the speed does not depend on
the values; the outputs are not compared).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from joule.bench.workload import SyntheticRequest

PAGED_ATTENTION = "paged|sdpa"  # the issue's peer (`generate_batch` over transformers' paged cache)


def load_paged_model(model_path: Path, dtype: torch.dtype, device: torch.device):
    """The model for ``generate_batch`` with ``PAGED_ATTENTION``, and the attention name it took. Why the fallback:
    recent transformers deprecate the ``paged|`` prefix (a FutureWarning announcing its removal; generate_batch
    pages the cache whatever the name); where the prefix is refused, the plain name gives the same path."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*paged\\|.*prefix", category=FutureWarning)
        try:
            return load_transformers_model(model_path, dtype, device, PAGED_ATTENTION), PAGED_ATTENTION
        except (ValueError, KeyError):
            plain = PAGED_ATTENTION.removeprefix("paged|")
            return load_transformers_model(model_path, dtype, device, plain), plain


def load_transformers_model(model_path: Path, dtype: torch.dtype, device: torch.device,
                            attn_implementation: str | None = None):
    """The checkpoint when there is one, else random weights from ``config.json``."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as error:  # an optional dependency
        raise ValueError("comparing with transformers needs it installed: pip install 'joule-llm[test]'") from error
    path = Path(model_path)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if any(path.glob("*.safetensors")):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **extra)
    else:
        config = AutoConfig.from_pretrained(str(path))
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    return model.to(device).eval()


def run_transformers_generate_batch(
    model_path: Path, requests: list[SyntheticRequest], dtype: torch.dtype, device: torch.device, repeats: int = 1,
    loaded: tuple | None = None,
) -> dict:
    """Greedy ``generate_batch`` over all prompts at once, EOS off; timed without model loading.

    ``repeats`` > 1 times it that many times on the loaded model and reports the median run (as Joule's engine
    bench reports its own; of an even count the faster middle one, so a ratio against it never flatters Joule), with
    every run's tok/s in ``runs_tok_per_s``. ``loaded``: ``load_paged_model``'s (model, attention name), so runs
    alternated with Joule's load it once."""
    from transformers import GenerationConfig

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    output_lens = {request.output_len for request in requests}
    if len(output_lens) != 1:
        raise ValueError("the transformers generate_batch baseline needs one output length for all requests")
    max_new_tokens = output_lens.pop()
    model, attention = loaded if loaded is not None else load_paged_model(model_path, dtype, device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    prompts = [list(request.prompt_token_ids) for request in requests]
    model.generate_batch(inputs=prompts[:2], generation_config=config, progress_bar=False)  # warm-up
    runs = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - started
        output_tokens = sum(len(output.generated_tokens) for output in outputs.values())
        failed = sum(1 for output in outputs.values() if getattr(output, "error", None))
        runs.append({"engine": f"transformers generate_batch ({attention})", "elapsed_s": elapsed,
                     "output_tokens": output_tokens, "output_tok_per_s": output_tokens / elapsed,
                     "requests": len(outputs), "failed_requests": failed})
    result = dict(sorted(runs, key=lambda run: run["output_tok_per_s"])[len(runs) // 2])
    result["runs_tok_per_s"] = [run["output_tok_per_s"] for run in runs]
    return result
