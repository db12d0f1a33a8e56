"""Which module class implements each Hugging Face architecture name."""

from __future__ import annotations

from torch import nn

from joule.model.config import ARCHITECTURES, ModelConfig, ModelLoadError, supported_architectures
from joule.model.llama import LlamaForCausalLM

# Every supported architecture is Llama-shaped; flags in ModelConfig carry the differences.
MODEL_CLASSES: dict[str, type[nn.Module]] = {name: LlamaForCausalLM for name in ARCHITECTURES}


def model_class_for(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        raise ModelLoadError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        ) from None


def build_model(config: ModelConfig) -> nn.Module:
    """Construct the module for ``config`` (on the current default device, usually under ``torch.device('meta')``)."""
    return model_class_for(config.architecture)(config)
