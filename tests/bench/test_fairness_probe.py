"""benchmarks/gpu/fairness_probe.py's server-side TTFT breakdown from the request log (pure function, no server)."""

from __future__ import annotations

from helpers.scripts import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "gpu" / "fairness_probe.py"


def _record(tenant, arrival, queue_ms, step_ms, handover_ms):
    scheduled = arrival + queue_ms / 1000
    first = scheduled + step_ms / 1000
    return {"tenant": tenant, "arrival": arrival, "first_scheduled": scheduled, "first_token": first,
            "first_token_handed_over": first + handover_ms / 1000}


def test_breakdown_splits_ttft_into_queue_own_step_and_handover_per_window():
    probe = load_script(SCRIPT, "fairness_probe")
    records = [_record("light", 100.0 + index, queue_ms=index, step_ms=3.0, handover_ms=0.5) for index in range(10)]
    records += [_record("heavy", 105.0, 50.0, 50.0, 5.0), {"tenant": "light", "arrival": 101.5, "first_scheduled": None,
                                                           "first_token": None, "first_token_handed_over": None}]
    everything = probe.server_side_breakdown(records, "light")
    assert everything["requests"] == 10  # the heavy one and the unfinished one are left out
    assert everything["queue"] == {"p50": 5.0, "p90": 9.0, "p99": 9.0}
    assert everything["own step"]["p50"] == 3.0 and everything["handover"]["p99"] == 0.5
    assert everything["server ttft"]["p99"] == 12.5
    early = probe.server_side_breakdown(records, "light", until=105.0)
    late = probe.server_side_breakdown(records, "light", since=105.0)
    assert early["requests"] == 5 and late["requests"] == 5 and early["queue"]["p99"] == 4.0
    assert probe.server_side_breakdown(records, "nobody") == {"requests": 0}


def test_the_probe_replays_its_server_logs_in_the_simulator(tmp_path, capsys):
    import gzip
    import json

    probe = load_script(SCRIPT, "fairness_probe")
    requests = [{"tenant": tenant, "prompt_tokens": 200, "generated_tokens": 4, "arrival": 50.0 + index / 10,
                 "first_token": 50.1 + index / 10, "finished": 50.2 + index / 10}
                for index, tenant in enumerate(["light", "heavy", "heavy", "light"])]
    steps = [{"scenario": "server", "kind": "prefill", "num_sequences": 1, "num_tokens": 200, "measured_s": 0.05,
              "predicted_s": 0.0, "sequences": [[200, 0, 1, 0]], "after_idle": True, "time": 50.0}]
    for name, rows in (("requests.jsonl.gz", requests), ("steps.jsonl.gz", steps)):
        with gzip.open(tmp_path / name, "wt") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in rows))
    server_args = ["--model", "benchmarks/configs/llama-3.2-1b", "--load-format", "dummy", "--dtype", "bfloat16",
                   "--max-num-batched-tokens", "512", "--scheduling-policy", "fair", "--no-fair-keep-up"]
    probe.replay_in_simulator(tmp_path, server_args)
    printed = capsys.readouterr().out
    assert "--max-num-batched-tokens 512" in printed and "--no-fair-keep-up" in printed
    assert "tenant light" in printed and "logged steps: 1" in printed
    replay = json.loads((tmp_path / "replay.json").read_text())[0]
    assert replay["num_requests"] == 4 and replay["logged"]["num_requests"] == 4
    assert replay["logged_steps"]["steps"] == 1 and replay["hardware"][0] in ("CPU-2core", "H100", "H200")
