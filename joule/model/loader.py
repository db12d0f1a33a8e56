"""Find a model (default name, local directory, GGUF file or hub id) and load its weights.

Everything resolves to a Hugging Face-style directory (config.json, safetensors,
tokenizer files); the model is built on the meta device and the checkpoint
tensors are assigned in place, so weights are allocated once, in the target
dtype, on the target device.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from joule.model.config import ModelConfig, ModelLoadError
from joule.model.default_model import DEFAULT_MODEL_NAME, default_model_path, is_default_model_name
from joule.model.registry import build_model

LOAD_FORMATS = ("auto", "safetensors", "dummy")
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "merges.txt", "vocab.txt"]
DUMMY_SEED = 0
DUMMY_STD = 0.02
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_IGNORED_CHECKPOINT_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    path: Path  # Hugging Face-style directory, also holding the tokenizer files


def resolve_model_path(model: str | None) -> Path:
    """The local Hugging Face-style directory for ``model``, downloading or converting if needed.

    ``None`` or ``"smollm2-135m"``: the bundled default; a directory with config.json;
    a ``.gguf`` file (converted once into the cache); a ``config.json`` file (its
    directory); otherwise an ``org/name`` hub id.
    """
    if is_default_model_name(model):
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            from joule.model.gguf_loader import convert_gguf

            return convert_gguf(path)
        if path.name == "config.json":
            return path.parent.resolve()
        raise ModelLoadError(f"{path} is a file but neither a .gguf file nor a config.json")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path.resolve()
        gguf_files = sorted(path.glob("*.gguf"))
        if len(gguf_files) == 1:
            from joule.model.gguf_loader import convert_gguf

            return convert_gguf(gguf_files[0])
        looked_for = path.resolve() / "config.json"
        raise ModelLoadError(f"no config.json in model directory {path.resolve()} (looked for {looked_for})")
    if _HUB_ID_PATTERN.match(model) and not model.startswith((".", "~")):
        return _download_from_hub(model)
    raise ModelLoadError(
        f"model {model!r} not found: no such local path ({path.absolute()}), and it is neither the "
        f"default model name {DEFAULT_MODEL_NAME!r} nor a Hugging Face hub id of the form org/name"
    )


def load_model(
    model: str | None,
    dtype: torch.dtype,
    device: torch.device | str,
    load_format: str = "auto",
) -> LoadedModel:
    """Resolve ``model`` and return the module with weights in ``dtype`` on ``device``, in eval mode.

    ``load_format="dummy"`` needs only config.json and fills the weights with a
    fixed-seed normal init (norm weights one, biases zero): enough for benchmarks.
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"unknown load_format {load_format!r}; supported: {', '.join(LOAD_FORMATS)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device(device)
    path = resolve_model_path(model)
    config = ModelConfig.from_file(path / "config.json")
    with torch.device("meta"):
        module = build_model(config)
    if load_format == "dummy":
        weights = dummy_weights(module, dtype, device)
    else:
        weights = read_safetensors(weight_files(path), dtype, device)
    install_weights(module, weights, config, source=str(path))
    module.to(device)
    module.eval()
    module.requires_grad_(False)
    return LoadedModel(module, config, path)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (all shards listed by the index, if any)."""
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModelLoadError(f"could not read shard index {index_path}: {error}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [str(file) for file in files if not file.is_file()]
        if missing:
            raise ModelLoadError(f"shard index {index_path} lists missing files: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(others)}; only safetensors checkpoints are supported)" if others else ""
        raise ModelLoadError(
            f"no weights in {directory}: looked for model.safetensors.index.json or *.safetensors{hint}"
        )
    return files


def read_safetensors(files: list[Path], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """All tensors of ``files`` cast to ``dtype`` on ``device``, read one tensor at a time."""
    from safetensors import safe_open

    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for name in reader.keys():
                    weights[name] = reader.get_tensor(name).to(device=device, dtype=dtype)
        except Exception as error:  # safetensors raises its own error type for bad headers and truncation
            raise ModelLoadError(f"corrupt or unreadable safetensors file {file}: {error}") from None
    return weights


def dummy_weights(
    module: nn.Module, dtype: torch.dtype, device: torch.device, seed: int = DUMMY_SEED
) -> dict[str, torch.Tensor]:
    """Deterministic random weights shaped like ``module``'s parameters."""
    generator = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, parameter in module.named_parameters():
        if name.endswith("norm.weight"):
            tensor = torch.ones(parameter.shape, device=device)
        elif name.endswith(".bias"):
            tensor = torch.zeros(parameter.shape, device=device)
        else:
            tensor = torch.empty(parameter.shape, device=device).normal_(0.0, DUMMY_STD, generator=generator)
        weights[name] = tensor.to(dtype)
    return weights


def install_weights(module: nn.Module, weights: dict[str, torch.Tensor], config: ModelConfig, source: str) -> None:
    """Assign checkpoint tensors to ``module``'s parameters by name, checking names and shapes."""
    weights = {name: tensor for name, tensor in weights.items() if not name.endswith(_IGNORED_CHECKPOINT_SUFFIXES)}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # some tied checkpoints still store a copy
    expected = dict(module.named_parameters())
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} weights (e.g. {', '.join(missing[:3])})")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} weights (e.g. {', '.join(unexpected[:3])})")
        raise ModelLoadError(
            f"checkpoint {source} does not match {config.architecture}: {'; '.join(problems)}"
        )
    for name, parameter in expected.items():
        if weights[name].shape != parameter.shape:
            raise ModelLoadError(
                f"checkpoint {source}: {name} has shape {tuple(weights[name].shape)}, "
                f"config.json implies {tuple(parameter.shape)}"
            )
    module.load_state_dict(weights, strict=True, assign=True)


def _hub_cache_dir() -> Path:
    """The hub cache, read from the environment now (huggingface_hub reads it only at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _download_from_hub(repo_id: str) -> Path:
    """Download config, safetensors and tokenizer files; fall back to the local cache when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cache_dir = _hub_cache_dir()
    offline = _hub_offline()
    reason = "HF_HUB_OFFLINE is set"
    if not offline:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, cache_dir=cache_dir))
        except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as error:
            raise ModelLoadError(
                f"{repo_id!r} is not a local path, and the Hugging Face hub refused it: {error}"
            ) from None
        except Exception as error:  # connection failures surface as several httpx/hub error types
            reason = f"the hub could not be reached: {type(error).__name__}"
    try:
        return Path(snapshot_download(
            repo_id, allow_patterns=HUB_ALLOW_PATTERNS, cache_dir=cache_dir, local_files_only=True
        ))
    except Exception:
        raise ModelLoadError(
            f"model {repo_id!r} is not a local path and cannot be downloaded: the machine is offline "
            f"({reason}) and the model is not in the Hugging Face cache at {cache_dir}"
        ) from None
