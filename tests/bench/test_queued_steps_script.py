"""benchmarks/gpu/queued_steps.py on the CPU with a tiny model and the lookahead forced on: every condition runs,
the engine is left as it was (its executor unwrapped, no request or KV block held), and the JSON has each one."""

from __future__ import annotations

import json

from helpers.scripts import BENCHMARKS, load_script

script = load_script(BENCHMARKS / "gpu" / "queued_steps.py", "queued_steps")
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "torch_dtype": "float32"}


def test_every_condition_is_timed_and_saved(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(TINY))
    engines = []
    original = script.build_engine
    monkeypatch.setattr(script, "build_engine", lambda *args: engines.append(original(*args)) or engines[-1])
    out = tmp_path / "queued.json"
    results = script.main([str(out), "--model", str(tmp_path / "model"), "--rows", "3", "--context", "12",
                           "--steps", "4", "--rounds", "1", "--lookahead"])
    conditions = [(result.outputs, result.metered, result.recorded) for result in results]
    assert conditions == [(kind.value, metered, recorded) for kind, metered, recorded in script.CONDITIONS]
    assert all(result.step_ms > 0 and result.pace_ms > 0 for result in results)
    saved = json.loads(out.read_text())
    assert saved["rows"] == 3 and len(saved["results"]) == len(script.CONDITIONS)
    engine = engines[0]
    assert engine.core.decode_lookahead and not isinstance(engine.core.executor, script.RecordingExecutor)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
