"""Model checkpoints and architectures: configs, loading (safetensors, GGUF, hub, dummy) and modules."""

from joule.model.config import ModelConfig, ModelLoadError, supported_architectures
from joule.model.loader import LoadedModel, load_model, resolve_model_path

__all__ = [
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "load_model",
    "resolve_model_path",
    "supported_architectures",
]
