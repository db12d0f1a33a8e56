"""benchmarks/cpu/step_parts.py on a tiny model: every step is listed with its faults, and a full decode step's parts
are timed and add up to no more than the step."""

from __future__ import annotations

import json

from helpers.scripts import BENCHMARKS, load_script

script = load_script(BENCHMARKS / "cpu" / "step_parts.py", "step_parts")
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "torch_dtype": "float32"}


def test_steps_and_a_decode_steps_parts_are_reported(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (run,) = script.main(["--model", str(tmp_path), "--dtype", "float32", "--num-prompts", "3", "--input-len", "20",
                          "--output-len", "5", "--runs", "1", "--load-format", "dummy"], patch=monkeypatch.setattr)
    assert run["output_tok_per_s"] > 0
    measured = run["steps"][2:]  # after the run's warm-up request
    assert sum(prompt for prompt, _, _, _ in measured) == 3 * 20
    assert sum(decode for _, decode, _, _ in measured) == 3 * 4  # the first token of each comes from its prompt step
    parts = run["decode_step_ms"]
    assert parts["GEMMs"] > 0 and parts["RMSNorm"] > 0 and parts["attention"] > 0
    assert parts["model forward"] <= parts["step"] and parts["GEMMs"] + parts["attention"] <= parts["model forward"]
    assert "decode steps of 3 rows" in capsys.readouterr().out
