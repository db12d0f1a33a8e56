"""The MLP row chunk and the decode launch that workload 3's A/B should try, from the two sweeps' JSON.

Usage: python benchmarks/gpu/pick_w3_levers.py MLP_SWEEP.json DECODE_SWEEP.json -> prints "CHUNK LAUNCH"
(``CHUNK``: the fastest chunk at 8,192 rows, ``LAUNCH``: the fastest decode launch as ``JOULE_DECODE_LAUNCH`` takes
it, items joined by "+"). A sweep that is missing (a dry run) or where nothing beats the default gives the
candidate the sweep was written for (1024 rows; heads_first=1), so the A/B still runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def best_chunk(path: Path) -> int:
    if not path.exists():
        return 1024
    rows = [row for row in json.loads(path.read_text()) if row["rows"] == 8192 and row["chunk"]]
    return min(rows, key=lambda row: row["us"])["chunk"] if rows else 1024


def best_launch(path: Path) -> str:
    if not path.exists():
        return "heads_first=1"
    rows = [row for row in json.loads(path.read_text()) if not row["head_major"] and row["launch"]]
    if not rows:
        return "heads_first=1"
    launch = min(rows, key=lambda row: row["us"])["launch"]
    return "+".join(f"{key}={int(value)}" for key, value in launch.items())


if __name__ == "__main__":
    print(best_chunk(Path(sys.argv[1])), best_launch(Path(sys.argv[2])))
