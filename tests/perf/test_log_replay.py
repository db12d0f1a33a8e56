"""`joule simulate --replay-log`: a server's request log sent through the simulator."""

from __future__ import annotations

import gzip
import json

import pytest

from joule.perf.cli import main
from joule.perf.log_replay import logged_latencies, read_request_log, replay_requests

BASE_TIME = 1_796_000_000.0  # logs carry time.time() stamps
SIMULATE = ["simulate", "--model", "qwen3-0.6b", "--hardware", "H100", "--scheduling-policy", "fair",
            "--max-num-batched-tokens", "512"]


def _log_line(request: dict) -> str:
    """What `joule serve --request-log` writes for a request that ended, from a simulated request's row."""
    arrival = BASE_TIME + request["arrival_s"]
    return json.dumps({
        "request_id": request["request_id"], "tenant": request["tenant"], "prompt_tokens": request["prompt_len"],
        "cached_tokens": 0, "generated_tokens": request["output_tokens"], "finish_reason": "length",
        "arrival": arrival, "first_scheduled": arrival, "first_token": arrival + request["ttft_s"],
        "first_token_handed_over": arrival + request["ttft_s"], "finished": arrival + request["e2el_s"],
        "num_preemptions": 0, "energy_joules": 1.0,
    })


def test_replaying_a_simulated_runs_log_gives_back_its_latencies(tmp_path, capsys):
    """A log made from a simulated run, replayed with the same engine settings, is simulated exactly as logged:
    same arrivals, tenants and lengths make the same steps (the prompts differ, and neither run has cache hits)."""
    first = tmp_path / "first.json"
    assert main([*SIMULATE, "--workload", "input=uniform:64:700,output=uniform:4:40,num=30,rate=40,seed=5",
                 "--tenant", "light:rate=5,num=6,input=fixed:48,output=fixed:8", "--tenant", "heavy:share=1",
                 "--per-request", "--output-json", str(first)]) == 0
    rows = json.loads(first.read_text())[0]["requests"]
    log = tmp_path / "requests.jsonl.gz"
    with gzip.open(log, "wt") as handle:
        handle.write("\n".join(_log_line(row) for row in rows) + "\n")
        handle.write(json.dumps({"request_id": "gone", "tenant": "heavy", "prompt_tokens": 9, "generated_tokens": 0,
                                 "finish_reason": "abort", "finished": BASE_TIME}) + "\n")
    capsys.readouterr()
    second = tmp_path / "second.json"
    assert main([*SIMULATE, "--replay-log", str(log), "--per-request", "--output-json", str(second)]) == 0
    printed = capsys.readouterr().out
    assert "1 aborted or incomplete left out" in printed
    assert "tenant light" in printed and "TTFT p50 ms" in printed
    replayed = json.loads(second.read_text())[0]
    assert replayed["logged_requests_left_out"] == 1
    again = replayed["requests"]
    assert [(r["tenant"], r["prompt_len"], r["output_tokens"]) for r in again] == \
        [(r["tenant"], r["prompt_len"], r["output_tokens"]) for r in rows]
    for before, after in zip(rows, again):
        assert after["arrival_s"] == pytest.approx(before["arrival_s"] - rows[0]["arrival_s"], abs=1e-6)
        assert after["ttft_s"] == pytest.approx(before["ttft_s"], abs=1e-6)  # log stamps: ~0.2 us of rounding
        assert after["e2el_s"] == pytest.approx(before["e2el_s"], abs=1e-6)
    logged = replayed["logged"]
    assert logged["output_throughput"] == pytest.approx(replayed["output_throughput"], rel=1e-4)
    for tenant in ("light", "heavy"):  # over the whole run, as the simulator counts a tenant's throughput
        assert logged["tenants"][tenant]["output_throughput"] == pytest.approx(
            replayed["tenants"][tenant]["output_throughput"], rel=1e-4)
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert logged[key]["p50"] == pytest.approx(replayed[key]["p50"], rel=1e-4)
        for tenant in ("light", "heavy"):
            assert logged["tenants"][tenant][key]["p50"] == pytest.approx(replayed["tenants"][tenant][key]["p50"],
                                                                          rel=1e-4)


