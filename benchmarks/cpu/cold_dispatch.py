"""Why a CPU decode step's small operations run 2-4x slower inside a run than alone.

Usage: PYTHONPATH=. python benchmarks/cpu/cold_dispatch.py [--rows 32] [--hidden 576] [--stream-mib 4]

Times small tensor operations of a 32-row decode step (a cast, a power, a mean, an add, a clone, an empty tensor and
a no-op view) right after nothing and right after reading a buffer as large as one projection's weights (the GEMMs
of a decode step stream 0.7-3.5 MB each), on one thread so that no second thread is involved. If even the no-op view
slows down after the stream, the cost is not the tensors' data (a view touches none) but the interpreter's and the
dispatcher's own working set, evicted from the core's L2 by the stream and fetched again from a slower level.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def median_microseconds(operation, before, repeats: int = 200) -> float:
    samples = []
    for _ in range(repeats):
        before()
        started = time.perf_counter()
        operation()
        samples.append(time.perf_counter() - started)
    return 1e6 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--stream-mib", type=float, default=4.0)
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    hidden = torch.randn(arguments.rows, arguments.hidden, dtype=torch.bfloat16)
    hidden_float = hidden.float()
    stream = torch.randn(int(arguments.stream_mib * (1 << 20)) // 4)
    operations = {
        "bf16 -> float32 cast": hidden.float,
        "pow(2)": lambda: hidden_float.pow(2),
        "mean over the row": lambda: hidden_float.mean(-1, keepdim=True),
        "bf16 add": lambda: hidden + hidden,
        "clone": hidden.clone,
        "empty float32 tensor": lambda: torch.empty(arguments.rows, arguments.hidden),
        "no-op view": lambda: hidden.view(-1),
    }
    print(f"{arguments.rows} x {arguments.hidden} rows, one thread; "
          f"after: nothing / a {arguments.stream_mib:g} MiB read")
    print(f"{'operation':<24} {'alone us':>9} {'after us':>9}")
    for name, operation in operations.items():
        alone = median_microseconds(operation, lambda: None)
        after = median_microseconds(operation, stream.sum)
        print(f"{name:<24} {alone:>9.1f} {after:>9.1f}")


if __name__ == "__main__":
    main()
