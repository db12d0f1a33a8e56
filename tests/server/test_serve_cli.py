"""The flags `joule serve` and `joule bench serve` expose, as the main CLI will wire them."""

from __future__ import annotations

import argparse

import pytest

from joule.bench.serve import add_serve_bench_arguments
from joule.cli_args import engine_config_from_args
from joule.server.cli import add_serve_arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="joule")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(commands.add_parser("serve"))
    bench = commands.add_parser("bench").add_subparsers(dest="bench_command", required=True)
    add_serve_bench_arguments(bench.add_parser("serve"))
    return parser


def test_serve_takes_server_and_engine_flags():
    args = _parser().parse_args(["serve", "--model", "m", "--port", "9001", "--api-key", "k", "--served-model-name",
                                 "a", "b", "--max-queue", "8", "--max-model-len", "256", "--no-enable-prefix-caching"])
    assert (args.host, args.port, args.api_key, args.served_model_name, args.max_queue) == (
        "127.0.0.1", 9001, "k", ["a", "b"], 8)
    config = engine_config_from_args(args)
    assert (config.model, config.max_model_len, config.enable_prefix_caching) == ("m", 256, False)


def test_bench_serve_defaults_and_rates():
    from joule.bench.serve_workload import parse_rates

    args = _parser().parse_args(["bench", "serve", "--request-rate", "1,inf", "--num-prompts", "4"])
    assert parse_rates(args.request_rate) == [1.0, float("inf")] and args.num_prompts == 4
    assert (args.input_len, args.output_len, args.base_url) == ("128", "64", "http://127.0.0.1:8000")
    with pytest.raises(ValueError):
        parse_rates(_parser().parse_args(["bench", "serve", "--request-rate", "fast"]).request_rate)


def test_invalid_server_options_name_the_field():
    from joule.server.app import ServerConfig

    with pytest.raises(ValueError, match="max_queue"):
        ServerConfig(max_queue=0)
    with pytest.raises(ValueError, match="served_model_names"):
        ServerConfig(served_model_names=[])


def test_serve_abuse_guard_flags():
    from joule.server.abuse_guard import AbuseGuardConfig
    from joule.server.cli import abuse_guard_config_from_args

    defaults = abuse_guard_config_from_args(_parser().parse_args(["serve"]))
    assert defaults == AbuseGuardConfig(tenant_token_budget=None, tenant_energy_budget=None, max_tokens_cap=4096)
    args = _parser().parse_args(["serve", "--tenant-token-budget", "50000", "--tenant-energy-budget", "250.5",
                                 "--max-tokens-cap", "0"])
    assert abuse_guard_config_from_args(args) == AbuseGuardConfig(
        tenant_token_budget=50000, tenant_energy_budget=250.5, max_tokens_cap=None)
    with pytest.raises(ValueError, match="tenant_token_budget"):
        abuse_guard_config_from_args(_parser().parse_args(["serve", "--tenant-token-budget", "0"]))
    with pytest.raises(ValueError, match="max_tokens_cap"):
        abuse_guard_config_from_args(_parser().parse_args(["serve", "--max-tokens-cap", "-1"]))


def test_freezing_the_startup_heap_takes_live_objects_out_of_full_collections():
    import gc

    from joule.server.cli import freeze_startup_heap

    alive = [[index] for index in range(1000)]
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= len(alive)
        tracked = {id(item) for item in gc.get_objects()}
        assert not any(id(item) in tracked for item in alive)
    finally:
        gc.unfreeze()
    assert id(alive[0]) in {id(item) for item in gc.get_objects()}


def test_the_api_process_collector_raises_the_thresholds_and_restores_them():
    import gc

    from joule.server.cli import API_GC_THRESHOLDS, api_process_collector

    before = gc.get_threshold()
    with api_process_collector():
        assert gc.get_threshold() == API_GC_THRESHOLDS and gc.get_freeze_count() > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
