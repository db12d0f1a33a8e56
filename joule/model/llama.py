"""The Llama-shaped decoder: Llama, Mistral, Qwen2 and Qwen3 in one module.

These architectures differ only in flags read from ``ModelConfig``:
``attention_bias`` (q/k/v bias, Qwen2), ``attention_output_bias``,
``qk_norm`` (per-head RMSNorm on q and k before rope, Qwen3) and
``tie_word_embeddings``. Parameter names match Hugging Face checkpoints so
safetensors load by name.

Inputs are a flattened batch of ``T`` token rows; attention over the paged
cache is delegated to ``ForwardContext.attend``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from joule.model.config import ModelConfig
from joule.model.layers import (
    GatedMLP,
    MergedLinear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    norm_then_project,
    whole_head_tables,
)
from joule.runtime.attention.base import ForwardContext


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        query_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, query_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(query_size, hidden, bias=config.attention_output_bias)
        self.uses_qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qkv_proj: MergedLinear | None = None

    def merge_projections(self, transpose_weight: bool) -> None:
        """Replace q/k/v by one GEMM (after the checkpoint is loaded by its names)."""
        self.qkv_proj = MergedLinear([self.q_proj, self.k_proj, self.v_proj], transpose_weight)
        self.o_proj = MergedLinear([self.o_proj], transpose_weight)
        del self.q_proj, self.k_proj, self.v_proj

    def _project_and_rotate_together(
        self, qkv: torch.Tensor, whole_cos: torch.Tensor, signed_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CPU: q and k sit side by side in the merged projection, so one rotation covers both.

        The results are views (strided rows); the attention backends accept them.
        """
        num_tokens, head_dim = qkv.shape[0], self.head_dim
        rotated_width = (self.num_heads + self.num_kv_heads) * head_dim
        query_key = qkv[:, :rotated_width].view(num_tokens, self.num_heads + self.num_kv_heads, head_dim)
        query, key = apply_rotary(query_key, whole_cos, signed_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        value = qkv[:, rotated_width:].view(num_tokens, self.num_kv_heads, head_dim)
        return query, key, value

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: ForwardContext
    ) -> torch.Tensor:
        """``cos``/``sin``: half tables ``[T, head_dim / 2]`` on CUDA (the Triton kernel's input),
        whole-head tables from ``whole_head_tables`` elsewhere."""
        if self.qkv_proj is not None:
            return self.attend_projected(self.qkv_proj(hidden), cos, sin, context)
        return self.o_proj(self._attend(self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden), cos, sin,
                                        context))

    def forward_normed(
        self, norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor,
        sin: torch.Tensor, context: ForwardContext, keep_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``norm(hidden [+ residual])`` through attention and the output projection; also the new residual, or
        None where the projection's GEMM added it (``MergedLinear.project_onto``). ``keep_rows``: only these
        rows go on past attention (every row's keys and values are in the cache by then).

        One CUDA row (batch-1 decode) whose backend lets the model write the cache: the norm, the q/k/v GEMV,
        the rotation and the cache write are one kernel (``joule.kernels.qkv_rotary``), and where the backend
        serves it the attention and the output projection another (``joule.kernels.attention_output``)."""
        destination = context.kv_destination(self.layer_index) if hidden.is_cuda else None
        if (destination is not None and not self.uses_qk_norm and self.qkv_proj.runs_row_gemv(hidden)
                and norm.weight.dtype == hidden.dtype and cos.dtype == torch.float32):
            from joule.kernels.qkv_rotary import qkv_rotary_gemv

            query, new_residual = qkv_rotary_gemv(
                hidden, self.qkv_proj.weight, self.qkv_proj.bias, cos, sin, *destination, self.num_heads,
                norm_weight=norm.weight, eps=norm.eps, residual=residual)
            query = query.view(1, self.num_heads, self.head_dim)
            output = None
            if self.o_proj.bias is None and not self.o_proj.transposed:  # attention and o in one kernel if served
                output = context.attend_and_project(self.layer_index, query, self.o_proj.weight, self.scale)
            if output is None:
                attended = context.attend(self.layer_index, query, None, None, self.scale, kv_stored=True)
                output = self.o_proj(attended.reshape(1, self.num_heads * self.head_dim))
            return output, hidden if new_residual is None else new_residual
        qkv, residual = norm_then_project(self.qkv_proj, norm, hidden, residual)
        attended = self._attended_rows(qkv, cos, sin, context)
        if keep_rows is not None:
            attended, residual = attended.index_select(0, keep_rows), residual.index_select(0, keep_rows)
        return self.o_proj.project_onto(attended, residual)

    def attend_projected(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: ForwardContext
    ) -> torch.Tensor:
        """Attention and the output projection from the merged q/k/v projection's output."""
        return self.o_proj(self._attended_rows(qkv, cos, sin, context))

    def _attended_rows(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: ForwardContext
    ) -> torch.Tensor:
        """Attention's output ``[T, heads * head_dim]`` from the merged q/k/v projection's output."""
        if not qkv.is_cuda and not self.uses_qk_norm:
            query, key, value = self._project_and_rotate_together(qkv, cos, sin)
            attended = context.attend(self.layer_index, query, key, value, self.scale)
            return attended.reshape(qkv.shape[0], self.num_heads * self.head_dim)
        return self._attend(*self.qkv_proj.split(qkv), cos, sin, context)

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        context: ForwardContext,
    ) -> torch.Tensor:
        num_tokens = query.shape[0]
        query = query.reshape(num_tokens, self.num_heads, self.head_dim)
        key = key.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        kv_stored = False
        if query.is_cuda:  # q/k norm and rotation of both in one Triton launch, with the cache write when allowed
            from joule.kernels.rotary import rotary_embedding_

            norms = (self.q_norm.weight, self.k_norm.weight) if self.uses_qk_norm else (None, None)
            eps = self.q_norm.eps if self.uses_qk_norm else 0.0
            destination = context.kv_destination(self.layer_index)
            kv_stored = destination is not None
            rotary_embedding_(query, key, cos, sin, *norms, eps=eps,
                              cache=(value, *destination) if kv_stored else None)
        else:
            if self.uses_qk_norm:
                query = self.q_norm(query)
                key = self.k_norm(key)
            query = apply_rotary(query, cos, sin)
            key = apply_rotary(key, cos, sin)
        attended = context.attend(self.layer_index, query, key, value, self.scale, kv_stored=kv_stored)
        return attended.reshape(num_tokens, self.num_heads * self.head_dim)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        context: ForwardContext,
        keep_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the MLP output and the residual stream before it; the next norm adds them
        (fused on GPU), which is the same sum Hugging Face computes one line earlier. Where a projection's GEMM
        adds the residual in its epilogue (``MergedLinear.project_onto``) it returns that sum and None.
        ``keep_rows``: the rows past attention (the output projection and the MLP run on those only)."""
        attention, mlp = self.self_attn, self.mlp
        if attention.qkv_proj is None or mlp.gate_up_proj is None:  # projections not merged yet
            if residual is None:
                residual = hidden
                hidden = self.input_layernorm(hidden)
            else:
                hidden, residual = self.input_layernorm(hidden, residual)
            hidden = attention(hidden, cos, sin, context)
            if keep_rows is not None:
                hidden, residual = hidden.index_select(0, keep_rows), residual.index_select(0, keep_rows)
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return mlp(hidden), residual
        # Merged: each norm (and SwiGLU's activation) may run inside the projection's kernel (one CUDA row).
        hidden, residual = attention.forward_normed(self.input_layernorm, hidden, residual, cos, sin, context,
                                                    keep_rows)
        return self.feed_forward(hidden, residual)

    def feed_forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                      torch.Tensor | None]:
        """The merged layer's second half: ``norm(hidden + residual)`` through the MLP, as ``forward`` returns."""
        mlp = self.mlp
        activated, residual = norm_then_project(mlp.gate_up_proj, self.post_attention_layernorm, hidden, residual,
                                                gated=True, fused_tile=mlp.tile_for(hidden.shape[0]))
        return mlp.down_proj.project_onto(activated, residual)


class DecoderModel(nn.Module):
    """Embeddings, the layer stack and the final norm (Hugging Face's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, index) for index in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, context: ForwardContext,
                output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``output_rows``: see ``LlamaForCausalLM.forward``."""
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions)
        if not hidden.is_cuda:  # once per step, not per layer
            cos, sin = whole_head_tables(cos, sin, hidden.dtype)
        if output_rows is not None and not self.layers:
            hidden = hidden.index_select(0, output_rows)
        residual = None
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, cos, sin, context, output_rows if index == last else None)
        if residual is None:  # no layers, or the last one's down projection added its residual
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Decoder plus output projection; serves every architecture in the registry."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        # Tied models reuse the embedding matrix and own no lm_head parameter.
        self.lm_head = None
        self.output_projection: MergedLinear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def merge_projections(self, transpose_weight: bool = False) -> None:
        """Run q/k/v and gate/up as single GEMMs; call once after loading weights by name."""
        for layer in self.model.layers:
            layer.self_attn.merge_projections(transpose_weight)
            layer.mlp.merge_projections(transpose_weight)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.output_projection = MergedLinear([_as_linear(weight)], transpose_weight)
        self.lm_head = None  # the merged copy replaces it

    def pack_for_onednn(self) -> None:
        """Every merged projection in oneDNN's layout (CPU, 16-bit; after ``merge_projections(False)``).

        Packing copies, so a tied output projection leaves the embedding its plain matrix."""
        for module in self.modules():
            if isinstance(module, MergedLinear):
                module.pack_for_onednn()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, context: ForwardContext,
                output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states ``[T, hidden_size]`` for ``input_ids``/``positions`` ``[T]``; given
        ``output_rows`` (int64 row indices), those rows' only, in that order.

        Why: no later layer reads the last layer's output, so a prompt chunk's rows that do not sample skip
        its output projection and MLP (its attention still writes every row's keys and values): 1/L of a
        prompt step's GEMMs, as llama.cpp does with its output ids."""
        return self.model(input_ids, positions, context, output_rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, vocab_size]`` in the model's dtype for the rows of ``hidden`` that sample (the
        sampler widens them to float32 where it computes with them)."""
        if self.output_projection is not None:
            return self.output_projection(hidden)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)


def _as_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return linear
