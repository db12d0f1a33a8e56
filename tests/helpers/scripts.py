"""Import a benchmark script (not a package module) by path, so tests can call its functions.

Imported as ``helpers.scripts`` (``tests`` is on pytest's pythonpath).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(path: Path, name: str):
    """The module at ``path``, registered as ``name`` (dataclasses look their module up in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
