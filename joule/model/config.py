"""Model hyperparameters, read from a Hugging Face ``config.json``.

One ``ModelConfig`` describes every supported decoder: the Llama family
(Llama, Mistral) and the Qwen2/Qwen3 variants differ only in a few flags
(qkv bias, per-head q/k norm), so the model code reads flags instead of
branching on names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

class ModelLoadError(ValueError):
    """A model could not be found, read or built; the message says what was looked for."""


@dataclass(frozen=True)
class ArchitectureTraits:
    """What an architecture name implies beyond its config.json fields."""

    model_type: str
    qkv_bias_always: bool = False  # Qwen2: q/k/v projections always carry a bias
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rope
    honors_attention_bias: bool = True  # config "attention_bias" adds bias to q/k/v/o


ARCHITECTURES: dict[str, ArchitectureTraits] = {
    "LlamaForCausalLM": ArchitectureTraits("llama"),
    "MistralForCausalLM": ArchitectureTraits("mistral", honors_attention_bias=False),
    "Qwen2ForCausalLM": ArchitectureTraits("qwen2", qkv_bias_always=True, honors_attention_bias=False),
    "Qwen3ForCausalLM": ArchitectureTraits("qwen3", qk_norm=True),
}
_ARCHITECTURE_BY_MODEL_TYPE = {traits.model_type: name for name, traits in ARCHITECTURES.items()}

# rope_scaling types we implement, with the keys each one needs.
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    # Joule's own: one divisor per rotary pair, as llama.cpp's GGUF files store Llama 3.1+ scaling (rope_freqs).
    "frequency_factors": ("factors",),
}
SUPPORTED_ROPE_TYPES = ("default", *ROPE_SCALING_KEYS)


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


@dataclass
class ModelConfig:
    """Shapes and numerics of a decoder-only transformer.

    Field names follow Hugging Face so a reader can check them against config.json.
    ``rope_scaling`` is ``None`` for plain rope, else a dict with ``rope_type``
    ("linear", "llama3" or "frequency_factors") and that type's parameters.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (always on for Qwen2)
    attention_output_bias: bool = False  # bias on o_proj (Llama/Qwen3 with attention_bias=true)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None
    # Informational: attention here is always full; sequences longer than a
    # Mistral/Qwen sliding window will differ from the reference model.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(supported_architectures())}"
            )
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelLoadError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ModelLoadError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in ROPE_SCALING_KEYS:
                raise ModelLoadError(
                    f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            missing = [key for key in ROPE_SCALING_KEYS[rope_type] if key not in self.rope_scaling]
            if missing:
                raise ModelLoadError(f"rope_scaling of type {rope_type!r} is missing {', '.join(missing)}")
            if rope_type == "frequency_factors":
                self._check_frequency_factors(self.rope_scaling["factors"])

    def _check_frequency_factors(self, factors) -> None:
        pairs = self.head_dim // 2
        if not isinstance(factors, (list, tuple)) or len(factors) != pairs:
            raise ModelLoadError(f"rope_scaling factors must be a list of head_dim / 2 = {pairs} numbers")
        if not all(isinstance(factor, (int, float)) and factor > 0 for factor in factors):
            raise ModelLoadError("rope_scaling factors must all be positive numbers")

    @classmethod
    def from_hf_config(cls, hf_config: dict) -> "ModelConfig":
        """Build from a parsed Hugging Face config.json (transformers v4 or v5 layout)."""
        if not isinstance(hf_config, dict):
            raise ModelLoadError(f"config must be a JSON object, got {type(hf_config).__name__}")
        architecture = _architecture_of(hf_config)
        traits = ARCHITECTURES[architecture]
        hidden_act = hf_config.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ModelLoadError(f"unsupported hidden_act {hidden_act!r} for {architecture}; only 'silu' is supported")
        try:
            num_heads = int(hf_config["num_attention_heads"])
            hidden_size = int(hf_config["hidden_size"])
            rope_theta, rope_scaling = _rope_settings(hf_config)
            config_bias = bool(hf_config.get("attention_bias", False)) and traits.honors_attention_bias
            sliding_window = hf_config.get("sliding_window")
            if architecture == "Qwen2ForCausalLM" and not hf_config.get("use_sliding_window", False):
                sliding_window = None
            return cls(
                architecture=architecture,
                vocab_size=int(hf_config["vocab_size"]),
                hidden_size=hidden_size,
                intermediate_size=int(hf_config["intermediate_size"]),
                num_hidden_layers=int(hf_config["num_hidden_layers"]),
                num_attention_heads=num_heads,
                num_key_value_heads=int(hf_config.get("num_key_value_heads") or num_heads),
                head_dim=int(hf_config.get("head_dim") or hidden_size // num_heads),
                rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(hf_config.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
                attention_bias=traits.qkv_bias_always or config_bias,
                attention_output_bias=config_bias,
                mlp_bias=bool(hf_config.get("mlp_bias", False)),
                qk_norm=traits.qk_norm,
                bos_token_id=hf_config.get("bos_token_id"),
                eos_token_id=hf_config.get("eos_token_id"),
                torch_dtype=hf_config.get("torch_dtype") or hf_config.get("dtype"),
                sliding_window=int(sliding_window) if sliding_window else None,
            )
        except KeyError as error:
            raise ModelLoadError(f"config for {architecture} is missing required field {error.args[0]!r}") from None
        except (TypeError, ValueError) as error:
            if isinstance(error, ModelLoadError):
                raise
            raise ModelLoadError(f"config for {architecture} has a malformed field: {error}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read a config.json file (or the config.json inside a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"no config.json found: looked for {path}")
        try:
            hf_config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"could not parse {path} as JSON: {error}") from None
        return cls.from_hf_config(hf_config)

    @property
    def num_parameters(self) -> int:
        """Parameter count, counting tied embeddings once."""
        hidden, heads, kv_heads, head_dim = (
            self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        )
        attention = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
        if self.attention_bias:
            attention += head_dim * (heads + 2 * kv_heads)
        if self.attention_output_bias:
            attention += hidden
        if self.qk_norm:
            attention += 2 * head_dim
        mlp = 3 * hidden * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + hidden
        per_layer = attention + mlp + 2 * hidden
        embeddings = self.vocab_size * hidden * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * per_layer + hidden

    @property
    def eos_token_ids(self) -> list[int]:
        """``eos_token_id`` as a list (empty when unset)."""
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def kv_cache_bytes_per_token(self, element_size: int) -> int:
        """Bytes of key+value cache one token occupies across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * element_size


def _architecture_of(hf_config: dict) -> str:
    names = hf_config.get("architectures") or []
    if isinstance(names, list) and names:
        name = names[0]
    elif hf_config.get("model_type") in _ARCHITECTURE_BY_MODEL_TYPE:
        name = _ARCHITECTURE_BY_MODEL_TYPE[hf_config["model_type"]]
    else:
        name = hf_config.get("model_type") or "<none: config has neither 'architectures' nor 'model_type'>"
    if name not in ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {name!r}; supported: {', '.join(supported_architectures())}"
        )
    return name


def _rope_settings(hf_config: dict) -> tuple[float, dict | None]:
    """Return (rope_theta, rope_scaling) from either the v5 ``rope_parameters`` or v4 layout."""
    parameters = hf_config.get("rope_parameters")
    if isinstance(parameters, dict) and parameters:
        theta = float(parameters.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
        scaling = {key: value for key, value in parameters.items() if key != "rope_theta"}
    else:
        theta = float(hf_config.get("rope_theta", 10000.0))
        scaling = dict(hf_config.get("rope_scaling") or {})
    partial_rotary_factor = scaling.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
    if float(partial_rotary_factor) != 1.0:
        raise ModelLoadError(f"partial_rotary_factor {partial_rotary_factor} is not supported (only 1.0)")
    scaling.pop("partial_rotary_factor", None)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling
