"""Turn a GGUF file into a Hugging Face-style directory once, then reuse it.

Every tensor is dequantized to float32 and renamed to its Hugging Face name,
so the rest of the engine only ever loads ``config.json`` + ``model.safetensors``.
The result lives in ``${JOULE_CACHE_DIR:-~/.cache/joule}/models/<stem>-<hash>/``;
it is built in a temporary sibling directory and renamed into place, so a
crash never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from joule.model.config import ModelConfig, ModelLoadError

logger = logging.getLogger(__name__)

# Bump when the directory layout or tensor conversion changes, to invalidate old caches.
CONVERSION_VERSION = 1

GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_GLOBAL_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ROPE_FREQUENCIES_TENSOR = "rope_freqs.weight"
_LAYER_TENSOR_PATTERN = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def cache_root() -> Path:
    return Path(os.environ.get("JOULE_CACHE_DIR") or "~/.cache/joule").expanduser()


def converted_directory(gguf_path: Path) -> Path:
    """Where the conversion of ``gguf_path`` lives; the name changes when the file changes."""
    stat = gguf_path.stat()
    key = f"v{CONVERSION_VERSION}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf_path.stem}-{digest}"


def convert_gguf(gguf_path: str | Path) -> Path:
    """Return the Hugging Face-style directory for a GGUF file, converting it on first use."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: looked for {gguf_path}")
    target = converted_directory(gguf_path)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        _add_missing_tokenizer_files(gguf_path, target)
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    try:
        logger.info("converting %s into %s", gguf_path, target)
        write_hf_directory(gguf_path, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _remove_abandoned_staging(target: Path) -> None:
    """Delete staging directories left by conversions whose process died (killed mid-write)."""
    prefix = f".{target.name}."
    for staging in target.parent.glob(f"{prefix}*"):
        pid_text = staging.name[len(prefix):].split(".", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_hf_directory(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, model.safetensors (float32) and tokenizer files for ``gguf_path``."""
    from safetensors.torch import save_file

    reader = _open_reader(gguf_path)
    hf_config = hf_config_from_gguf(reader, gguf_path)
    ModelConfig.from_hf_config(hf_config)  # validate before the slow part
    tensors = dequantized_tensors(reader, hf_config)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    _write_tokenizer_files(reader, out_dir)


def _open_reader(gguf_path: Path):
    import gguf

    try:
        return gguf.GGUFReader(gguf_path)
    except Exception as error:  # the reader raises ValueError, OSError or struct errors on bad files
        raise ModelLoadError(f"could not read {gguf_path} as a GGUF file: {error}") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, list):  # some files store per-layer values; we need them uniform
        if len(set(value)) != 1:
            raise ModelLoadError(f"GGUF field {key} varies per layer ({value}); not supported")
        value = value[0]
    return value


def hf_config_from_gguf(reader, gguf_path: Path) -> dict:
    """A Hugging Face config.json dict built from GGUF metadata."""
    architecture = _field(reader, "general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF file {gguf_path} has architecture {architecture!r}; "
            f"supported GGUF architectures: {', '.join(GGUF_ARCHITECTURES)}"
        )
    tensor_shapes = {tensor.name: [int(size) for size in tensor.shape] for tensor in reader.tensors}
    if "token_embd.weight" not in tensor_shapes:
        raise ModelLoadError(f"GGUF file {gguf_path} has no token_embd.weight tensor")

    def required(key: str):
        value = _field(reader, f"{architecture}.{key}")
        if value is None:
            raise ModelLoadError(f"GGUF file {gguf_path} is missing metadata {architecture}.{key}")
        return value

    hidden_size = int(required("embedding_length"))
    num_heads = int(required("attention.head_count"))
    config = {
        "architectures": [GGUF_ARCHITECTURES[architecture]],
        "model_type": architecture,
        "hidden_act": "silu",
        "vocab_size": tensor_shapes["token_embd.weight"][1],  # GGUF shapes are [columns, rows]
        "hidden_size": hidden_size,
        "intermediate_size": int(required("feed_forward_length")),
        "num_hidden_layers": int(required("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_field(reader, f"{architecture}.attention.head_count_kv", num_heads)),
        "head_dim": int(_field(reader, f"{architecture}.attention.key_length", hidden_size // num_heads)),
        "rms_norm_eps": float(_field(reader, f"{architecture}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{architecture}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{architecture}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "attention_bias": "blk.0.attn_q.bias" in tensor_shapes and architecture != "qwen2",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    scaling_type = _field(reader, f"{architecture}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise ModelLoadError(f"GGUF rope scaling type {scaling_type!r} is not supported (only linear)")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(required("rope.scaling.factor"))}
    factors = _rope_frequency_factors(reader)
    if factors is not None:
        if "rope_scaling" in config:
            raise ModelLoadError(
                f"GGUF file {gguf_path} has both rope scaling {scaling_type!r} and rope_freqs; Joule supports one"
            )
        config["rope_scaling"] = {"rope_type": "frequency_factors", "factors": factors}
    return config


def _rope_frequency_factors(reader) -> list[float] | None:
    """Llama 3.1+ rope scaling as llama.cpp stores it: a divisor per rotary pair (``rope_freqs``), or None."""
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQUENCIES_TENSOR:
            values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(-1)
            return [float(value) for value in values]
    return None


def hf_tensor_name(gguf_name: str) -> str:
    """Hugging Face name of a GGUF tensor: ``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_TENSOR_NAMES and suffix == "weight":
        return f"{_GLOBAL_TENSOR_NAMES[stem]}.weight"
    match = _LAYER_TENSOR_PATTERN.match(gguf_name)
    if match and match.group(2) in _LAYER_TENSOR_NAMES:
        layer, kind, suffix = match.groups()
        return f"model.layers.{layer}.{_LAYER_TENSOR_NAMES[kind]}.{suffix}"
    raise ModelLoadError(f"unexpected GGUF tensor {gguf_name!r}: no Hugging Face name is known for it")


def undo_rope_permutation(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row order.

    Hugging Face rotates the two halves of each head, ``(x[i], x[i + D/2])``;
    llama.cpp interleaves them, so GGUF row ``2i`` of a head is HF row ``i`` and
    row ``2i + 1`` is HF row ``i + D/2``. Rows are grouped per head as
    ``[head, pair, two]`` and reordered to ``[head, two, pair]``.
    """
    rows = weights.shape[0]
    if rows % (2 * num_heads) != 0:
        raise ModelLoadError(f"cannot split {rows} q/k rows into {num_heads} heads of rotary pairs")
    per_head_pairs = rows // num_heads // 2
    grouped = weights.reshape(num_heads, per_head_pairs, 2, *weights.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(weights.shape)


def dequantized_tensors(reader, hf_config: dict) -> dict[str, torch.Tensor]:
    """Every GGUF tensor as float32 under its Hugging Face name, q/k rows restored for llama."""
    from gguf.quants import dequantize

    undo_permutation = hf_config["model_type"] == "llama"
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQUENCIES_TENSOR:  # in config.json's rope_scaling, not a weight
            continue
        name = hf_tensor_name(tensor.name)
        shape = tuple(int(size) for size in reversed(tensor.shape))  # GGUF lists the fastest axis first
        weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        if undo_permutation and ".self_attn.q_proj." in name:
            weights = undo_rope_permutation(weights, hf_config["num_attention_heads"])
        elif undo_permutation and ".self_attn.k_proj." in name:
            weights = undo_rope_permutation(weights, hf_config["num_key_value_heads"])
        tensors[name] = torch.from_numpy(np.array(weights, dtype=np.float32, order="C"))  # own, writable copy
    return tensors


def _tokenizer_writer():
    """The tokenizer writer (another module), or None while it does not exist."""
    try:
        from joule.model.gguf_tokenizer import write_tokenizer_files
    except ImportError as error:
        logger.warning("joule.model.gguf_tokenizer unavailable (%s); GGUF tokenizer files not written", error)
        return None
    return write_tokenizer_files


def _write_tokenizer_files(reader, out_dir: Path) -> None:
    if "tokenizer.ggml.tokens" not in reader.fields:
        logger.warning("GGUF file embeds no tokenizer; only weights and config.json are written")
        return
    writer = _tokenizer_writer()
    if writer is None:
        return
    try:
        writer(reader, out_dir)
    except ValueError as error:
        raise ModelLoadError(f"could not convert the GGUF tokenizer: {error}") from None


def _add_missing_tokenizer_files(gguf_path: Path, target: Path) -> None:
    """Complete a cached conversion made before the tokenizer writer existed."""
    if (target / "tokenizer.json").is_file():
        return
    if _tokenizer_writer() is None:
        return
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=target))
    try:
        _write_tokenizer_files(_open_reader(gguf_path), staging)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == "tokenizer.json"):  # tokenizer.json last
            os.replace(path, target / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
