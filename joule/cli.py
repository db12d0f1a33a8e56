"""The `joule` command: generate, chat, info, serve, bench, simulate, plan, perf."""

from __future__ import annotations

import argparse
import sys
import time


def _build_parser() -> argparse.ArgumentParser:
    from joule.cli_args import add_engine_arguments

    parser = argparse.ArgumentParser(prog="joule", description="Joule LLM inference engine")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete prompts offline")
    add_engine_arguments(generate)
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--prompts-file", help="a text file with one prompt per line")
    _add_sampling_arguments(generate)
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    constraint = generate.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="SCHEMA", help="a JSON schema the output must match "
                            "(inline JSON, or @FILE)")
    constraint.add_argument("--grammar-file", metavar="FILE", help="a GBNF (as llama.cpp's) or Lark grammar file")
    constraint.add_argument("--regex", help="a regular expression the output must match")
    constraint.add_argument("--choice", action="append", help="an allowed output (repeatable)")

    chat = commands.add_parser("chat", help="interactive streaming chat that keeps history")
    add_engine_arguments(chat)
    _add_sampling_arguments(chat, default_max_tokens=256)
    chat.add_argument("--system", default=None, help="system prompt")

    info = commands.add_parser("info", help="architecture, parameters, dtype and KV capacity")
    add_engine_arguments(info)

    from joule.server.cli import add_serve_arguments

    add_serve_arguments(commands.add_parser("serve", help="OpenAI-compatible HTTP server"))

    from joule.perf.cli import add_perf_commands

    add_perf_commands(commands)  # simulate, plan, perf calibrate/validate

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    from joule.bench.serve import add_serve_bench_arguments
    from joule.bench.throughput import add_throughput_arguments

    add_throughput_arguments(bench_commands.add_parser("throughput", help="offline throughput"))
    from joule.bench.latency import add_latency_arguments

    add_latency_arguments(bench_commands.add_parser("latency", help="single-stream decode vs the memory roofline"))
    add_serve_bench_arguments(bench_commands.add_parser("serve", help="load an OpenAI-compatible server"))
    return parser


def _add_sampling_arguments(parser: argparse.ArgumentParser, default_max_tokens: int = 64) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=default_max_tokens)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")


def _sampling_params(args):
    from joule import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
        structured_outputs=_structured_outputs(args),
    )


def _structured_outputs(args):
    """``joule generate``'s constraint flags as StructuredOutputsParams (None without one)."""
    from joule import StructuredOutputsParams

    schema = getattr(args, "json_schema", None)
    if schema is not None:
        if schema.startswith("@"):
            with open(schema[1:], encoding="utf-8") as handle:
                schema = handle.read()
        return StructuredOutputsParams(json=schema)
    if getattr(args, "grammar_file", None):
        with open(args.grammar_file, encoding="utf-8") as handle:
            return StructuredOutputsParams(grammar=handle.read())
    if getattr(args, "regex", None):
        return StructuredOutputsParams(regex=args.regex)
    if getattr(args, "choice", None):
        return StructuredOutputsParams(choice=args.choice)
    return None


def _make_llm(args):
    from joule.cli_args import engine_config_from_args
    from joule.llm import LLM

    config = engine_config_from_args(args)
    return LLM(**{name: getattr(config, name) for name in config.__dataclass_fields__})


def _run_generate(args) -> int:
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as handle:
            prompts = [line.rstrip("\n") for line in handle if line.strip()]
    else:
        prompts = args.prompt or ["The three most useful things to know about energy-efficient computing are"]
    llm = _make_llm(args)
    params = _sampling_params(args)
    started = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": prompt}] for prompt in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    generated = 0
    for prompt, output in zip(prompts, outputs):
        print(f"\n### Prompt: {prompt!r}")
        if output.error is not None:
            print(f"error: {output.error}")
            continue
        completion = output.outputs[0]
        generated += len(completion.token_ids)
        print(f"### Output ({len(completion.token_ids)} tokens, finish: {completion.finish_reason}):")
        print(completion.text)
    print(f"\n{len(prompts)} prompts, {generated} output tokens in {elapsed:.2f} s: {generated / elapsed:.1f} tok/s")
    return 0


def _run_chat(args) -> int:
    from joule.chat_cli import run_chat

    return run_chat(_make_llm(args), _sampling_params(args), system=args.system)


def _run_info(args) -> int:
    llm = _make_llm(args)
    engine = llm.llm_engine
    config = engine.model_config
    parameters = config.num_parameters
    rows = [
        ("model path", str(engine.model_path)),
        ("architecture", config.architecture),
        ("parameters", f"{parameters:,}"),
        ("layers / hidden / heads / kv heads / head dim",
         f"{config.num_hidden_layers} / {config.hidden_size} / {config.num_attention_heads} / "
         f"{config.num_key_value_heads} / {config.head_dim}"),
        ("vocab", f"{config.vocab_size:,}"),
        ("dtype", str(engine.dtype).removeprefix("torch.")),
        ("device", str(engine.device)),
        ("KV cache capacity", f"{engine.kv_capacity_tokens:,} tokens in {engine.block_manager.num_blocks:,} blocks"),
        ("max_model_len", f"{engine.max_model_len:,}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _run_generate(args)
        if args.command == "chat":
            return _run_chat(args)
        if args.command == "info":
            return _run_info(args)
        if args.command in ("simulate", "plan", "perf"):
            from joule.perf.cli import run_perf_command

            return run_perf_command(args)
        if args.command == "serve":
            from joule.server.cli import run_serve

            return run_serve(args)
        if args.command == "bench" and args.bench_command == "latency":
            from joule.bench.latency import run_latency

            return run_latency(args)
        if args.command == "bench" and args.bench_command == "serve":
            from joule.bench.serve import run_serve_bench

            return run_serve_bench(args)
        if args.command == "bench":
            from joule.bench.throughput import run_throughput

            return run_throughput(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
