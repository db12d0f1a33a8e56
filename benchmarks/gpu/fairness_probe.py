"""Where a light tenant's TTFT tail comes from under a flood: one `joule serve` (fair policy), the light tenant
alone and then beside the flood (as serve_goodput.py's fairness runs), with py-spy sampling the API process and
the engine process (on-CPU stacks, collapsed) in the middle of the flooded run.

Usage (GPU machine): PYTHONPATH=. python benchmarks/gpu/fairness_probe.py --out $OUT [--py-spy /tmp/site/bin/py-spy]
    [--server-args "--fair-prompt-cap 128"] [--heavy-rate 67.1] [--duration-s 30]
CPU smoke run: python benchmarks/gpu/fairness_probe.py --tiny --out /tmp/probe --heavy-rate 12 --duration-s 3
Writes OUT/probe.json (TTFTs, the server's pauses), OUT/requests.jsonl.gz and OUT/steps.jsonl.gz (the server's request
and step logs, replayed in the simulator at the end: OUT/replay.json) and OUT/pyspy-*.txt (collapsed stacks, when
py-spy runs).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _serve_goodput():
    spec = importlib.util.spec_from_file_location("serve_goodput", HERE / "serve_goodput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def sample_stacks(py_spy: str, pid: int, delay_s: float, duration_s: float, out: Path, log) -> threading.Thread:
    """py-spy on ``pid`` and its children after ``delay_s``, for ``duration_s``; non-blocking sampling, so the
    server is not paused by the sampler."""

    def record() -> None:
        import time

        time.sleep(delay_s)
        command = [py_spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--rate", "200",
                   "--format", "raw", "--duration", str(max(1, round(duration_s))),  # py-spy takes whole seconds
                   "--output", str(out)]
        result = subprocess.run(command, capture_output=True, text=True)
        log(f"py-spy exited {result.returncode}: {(result.stderr or result.stdout)[-400:].strip()}")

    thread = threading.Thread(target=record, daemon=True)
    thread.start()
    return thread


def top_frames(collapsed: Path, limit: int = 30) -> list[tuple[str, int]]:
    """Inclusive sample counts of each (process: api or engine, function) in a py-spy raw (collapsed) file."""
    counts: dict[str, int] = {}
    for line in collapsed.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        frames = stack.split(";")[1:]  # the first names the process, the same for the spawned child here
        process = "engine" if any(frame.startswith("_engine_process_main ") for frame in frames) else "api"
        for frame in dict.fromkeys(frames):
            key = f"{process} | {frame.split(' (')[0]}"
            counts[key] = counts.get(key, 0) + int(number)
    return sorted(counts.items(), key=lambda item: -item[1])[:limit]


STAGES = {  # server-side parts of a request's TTFT, from the request log (joule/server/request_log.py)
    "queue": ("arrival", "first_scheduled"),  # waiting for the step in flight and for admission
    "own step": ("first_scheduled", "first_token"),  # the step(s) that computed its prompt
    "handover": ("first_token", "first_token_handed_over"),  # engine process -> API event loop
    "server ttft": ("arrival", "first_token_handed_over"),
}


def server_side_breakdown(records: list[dict], tenant: str, since: float = float("-inf"),
                          until: float = float("inf")) -> dict:
    """p50 / p90 / p99 (ms) of each TTFT stage for ``tenant``'s requests that arrived in [since, until)."""
    chosen = [record for record in records if record.get("tenant") == tenant and since <= record["arrival"] < until
              and all(record.get(field) is not None for pair in STAGES.values() for field in pair)]
    summary: dict = {"requests": len(chosen)}
    for stage, (start, end) in STAGES.items():
        values = sorted(1000 * (record[end] - record[start]) for record in chosen)
        if values:
            summary[stage] = {f"p{q}": round(values[min(len(values) - 1, int(q / 100 * len(values)))], 2)
                              for q in (50, 90, 99)}
    return summary