def test_prefix_cache_hits_in_the_log_share_leading_tokens_with_an_earlier_request(tmp_path):
    lines = [
        {"tenant": "a", "prompt_tokens": 40, "generated_tokens": 3, "arrival": 10.0, "first_token": 10.5,
         "finished": 11.0},
        {"tenant": "b", "prompt_tokens": 20, "generated_tokens": 3, "arrival": 10.2, "first_token": 10.6,
         "finished": 11.0},
        {"tenant": "a", "prompt_tokens": 50, "cached_tokens": 32, "generated_tokens": 5, "arrival": 10.4,
         "first_token": 10.7, "finished": 11.3},
        {"tenant": None, "prompt_tokens": 8, "cached_tokens": 64, "generated_tokens": 1, "arrival": 10.1,
         "first_token": 10.15, "finished": 10.15},
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    log = read_request_log(path)
    assert [record["arrival"] for record in log.records] == [10.0, 10.1, 10.2, 10.4]  # in arrival order
    requests = replay_requests(log, vocab_size=1000, seed=3)
    assert [r.arrival_time for r in requests] == pytest.approx([0.0, 0.1, 0.2, 0.4])
    assert [r.tenant for r in requests] == ["a", None, "b", "a"]
    assert [len(r.request.prompt_token_ids) for r in requests] == [40, 8, 20, 50]
    assert [r.request.output_len for r in requests] == [3, 1, 3, 5]
    # 32 cached tokens: lent by the latest earlier prompt at least 32 long (the first one; the 20-token one is short).
    assert requests[3].request.prompt_token_ids[:32] == requests[0].request.prompt_token_ids[:32]
    assert requests[3].request.prompt_token_ids[32:] != requests[0].request.prompt_token_ids[32:40]
    # More cached than its own prompt: the whole prompt is lent; the one with nothing cached lends nothing.
    assert requests[1].request.prompt_token_ids == requests[0].request.prompt_token_ids[:8]
    assert requests[2].request.prompt_token_ids[:8] != requests[0].request.prompt_token_ids[:8]
    latencies = logged_latencies(log)
    assert latencies["num_requests"] == 4
    assert latencies["tenants"]["a"]["ttft_s"]["p50"] == pytest.approx(0.4)
    assert latencies["tenants"]["a"]["tpot_s"]["p50"] == pytest.approx((0.5 / 2 + 0.6 / 4) / 2)


def test_unreadable_logs_are_clear_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_request_log(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"request_id": "x", "finish_reason": "abort", "finished": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no finished request"):
        read_request_log(empty)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt_tokens": 8, "generated_tokens": 2, "arrival": 1.0, "first_token": 1.1,
                                "finished": 1.2}) + "\n")
    assert main([*SIMULATE, "--replay-log", str(good), "--tenant", "a:rate=1"]) == 2
    assert "drop --tenant" in capsys.readouterr().err
    assert main([*SIMULATE, "--workload", "num=2", "--step-log", str(good)]) == 2
    assert "--step-log goes with --replay-log" in capsys.readouterr().err


def test_a_step_log_is_predicted_step_by_step_beside_the_replay(tmp_path, capsys):
    from joule.perf.simulator import ReplicaConfig
    from joule.perf.step_log import read_step_log
    from joule.perf.step_model import StepModel
    from joule.perf.cli import load_model_config

    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"tenant": "a", "prompt_tokens": 300, "generated_tokens": 3, "arrival": 5.0,
                                    "first_token": 5.02, "finished": 5.05}) + "\n")
    rows = [  # as `joule serve --step-log` writes them: the prompt, then two decodes, 25 and 9 ms measured
        {"scenario": "server", "kind": "prefill", "num_sequences": 1, "num_tokens": 300, "measured_s": 0.025,
         "predicted_s": 0.0, "sequences": [[300, 0, 1, 0]], "after_idle": True, "time": 5.0},
        {"scenario": "server", "kind": "decode", "num_sequences": 1, "num_tokens": 1, "measured_s": 0.009,
         "predicted_s": 0.0, "sequences": [[1, 300, 1, 0]], "time": 5.03},
        {"scenario": "server", "kind": "decode", "num_sequences": 1, "num_tokens": 1, "measured_s": 0.009,
         "predicted_s": 0.0, "sequences": [[1, 301, 1, 1]], "time": 5.04},
    ]
    steps = tmp_path / "steps.jsonl"
    steps.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    output = tmp_path / "out.json"
    assert main([*SIMULATE, "--replay-log", str(requests), "--step-log", str(steps), "--output-json", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "logged steps: 3" in printed and "logged: 1 steps carried prompt tokens, per step p50 300" in printed
    logged = json.loads(output.read_text())[0]["logged_steps"]
    assert logged["prompt_work"]["logged"] == {"steps": 1, "p50": 300, "p90": 300, "max": 300}
    assert logged["prompt_work"]["simulated"]["max"] == 300  # one 300-token prompt, in one step under the budget
    model = StepModel(load_model_config("qwen3-0.6b"), ReplicaConfig.for_hardware("H100").profile)
    predicted = [model.predict(check.shape).elapsed_seconds for check in read_step_log(steps)]
    first = read_step_log(steps)[0].shape
    assert first.after_idle and [(s.num_new_tokens, s.context_length, s.samples) for s in first.sequences] == \
        [(300, 0, True)]
    assert read_step_log(steps)[2].shape.sequences[0].finishes
    assert logged["steps"] == 3 and logged["measured_s"] == pytest.approx(0.043)
    assert logged["predicted_s"] == pytest.approx(sum(predicted)) and logged["predicted_s"] > 0
    errors = sorted(abs(p - row["measured_s"]) / row["measured_s"] for p, row in zip(predicted, rows))
    assert logged["median_abs_error"] == pytest.approx(errors[1])
    assert set(logged["by_kind"]) == {"prefill", "decode"}
    steps.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        read_step_log(steps)
    steps.write_text(json.dumps({"scenario": "server", "unknown": 1}) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a step-log line"):
        read_step_log(steps)


def test_prompt_work_counts_the_prompt_tokens_of_steps_that_carried_any():
    from joule.perf.log_replay import prompt_work

    steps = [[1, 1, 1], [128, 1], [1, 64, 64], [300], [1]]  # new tokens per sequence; 1 = a decode
    assert prompt_work(steps) == {"steps": 3, "p50": 128, "p90": 300, "max": 300}
    assert prompt_work([[1], [1, 1]]) == {"steps": 0}
