"""The sampling features built on the CPU, checked once on a GPU (CUDA graphs, the lookahead, Triton attention):
prompt logprobs, logit_bias and structured outputs, beside plain requests in the same batches.

A tiny random Llama (vocabulary and tokenizer of the default model, whose tokenizer files are passed in) runs in
bf16 on CUDA and in float32 on the CPU; the CPU run is the reference for prompt logprobs.

Usage: PYTHONPATH=. python benchmarks/gpu/features_check.py TOKENIZER_DIR OUT.json [DEVICE (cuda)]
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from joule import LLM, SamplingParams, StructuredOutputsParams

MOOD = {
    "type": "object",
    "properties": {"mood": {"enum": ["happy", "sad"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["mood", "score", "tags"],
    "additionalProperties": False,
}


def build_model(tokenizer_dir: Path, directory: Path) -> Path:
    import transformers

    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.05)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def prompt_logprob_values(output) -> list[float]:
    return [next(iter(entry.values())).logprob for entry in output.prompt_logprobs[1:]]


def main() -> None:
    tokenizer_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
    directory = build_model(tokenizer_dir, Path(tempfile.mkdtemp()))
    results = {}
    prompts = [f"Request {index}: tell me about the number {index * 37} and why it matters. " * (1 + index % 3)
               for index in range(16)]

    cpu = LLM(model=str(directory), device="cpu", dtype="float32", max_model_len=1024)
    gpu = LLM(model=str(directory), device=device, dtype="bfloat16", max_model_len=1024, max_num_batched_tokens=64)
    scored = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=2)
    reference = cpu.generate(prompts[:4], scored, use_tqdm=False)
    for attempt in range(2):  # the second call finds the prompts cached and must score them anyway
        outputs = gpu.generate(prompts[:4], scored, use_tqdm=False)
        gaps = [max(abs(a - b) for a, b in zip(prompt_logprob_values(got), prompt_logprob_values(want)))
                for got, want in zip(outputs, reference)]
        lengths_ok = all(len(got.prompt_logprobs) == len(got.prompt_token_ids) for got in outputs)
        results[f"prompt_logprobs_call{attempt + 1}_max_gap_vs_cpu_fp32"] = max(gaps)
        results[f"prompt_logprobs_call{attempt + 1}_ok"] = lengths_ok and max(gaps) < 0.1

    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = gpu.generate(prompts, greedy, use_tqdm=False)
    constrained = SamplingParams(temperature=0.8, seed=5, max_tokens=48,
                                 structured_outputs=StructuredOutputsParams(json=MOOD))
    biased = greedy.clone(logit_bias={1234: 100.0})
    regex = SamplingParams(temperature=1.0, seed=9, max_tokens=12,
                           structured_outputs=StructuredOutputsParams(regex=r"[a-z]{3}-\d{2}"))
    params = [constrained if index % 4 == 0 else biased if index % 4 == 1 else regex if index % 4 == 2 else greedy
              for index in range(16)]
    mixed = gpu.generate(prompts, params, use_tqdm=False)
    json_ok = regex_ok = bias_ok = neighbours_ok = True
    for index, output in enumerate(mixed):
        text, tokens = output.outputs[0].text, output.outputs[0].token_ids
        if index % 4 == 0:
            try:
                value = json.loads(text)
                json_ok &= set(value) == {"mood", "score", "tags"} and value["mood"] in ("happy", "sad")
            except ValueError:
                json_ok = False
        elif index % 4 == 1:
            bias_ok &= tokens == [1234] * 16
        elif index % 4 == 2:
            regex_ok &= re.fullmatch(r"[a-z]{3}-\d{2}", text) is not None
        else:
            neighbours_ok &= tokens == plain[index].outputs[0].token_ids
    results.update(structured_json_ok=json_ok, structured_regex_ok=regex_ok, logit_bias_ok=bias_ok,
                   greedy_neighbours_unchanged=neighbours_ok, decode_lookahead=gpu.llm_engine.core.decode_lookahead,
                   sample_json=mixed[0].outputs[0].text, sample_regex=mixed[2].outputs[0].text)
    out_path.write_text(json.dumps(results, indent=2))
    width = max(len(key) for key in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value}")
    failed = [key for key, value in results.items() if key.endswith("_ok") and value is not True]
    print("FEATURES", "FAIL: " + ", ".join(failed) if failed else "PASS")


if __name__ == "__main__":
    main()
