"""What one engine-loop report costs to cross to the API process: 256 streams' DELTA outputs pickled and
unpickled, with each output's prompt token ids (as every output carried them before 2026-12-04 g) and without
(every output after a request's first tokens now).

Usage: PYTHONPATH=. python benchmarks/cpu/report_pickle.py [--streams 256] [--prompt-len 300]
"""

from __future__ import annotations

import argparse
import pickle
import time

from joule.outputs import CompletionOutput, RequestMetrics, RequestOutput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=300)
    args = parser.parse_args()
    for prompt_len in (args.prompt_len, 0):
        outputs = [RequestOutput(f"chatcmpl-{index}", None, list(range(prompt_len)),
                                 [CompletionOutput(0, "tok", [5], None, None)], False,
                                 RequestMetrics(1.0, 1.1, 1.2, 1.3, None, 0.1, 0, 0.5, "measured"))
                   for index in range(args.streams)]
        dumps = loads = float("inf")
        for _ in range(20):
            started = time.perf_counter()
            data = pickle.dumps(outputs, protocol=pickle.HIGHEST_PROTOCOL)
            dumps = min(dumps, time.perf_counter() - started)
            started = time.perf_counter()
            pickle.loads(data)
            loads = min(loads, time.perf_counter() - started)
        label = f"with {prompt_len}-token prompt ids" if prompt_len else "without prompt ids"
        print(f"{args.streams} DELTA outputs {label}: {len(data) / 1024:.0f} KiB, pickle {dumps * 1e3:.2f} ms, "
              f"unpickle {loads * 1e3:.2f} ms (best of 20)")


if __name__ == "__main__":
    main()
