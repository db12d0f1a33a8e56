"""Building blocks shared by the decoder architectures.

The arithmetic follows the Hugging Face reference operation by operation
(norm in float32, rope tables in float32 cast to the activation dtype) so a
float32 model matches it to rounding error.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from joule.kernels.gate_up_config import FUSED_MIN_ROWS, GateUpTile, fused_gate_up_tile
from joule.model.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the activation dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(hidden)``; with ``residual``, ``norm(hidden + residual)`` and that sum (the next residual)."""
        if hidden.is_cuda:  # one fused Triton launch instead of ~8 elementwise kernels
            from joule.kernels.rms_norm import rms_norm

            return rms_norm(hidden, self.weight, self.eps, residual)
        if residual is not None:
            hidden = hidden + residual
            residual = hidden
        # F.rms_norm is one kernel instead of five and gives the same float32 values as
        # Hugging Face's pow/mean/rsqrt/mul sequence (checked bit for bit in tests/model).
        shape = (hidden.shape[-1],)
        if hidden.dtype == torch.float32 and self.weight.dtype == torch.float32:
            output = F.rms_norm(hidden, shape, self.weight, self.eps)
        else:  # statistics in float32, cast back before the weight, as the reference does
            output = self.weight * F.rms_norm(hidden.float(), shape, None, self.eps).to(hidden.dtype)
        return output if residual is None else (output, residual)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair rotation speeds ``[head_dim // 2]`` (float32, CPU), with rope scaling applied."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inverse_frequencies = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inverse_frequencies
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inverse_frequencies / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_scaled(inverse_frequencies, scaling)
    if rope_type == "frequency_factors":  # what llama.cpp does with a GGUF's rope_freqs tensor
        return inverse_frequencies / torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def _llama3_scaled(inverse_frequencies: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: slow the low frequencies by ``factor``, keep the high ones, blend between."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    original_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelength = original_context / low_freq_factor
    high_freq_wavelength = original_context / high_freq_factor

    wavelengths = 2 * math.pi / inverse_frequencies
    scaled = torch.where(wavelengths > low_freq_wavelength, inverse_frequencies / factor, inverse_frequencies)
    smooth = (original_context / wavelengths - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelengths >= high_freq_wavelength) & (wavelengths <= low_freq_wavelength)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with cos/sin tables precomputed for every position.

    Tables hold half a head (``[max_positions, head_dim // 2]``): the two halves of
    a head rotate as pairs ``(x[i], x[i + head_dim/2])``, the Hugging Face layout.
    cos and sin sit side by side per position, so a step gathers both in one kernel.
    They are built on the CPU even when the model is constructed on the meta device,
    and are non-persistent so checkpoints never carry them.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inverse_frequencies = rope_inverse_frequencies(config)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.int64, device="cpu").float()
        angles = positions[:, None] * inverse_frequencies[None, :]
        self.register_buffer("cos_sin_table", torch.stack((angles.cos(), angles.sin()), dim=1), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[T, head_dim // 2]`` (views of one gather, rows ``head_dim`` apart) for the given
        positions (must be < max_position_embeddings)."""
        rows = self.cos_sin_table[positions]
        return rows[:, 0], rows[:, 1]


def whole_head_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, 1, head_dim]`` tables for ``apply_rotary``: ``(cos, cos)`` and ``(-sin, sin)`` in ``dtype``.

    Built once per step from the half tables and shared by every layer, so each
    rotation costs four kernels instead of eight.
    """
    whole_cos = torch.cat((cos, cos), dim=-1).to(dtype).unsqueeze(1)
    signed_sin = torch.cat((-sin, sin), dim=-1).to(dtype).unsqueeze(1)
    return whole_cos, signed_sin


def apply_rotary(x: torch.Tensor, whole_cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[T, heads, head_dim]`` by the tables of ``whole_head_tables``.

    ``x * (c, c) + (x2, x1) * (-s, s)`` rounds exactly like Hugging Face's
    ``x * cos + rotate_half(x) * sin`` (negating is exact).
    """
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return (x * whole_cos).add_(swapped.mul_(signed_sin))


RESIDUAL_IN_GEMM_ENV = "JOULE_RESIDUAL_IN_GEMM"
GEMV_MAX_WEIGHT_ELEMENTS = 24 << 20  # benchmarks/gpu/gemv_sweep.py on the H200
_ONEDNN_PACK_ROWS = 32  # the batch the packed layout is tuned for; any row count runs on it


def onednn_packs_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``MergedLinear.pack_for_onednn`` serves this device and dtype (CPU bf16/fp16 with oneDNN)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


class MergedLinear(nn.Module):
    """Linear layers that read the same input, run as one GEMM and split afterwards.

    One larger GEMM streams the input once and runs faster than several small
    ones. With ``transpose_weight`` the weight is stored ``[in, out]``, which
    CPU BLAS multiplies faster at decode batch sizes (measured ~1.2x at 32 rows).
    """

    def __init__(self, linears: list[nn.Linear], transpose_weight: bool) -> None:
        super().__init__()
        # A single layer keeps its own storage (a tied embedding must not be duplicated).
        if len(linears) == 1:
            weight = linears[0].weight.detach()
        else:
            weight = torch.cat([linear.weight.detach() for linear in linears], dim=0)
        biases = [linear.bias for linear in linears]
        self.split_sizes = [linear.out_features for linear in linears]
        self.transposed = transpose_weight
        self.packed = False  # see pack_for_onednn
        self.weight = nn.Parameter(weight.t().contiguous() if transpose_weight else weight, requires_grad=False)
        self.bias = None
        if any(bias is not None for bias in biases):
            self.bias = nn.Parameter(torch.cat([bias.detach() for bias in biases]), requires_grad=False)
        self.adds_residual = residual_in_gemm()  # see project_onto

    def pack_for_onednn(self) -> None:
        """Re-lay the weight out once in oneDNN's blocked format (CPU, 16-bit weights).

        ``F.linear`` on a CPU runs the same oneDNN kernel but re-lays a 16-bit weight out
        on every call: packed once, a decode step's GEMMs ran ~1.4x faster on an AMX CPU
        (32 rows, SmolLM2's shapes), with bit-identical results. The packed tensor replaces
        the plain one, so no memory is added.
        """
        if self.weight.device.type != "cpu" or self.weight.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"oneDNN packing takes a 16-bit CPU weight, got {self.weight.dtype} on "
                             f"{self.weight.device}")
        plain = (self.weight.t() if self.transposed else self.weight).contiguous()
        packed = torch.ops.mkldnn._reorder_linear_weight(plain, _ONEDNN_PACK_ROWS)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.transposed, self.packed = False, True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(hidden.contiguous(), self.weight, self.bias, "none", [], "")
        if self.runs_row_gemv(hidden):
            from joule.kernels.gemv import gemv

            return gemv(hidden, self.weight, self.bias)
        if not self.transposed:
            return F.linear(hidden, self.weight, self.bias)
        if self.bias is None:
            return hidden @ self.weight
        return torch.addmm(self.bias, hidden, self.weight)

    def project_onto(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                         torch.Tensor | None]:
        """``self(hidden)`` and the residual stream, for the next norm to add; or, on CUDA steps of several rows,
        ``residual + self(hidden)`` from one GEMM whose epilogue adds it (cuBLAS's ``beta * C``) and None.

        Why: a prompt step's fused add + norm reads the projection's output and the residual and writes both the sum
        and the normed rows (four passes over [T, H]); with the sum made in the GEMM's epilogue the norm reads one
        and writes one. The sum is rounded once, where the two-step path rounds the projection first."""
        if residual is None or not self.folds_residual(hidden, residual):
            return self(hidden), residual
        return torch.addmm(residual, hidden, self.weight if self.transposed else self.weight.t()), None

    def folds_residual(self, hidden: torch.Tensor, residual: torch.Tensor) -> bool:
        """The switch on, a CUDA step of several rows (one row runs the Triton GEMV), an unpacked weight, no bias."""
        return (self.adds_residual and hidden.is_cuda and not self.packed and self.bias is None
                and residual.dtype == hidden.dtype and not self.runs_row_gemv(hidden))

    def runs_fused_gate_up(self, hidden: torch.Tensor) -> bool:
        """A plain 16-bit weight on an sm_90+ GPU and a step long enough for the fused gate/up + SiLU GEMM."""
        return hidden.shape[0] >= FUSED_MIN_ROWS and self.fits_fused_gate_up(hidden)

    def fits_fused_gate_up(self, hidden: torch.Tensor) -> bool:
        """A plain 16-bit weight on an sm_90+ GPU and operands the fused GEMM's descriptors take, at any row count."""
        if not (hidden.is_cuda and not self.transposed and not self.packed
                and self.bias is None and self.weight.dtype in (torch.bfloat16, torch.float16)
                and self.weight.is_contiguous()  # the stacked tiles view it as [2, I, K]
                and hidden.dtype == self.weight.dtype and hidden.stride(-1) == 1
                and hidden.data_ptr() % 16 == 0 and (hidden.stride(0) * hidden.element_size()) % 16 == 0
                and hidden.shape[1] % 8 == 0 and (self.weight.shape[0] // 2) % 8 == 0):
            return False  # tensor-memory descriptors need 16-byte aligned bases and row strides
        from joule.kernels.common import device_capability, interpreting

        return not interpreting() and device_capability(hidden.device) >= (9, 0)

    def runs_row_gemv(self, hidden: torch.Tensor) -> bool:
        """One contiguous CUDA row of the weight's dtype, and a weight the Triton GEMV serves well."""
        return (hidden.is_cuda and hidden.shape[0] == 1 and hidden.stride(-1) == 1
                and hidden.dtype == self.weight.dtype and self._row_gemv_fits())

    def _row_gemv_fits(self) -> bool:
        """One 16-bit input row: the Triton GEMV beats cuBLAS up to GEMV_MAX_WEIGHT_ELEMENTS (H200: 4.6 vs
        6.1 us for 2048x2048); with programmatic dependent launch (sm_90+) it also wins on the wide ones
        (gate/up 17.7 vs 18.3 us, lm_head 121.8 vs 127.5 us) and overlaps its neighbours."""
        if self.transposed or self.weight.dtype not in (torch.bfloat16, torch.float16):
            return False
        from joule.kernels.common import pdl_launch

        return self.weight.numel() <= GEMV_MAX_WEIGHT_ELEMENTS or pdl_launch(self.weight.device)

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return output.split(self.split_sizes, dim=-1)


def residual_in_gemm() -> bool:
    """``JOULE_RESIDUAL_IN_GEMM``: "1" adds the residual inside the o and down projections' GEMMs on CUDA
    (``MergedLinear.project_onto``), "0" or unset in the next norm."""
    text = os.environ.get(RESIDUAL_IN_GEMM_ENV, "").strip()
    if text not in ("", "0", "1"):
        raise ValueError(f"{RESIDUAL_IN_GEMM_ENV} must be 0 or 1, got {text!r}")
    return text == "1"


def norm_then_project(
    projection: MergedLinear, norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor | None,
    gated: bool = False, fused_tile: GateUpTile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``projection(norm(hidden [+ residual]))`` and the new residual (``hidden`` itself when none was given);
    ``gated``: SwiGLU's ``silu(gate) * up`` of the output's halves.

    On one CUDA row the norm and the activation run inside the Triton GEMV: a batch-1 decode step saves
    three launches a layer. Elsewhere: the norm, the GEMM and the activation one after another, except that with
    ``fused_tile`` (``GatedMLP.tile_for``'s: ``JOULE_FUSED_GATE_UP``'s, on by default, for steps of ``FUSED_MIN_ROWS``
    rows or more on sm_90+, and at shorter row counts measured faster at start-up) gated steps
    run the GEMM with the activation inside (``joule.kernels.gate_up_silu``; faster than cuBLAS + ``silu_and_mul``
    there on the H100, 2026-12-06 (j), where a pointer-loaded version had lost 8.4 % on workload 3 in (h)).
    """
    if projection.runs_row_gemv(hidden) and norm.weight.dtype == hidden.dtype:
        from joule.kernels.gemv import gemv

        result = gemv(hidden, projection.weight, projection.bias, norm_weight=norm.weight, eps=norm.eps,
                      residual=residual, gated=gated)
        return result if residual is not None else (result, hidden)
    if residual is None:
        residual, hidden = hidden, norm(hidden)
    else:
        hidden, residual = norm(hidden, residual)
    return (gated_projection(projection, hidden, fused_tile) if gated else projection(hidden)), residual


def gated_projection(projection: MergedLinear, hidden: torch.Tensor, fused_tile: GateUpTile | None) -> torch.Tensor:
    """SwiGLU of the merged gate/up ``projection(hidden)``: the fused GEMM with ``fused_tile`` (the MLP's choice
    for this many rows, ``GatedMLP.tile_for``) where its operands fit, else the GEMM and ``swiglu``."""
    if fused_tile is not None and projection.fits_fused_gate_up(hidden):
        from joule.kernels.gate_up_silu import gate_up_silu

        return gate_up_silu(hidden, projection.weight, fused_tile)
    return swiglu(projection(hidden))


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``[T, 2I]`` (gate columns then up columns)."""
    if gate_up.is_cuda:  # one Triton pass instead of silu + multiply
        from joule.kernels.activation import silu_and_mul

        return silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate, inplace=True).mul_(up)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.gate_up_proj: MergedLinear | None = None
        # The fused gate/up + SiLU GEMM's tile (JOULE_FUSED_GATE_UP), set when the projections are merged.
        self.fused_tile: GateUpTile | None = None
        # Shorter steps' row counts that measured faster fused, and their tiles (joule/runtime/gate_up_tuning.py).
        self.row_tiles: dict[int, GateUpTile] = {}

    def merge_projections(self, transpose_weight: bool) -> None:
        """Replace gate/up by one GEMM (after the checkpoint is loaded by its names)."""
        self.gate_up_proj = MergedLinear([self.gate_proj, self.up_proj], transpose_weight)
        self.down_proj = MergedLinear([self.down_proj], transpose_weight)
        del self.gate_proj, self.up_proj
        self.fused_tile = fused_gate_up_tile()

    def tile_for(self, rows: int) -> GateUpTile | None:
        """The fused GEMM's tile for a step of ``rows`` rows: the long steps' from ``FUSED_MIN_ROWS``, a measured one
        at a shorter count (``row_tiles``), else None (cuBLAS + ``silu_and_mul``)."""
        if self.fused_tile is None:
            return None
        return self.fused_tile if rows >= FUSED_MIN_ROWS else self.row_tiles.get(rows)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(hidden)) * self.up_proj(hidden))
        return self.down_proj(gated_projection(self.gate_up_proj, hidden, self.tile_for(hidden.shape[0])))
