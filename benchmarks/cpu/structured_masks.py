"""What structured outputs cost on the host: compiling a large JSON schema, and one step's token masks.

Usage: PYTHONPATH=. python benchmarks/cpu/structured_masks.py [ROWS (32)]
Uses the default model's tokenizer (49,152 tokens). Prints milliseconds (median of 5).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from joule.model.loader import resolve_model_path
from joule.runtime.structured_output import GrammarCompiler, apply_token_masks
from joule.sampling_params import StructuredOutputsParams
from joule.tokenizer import Tokenizer


def schema(fields: int) -> dict:
    entry = {"type": "object", "required": ["name", "kind"], "properties": {
        "name": {"type": "string", "pattern": "[A-Z][a-z]+"}, "values": {"type": "array", "items": {"type": "number"}},
        "kind": {"enum": ["a", "b", "c", "d"]}}}
    properties = {f"field_{index}": entry for index in range(fields)}
    return {"type": "object", "properties": properties, "required": list(properties)[: fields // 2]}


def median_ms(work, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    tokenizer = Tokenizer.from_pretrained(resolve_model_path(None))
    compiler = GrammarCompiler(tokenizer.backend.to_str(), tokenizer.vocab_size, [tokenizer.eos_token_id])
    started = time.perf_counter()
    compiler.constraint(StructuredOutputsParams(regex="a"))
    print(f"token table (once per engine): {(time.perf_counter() - started) * 1e3:.1f} ms")
    for fields in (4, 60):
        spec = StructuredOutputsParams(json=schema(fields))
        print(f"compile a {fields}-field schema: {median_ms(lambda: compiler.constraint(spec)):.1f} ms")
        for count in (1, rows):
            constraints = [compiler.constraint(spec) for _ in range(count)]
            logits = torch.zeros(count, tokenizer.vocab_size)
            print(f"  masks for {count} rows at the start: {median_ms(lambda: apply_token_masks(logits, constraints)):.1f} ms")


if __name__ == "__main__":
    main()
