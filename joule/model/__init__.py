"""Model checkpoints and architectures: configs, loading (safetensors, GGUF, hub, dummy) and modules.

Only the torch-free config is imported eagerly, so the simulator (``joule.perf``) can read model
shapes without importing torch; the loader comes in on first use.
"""

from joule.model.config import ModelConfig, ModelLoadError, supported_architectures


def __getattr__(name: str):
    if name in ("LoadedModel", "load_model", "resolve_model_path"):
        from joule.model import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'joule.model' has no attribute {name!r}")


__all__ = [
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "load_model",
    "resolve_model_path",
    "supported_architectures",
]
