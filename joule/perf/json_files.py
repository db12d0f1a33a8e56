"""JSON files that may be gzip-compressed (by name: ``.gz``): calibration measurements and validation reports travel
compressed, since a GPU validation keeps every serving step (tens of MB), more than a device call brings back."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def read_json(path: str | Path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def write_json(path: str | Path, data, indent: int = 2) -> None:
    text = json.dumps(data, indent=indent, default=str) + "\n"
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        Path(path).write_text(text, encoding="utf-8")