def replay_in_simulator(out: Path, server_args: list[str]) -> None:
    """The server's own requests (solo and flooded runs, warm-up included) through the simulator with the shipped
    profile of this device, and its logged steps predicted one by one (`joule simulate --replay-log`): whether the
    server's latencies differ from the simulation through slower steps or through other steps."""
    from joule.perf.cli import main as perf_main

    def flag(name: str, default: str | None = None) -> str | None:
        return server_args[server_args.index(name) + 1] if name in server_args else default

    hardware = "CPU-2core"
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            hardware = next((kind for kind in ("H200", "H100") if kind in name), hardware)
    except ImportError:
        pass
    command = ["simulate", "--model", flag("--model"), "--hardware", hardware, "--dtype", flag("--dtype", "bfloat16"),
               "--scheduling-policy", "fair", "--max-num-batched-tokens", flag("--max-num-batched-tokens", "2048"),
               "--max-model-len", flag("--max-model-len", "4096"), "--replay-log", str(out / "requests.jsonl.gz"),
               "--step-log", str(out / "steps.jsonl.gz"), "--output-json", str(out / "replay.json")]
    if "--no-fair-keep-up" in server_args:
        command.append("--no-fair-keep-up")
    print(f"\nreplayed in the simulator ({hardware} profile): joule {' '.join(command)}")
    try:
        perf_main(command)
    except Exception as error:  # the probe's own results stand without it
        print(f"replay failed: {type(error).__name__}: {error}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU")
    parser.add_argument("--heavy-rate", type=float, default=67.1)
    parser.add_argument("--duration-s", type=float, default=30.0, help="seconds of light traffic per run")
    parser.add_argument("--chunk-budget", type=int, default=2048)
    parser.add_argument("--server-args", default="", help="more `joule serve` flags")
    parser.add_argument("--py-spy", default=shutil.which("py-spy"), help="py-spy binary (default: on PATH)")
    args = parser.parse_args(argv)
    goodput = _serve_goodput()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scale = replace(goodput.TINY if args.tiny else goodput.GPU, fairness_duration_s=args.duration_s)
    engine_args = list(scale.engine_args)
    if args.tiny:
        sys.path.insert(0, str(goodput.REPO / "tests"))
        from server.tiny_server_model import build_tiny_chat_model

        model_dir = out / "tiny-model"
        if not (model_dir / "config.json").exists():
            model_dir.mkdir(parents=True, exist_ok=True)
            build_tiny_chat_model(model_dir)
        engine_args = ["--model", str(model_dir), *engine_args]
    server_args = [*engine_args, "--max-num-batched-tokens", str(args.chunk_budget), "--scheduling-policy", "fair",
                   "--request-log", str(out / "requests.jsonl"), "--step-log", str(out / "steps.jsonl.gz"),
                   *shlex.split(args.server_args)]
    logs = Path(tempfile.mkdtemp(prefix="fairness-probe-"))
    results: dict = {"server_args": server_args, "heavy_rate": args.heavy_rate}
    with goodput.Server("probe", server_args, logs, scale) as server:
        solo = goodput.fairness_run(server, scale, None)
        sampler = None
        if args.py_spy:
            sampler = sample_stacks(args.py_spy, server.process.pid, goodput.FLOOD_LEAD_S + args.duration_s / 3,
                                    args.duration_s / 3, out / "pyspy-flooded.txt", goodput.log)
        flood_started = time.time()
        flooded = goodput.fairness_run(server, scale, args.heavy_rate)
        if sampler is not None:
            sampler.join(60)
    for label, run in (("solo", solo), ("fair", flooded)):
        results[label] = goodput.light_ttft(run)
        results[label]["light_ttfts_ms"] = [round(1000 * r.ttft, 2) for r in run.light.runs[0].results
                                            if r.tenant == "light" and r.success]
        results[label]["heavy_output_tok_s"] = (run.heavy_output_tokens / run.heavy_duration_s
                                                if run.heavy_duration_s else None)
    ratio = results["fair"]["light_p99_ttft_ms"] / results["solo"]["light_p99_ttft_ms"]
    results["p99_ttft_vs_solo"] = ratio
    (out / "probe.json").write_text(json.dumps(results, indent=2))
    request_log = out / "requests.jsonl"
    if request_log.exists():
        records = [json.loads(line) for line in request_log.read_text().splitlines() if line.strip()]
        results["solo"]["server_side_ms"] = server_side_breakdown(records, "light", until=flood_started)
        results["fair"]["server_side_ms"] = server_side_breakdown(records, "light", since=flood_started)
        # The flood's own wait: what --fair-keep-up is for (the fixed cap, --no-fair-keep-up, left it queued seconds).
        results["fair"]["heavy_server_side_ms"] = server_side_breakdown(records, "heavy", since=flood_started)
        (out / "probe.json").write_text(json.dumps(results, indent=2))
    if request_log.exists():  # one file, compressed: a device call returns few files
        with request_log.open("rb") as source, gzip.open(out / "requests.jsonl.gz", "wb") as target:
            shutil.copyfileobj(source, target)
        request_log.unlink()
    if (out / "requests.jsonl.gz").exists() and (out / "steps.jsonl.gz").exists():
        replay_in_simulator(out, server_args)
    stacks = out / "pyspy-flooded.txt"
    if stacks.exists():
        print("\nhottest frames (inclusive samples) while flooded:")
        for frame, count in top_frames(stacks):
            print(f"  {count:7d}  {frame}")
    for label in ("solo", "fair"):
        row = results[label]
        print(f"{label:5} light p99 {row['light_p99_ttft_ms']:8.1f} ms  p50 {row['light_p50_ttft_ms']:7.1f} ms  "
              f"pauses: {goodput.format_pauses(row['server_pauses'])}")
    for label in ("solo", "fair"):
        breakdown = results[label].get("server_side_ms", {})
        parts = "  ".join(f"{stage} {values['p50']}/{values['p99']}" for stage, values in breakdown.items()
                          if stage != "requests")
        if parts:
            print(f"{label:5} server side, light requests, p50/p99 ms: {parts}")
    heavy = results["fair"].get("heavy_server_side_ms", {}).get("server ttft")
    if heavy:
        print(f"fair  heavy tenant server TTFT p50/p90/p99 ms: {heavy['p50']}/{heavy['p90']}/{heavy['p99']}")
    print(f"SUMMARY fair light p99 TTFT {results['fair']['light_p99_ttft_ms']:.1f} ms = {ratio:.2f}x solo "
          f"(heavy {results['fair']['heavy_output_tok_s'] or 0:.0f} output tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
