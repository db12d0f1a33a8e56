"""DeviceProfile: what a device achieves in practice, as opposed to its datasheet peaks.

A profile holds the efficiency factors the step model multiplies the roofline
with. ``DeviceProfile.from_hardware`` gives defaults derived from the catalog
(documented below); ``joule perf calibrate`` measures and fits them on the
current device and saves them as JSON, which the simulator and planner load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from joule.perf.hardware import HardwareSpec, get_hardware

OPERATOR_CLASSES = ("linear", "attention_prefill", "attention_decode", "elementwise", "sampling")
# Scales: one per class, plus the linear class's in decode-only steps, which on a GPU replay a CUDA
# graph (GEMMs back to back at memory speed) while steps with a prompt chunk run eagerly.
SCALE_NAMES = OPERATOR_CLASSES + ("linear_decode", "linear_memory")
LINEAR_ROOFLINES = ("max", "sum")
PROFILE_DIR = Path(__file__).with_name("profiles")

# Defaults for an uncalibrated device, as fractions of the datasheet peaks. The GEMM fraction
# is anchors.md's 783 of 989 TFLOP/s on an H100; the bandwidth fraction its 3.0 of 3.35 TB/s.
_GEMM_FRACTION = {"gpu": 0.79, "cpu": 1.0}  # CPU peaks in the catalog are already measured GEMM rates
_ATTENTION_FRACTION = 0.5
_BANDWIDTH_FRACTION = {"gpu": 0.85, "cpu": 0.9}
_GEMM_M_HALF = {"gpu": 48.0, "cpu": 32.0}  # rows at which a GEMM reaches half its large-M rate
# Python-side costs of the current engine (scheduler, input preparation, per-layer launches),
# before calibration replaces them. GPU: an eager layer is ~a dozen launches at ~8 us (anchors.md),
# ~100 us; decode-only steps replay a CUDA graph, where a layer's kernels cost ~2 us each back to
# back (~20 us), so 80 us of it is charged only to steps that carry a prompt chunk.
_OVERHEADS = {
    "gpu": {"step_overhead_s": 1.5e-3, "sequence_overhead_s": 1.5e-5, "layer_overhead_s": 2.0e-5,
            "chunk_layer_overhead_s": 8.0e-5, "prefill_sequence_layer_overhead_s": 2.5e-5},
    "cpu": {"step_overhead_s": 2.0e-3, "sequence_overhead_s": 2.0e-5, "layer_overhead_s": 5.0e-5,
            "prefill_sequence_layer_overhead_s": 3.0e-5},
}
# GPUs run the Triton backend's paged kernels (each sequence's KV read once, unpadded); CPUs the
# portable backend's padded gathers.
_PAGED_ATTENTION = {"gpu": True, "cpu": False}
# Share of the dynamic power range (max - idle) that a device at full FLOP rate, or at full
# bandwidth, draws. Used to derive per-FLOP and per-byte energies from the board power.
_FLOP_POWER_SHARE = 0.6
_BYTE_POWER_SHARE = 0.4


# The terms that are the host's (Python) work, not device time. Machines lent as one GPU kind differ up to 2x in host
# speed, and the steps they time differ by one factor on these terms (docs/perf-model.md, H100 2026-12-06 (l)):
# ``DeviceProfile.with_host_scale``, fitted to measured steps by ``joule.perf.host_scale``. A graph replay's per-layer
# terms are gaps on the device and stay: ``chunk_pass_layer_overhead_s`` always, ``layer_overhead_s`` where the profile
# says so (``graph_layer_overhead_on_device``; elsewhere it is launches, host work).
HOST_TERMS = ("step_overhead_s", "sequence_overhead_s", "streamed_sequence_overhead_s", "metered_sequence_overhead_s",
              "metered_step_overhead_s", "prefill_sequence_layer_overhead_s", "chunk_layer_overhead_s",
              "finish_overhead_s", "finish_token_overhead_s", "wake_overhead_s")


@dataclass
class DeviceProfile:
    """Achievable rates, per-class scale factors, fixed overheads and energy coefficients."""

    hardware: str
    dtype: str
    gemm_flops: float  # FLOP/s a large-M GEMM reaches
    gemm_m_half: float  # GEMM rate at M rows = gemm_flops * M / (M + gemm_m_half)
    attention_flops: float  # FLOP/s of attention math (QK^T, softmax, PV)
    memory_bandwidth: float  # bytes/s a streaming kernel reaches
    scales: dict[str, float] = field(default_factory=lambda: {name: 1.0 for name in SCALE_NAMES})
    # Host work per step and per sequence of an unobserved step: FINAL_ONLY outputs, no energy metering (profiles
    # calibrated before 2026-12-05 (a) have the three terms below at 0: theirs hold streamed, metered steps' costs).
    step_overhead_s: float = 0.0
    sequence_overhead_s: float = 0.0
    # ... and on top (``joule.perf.output_costs``): per sampled sequence whose request streams its outputs, per
    # sequence of a metered step, per metered step.
    streamed_sequence_overhead_s: float = 0.0
    metered_sequence_overhead_s: float = 0.0
    metered_step_overhead_s: float = 0.0
    layer_overhead_s: float = 0.0
    # Per layer and prompt sequence of an eager step with a prompt chunk (the portable attention backend loops
    # over prompt chunks; its decodes, and every row on a GPU, are batched). Profiles before 2026-12-04 (g)
    # counted the step's decodes too.
    prefill_sequence_layer_overhead_s: float = 0.0
    # Per layer, only in steps that carry a prompt chunk: on a GPU those run eagerly (a launch per
    # kernel) while decode-only steps replay a captured CUDA graph.
    chunk_layer_overhead_s: float = 0.0
    # Per layer and graph pass, more in a step whose prompt chunks replay CUDA graphs than in a decode-only
    # replay (older profiles: 0, both alike).
    chunk_pass_layer_overhead_s: float = 0.0
    # A CUDA-graph step's per-layer overhead is time on the device (gaps in the chain of dependent kernels),
    # which the decode lookahead cannot hide behind host work; older profiles counted it as host time.
    graph_layer_overhead_on_device: bool = False
    # The portable backend's decode path gathers every decoding sequence's KV padded to the longest
    # one, copying it (read + write + read: 3 passes); a paged kernel reads it once, unpadded.
    decode_attention_padded: bool = True
    kv_passes: float = 3.0
    # The portable backend on a CPU keeps decoding sequences' KV as dense copies between decode-only
    # steps (read once, one token appended per step) and rebuilds them when the decoding set
    # changes, at this cost per row token per layer; copies beyond ``staging_max_copy_bytes``
    # (half the KV cache calibration ran with; 0 = no bound) fall back to gathers.
    # GPU: an eager step's kernels run while later ones are launched, so its per-layer host work and
    # its device time overlap (the step takes the larger); a CPU does both on the same cores.
    host_overlaps_device: bool = False
    # How a GEMM's compute and weight streaming combine: "max" (roofline: a GPU overlaps them) or
    # "sum" (CPU: small-M GEMMs compute at cache speed after streaming each weight from DRAM),
    # then linear_memory scales the streaming part.
    linear_roofline: str = "max"
    # GPU engines that capture prompt-chunk graphs (joule/runtime/prefill_graphs.py): a step with at
    # most ``max_graphed_chunks`` chunks of at most ``chunk_graph_max_tokens`` replays the decode
    # graph and one padded graph per chunk (each reading the weights again) instead of running
    # eagerly. 0: no chunk graphs.
    chunk_graph_max_tokens: int = 0
    max_graphed_chunks: int = 4
    decode_staging: bool = False
    staging_rebuild_s_per_token_layer: float = 0.0
    # Host work of request events, outside the forward pass: per request finishing in a step (its
    # output closed) and per KV token it held (its blocks hashed into the prefix cache and freed), and
    # once for the first step after the engine sat idle (waiting for an arrival: cold caches, clocks).
    finish_overhead_s: float = 0.0
    finish_token_overhead_s: float = 0.0
    wake_overhead_s: float = 0.0
    staging_max_copy_bytes: float = 0.0
    # Measured [rows, FLOP/s] of the decoder-layer GEMMs and of lm_head (calibration); when present
    # they replace the parametric curve, interpolated log-log in rows and clamped at the ends.
    gemm_curve: list[list[float]] = field(default_factory=list)
    lm_head_curve: list[list[float]] = field(default_factory=list)
    idle_watts: float = 0.0
    max_watts: float = 0.0
    energy_per_flop: float = 0.0  # joules
    energy_per_byte: float = 0.0  # joules
    # Where idle_watts and the per-FLOP / per-byte energies come from: the catalog's board power, or a fit to a
    # hardware meter (``joule.perf.energy_fit``).
    energy_source: str = "catalog: board power split 60/40 over peak FLOP/s and bandwidth"
    source: str = ""
    # The host probe (``joule.perf.host_probe``) on the calibration's host, seconds; None before it was recorded.
    host_probe_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("gemm_flops", "attention_flops", "memory_bandwidth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"profile {self.hardware}: {name} must be positive, got {getattr(self, name)!r}")
        if self.gemm_m_half < 0:
            raise ValueError(f"profile {self.hardware}: gemm_m_half must be non-negative")
        unknown = set(self.scales) - set(SCALE_NAMES)
        if unknown:
            raise ValueError(f"profile {self.hardware}: unknown operator classes {sorted(unknown)}")
        scales = {name: float(self.scales.get(name, 1.0)) for name in OPERATOR_CLASSES}
        scales["linear_decode"] = float(self.scales.get("linear_decode", scales["linear"]))  # older profiles
        scales["linear_memory"] = float(self.scales.get("linear_memory", 1.0))
        self.scales = scales
        if self.linear_roofline not in LINEAR_ROOFLINES:
            raise ValueError(f"profile {self.hardware}: linear_roofline must be one of {LINEAR_ROOFLINES}, "
                             f"got {self.linear_roofline!r}")

    @property
    def element_bytes(self) -> int:
        return 4 if self.dtype in ("float32", "fp32", "float") else 2

    def gemm_rate(self, rows: float, lm_head: bool = False) -> float:
        """FLOP/s of a GEMM with ``rows`` rows: the measured curve if any, else the parametric one."""
        curve = self.lm_head_curve if lm_head and self.lm_head_curve else self.gemm_curve
        if curve:
            points = np.asarray(curve, dtype=float)
            return float(np.exp(np.interp(np.log(rows), np.log(points[:, 0]), np.log(points[:, 1]))))
        return self.gemm_flops * rows / (rows + self.gemm_m_half)

    @property
    def has_measured_gemms(self) -> bool:
        return bool(self.gemm_curve)

    @classmethod
    def from_hardware(cls, spec: HardwareSpec, dtype: str | None = None) -> DeviceProfile:
        """Uncalibrated defaults from the catalog's peaks (fractions documented in this module)."""
        dtype = dtype or spec.default_dtype()
        peak = spec.peak_flops(dtype)
        dynamic_watts = spec.max_watts - spec.idle_watts
        return cls(
            hardware=spec.name,
            dtype=dtype,
            gemm_flops=peak * _GEMM_FRACTION[spec.kind],
            gemm_m_half=_GEMM_M_HALF[spec.kind],
            attention_flops=peak * _ATTENTION_FRACTION,
            memory_bandwidth=spec.memory_bandwidth * _BANDWIDTH_FRACTION[spec.kind],
            idle_watts=spec.idle_watts,
            max_watts=spec.max_watts,
            energy_per_flop=_FLOP_POWER_SHARE * dynamic_watts / peak,
            energy_per_byte=_BYTE_POWER_SHARE * dynamic_watts / spec.memory_bandwidth,
            source=f"defaults from the catalog entry for {spec.name} (uncalibrated)",
            decode_attention_padded=not _PAGED_ATTENTION[spec.kind],
            host_overlaps_device=spec.kind == "gpu",
            kv_passes=1.0 if _PAGED_ATTENTION[spec.kind] else 3.0,
            **_OVERHEADS[spec.kind],
        )

    # -- files ---------------------------------------------------------------------------
    def with_host_scale(self, scale: float) -> DeviceProfile:
        """This profile on a host ``scale`` times as slow as the calibration's (0.5: twice as fast)."""
        if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
            raise ValueError(f"host_scale must be a positive number, got {scale!r}")
        terms = HOST_TERMS if self.graph_layer_overhead_on_device else HOST_TERMS + ("layer_overhead_s",)
        return replace(self, **{name: getattr(self, name) * scale for name in terms})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DeviceProfile:
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"profile has unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> DeviceProfile:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"could not read profile {path}: {error}") from None
        return cls.from_dict(data)


def shipped_profile_path(hardware: str, dtype: str) -> Path:
    return PROFILE_DIR / f"{hardware.lower()}-{dtype}.json"


def resolve_profile(hardware: str, dtype: str | None = None, profile_path: str | Path | None = None,
                    calibrated: bool = True) -> DeviceProfile:
    """An explicit profile file, else the shipped calibrated profile (unless ``calibrated`` is False:
    then every kind gets catalog defaults, for like-for-like comparisons), else catalog defaults."""
    if profile_path is not None:
        return DeviceProfile.load(profile_path)
    spec = get_hardware(hardware)
    dtype = dtype or spec.default_dtype()
    shipped = shipped_profile_path(spec.name, dtype)
    if calibrated and shipped.is_file():
        return DeviceProfile.load(shipped)
    return DeviceProfile.from_hardware(spec, dtype)
