"""Hardware catalog: the peak numbers a roofline needs, with where each came from.

Every accelerator figure is the vendor's dense (no 2:4 sparsity) tensor-core
number for bf16/fp16, the memory bandwidth and size of the datasheet, and the
board power limit (TDP) as ``max_watts``. Idle power is a typical
``nvidia-smi`` reading for an idle, clocked-down board; hourly prices are
on-demand cloud list prices for one GPU (late 2025) and are only defaults:
pass your own with ``--price KIND=USD`` or :func:`with_price`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

TERA = 1e12
GIGA = 1e9
GIB = 1 << 30


@dataclass(frozen=True)
class HardwareSpec:
    """One device as the step model sees it: what it can do at best, what it draws, what it costs."""

    name: str
    kind: str  # "gpu" or "cpu"
    peak_flops_bf16: float  # dense FLOP/s in bf16 (fp16 is the same on every GPU listed)
    peak_flops_fp32: float  # FLOP/s in fp32 (CUDA cores on GPUs; what a CPU GEMM reaches)
    memory_bandwidth: float  # bytes/s, datasheet (or measured for CPUs)
    memory_bytes: int
    idle_watts: float
    max_watts: float
    hourly_usd: float
    source: str  # where the numbers come from

    def __post_init__(self) -> None:
        for name in ("peak_flops_bf16", "peak_flops_fp32", "memory_bandwidth", "memory_bytes", "max_watts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{self.name}: {name} must be positive, got {getattr(self, name)!r}.")
        if not 0 <= self.idle_watts <= self.max_watts:
            raise ValueError(f"{self.name}: idle_watts must be in [0, max_watts], got {self.idle_watts}.")
        if self.hourly_usd < 0:
            raise ValueError(f"{self.name}: hourly_usd must be non-negative, got {self.hourly_usd}.")

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for a compute dtype name ("bfloat16", "float16", "float32")."""
        if dtype in ("bfloat16", "bf16", "float16", "fp16", "half"):
            return self.peak_flops_bf16
        if dtype in ("float32", "fp32", "float"):
            return self.peak_flops_fp32
        raise ValueError(f"unknown dtype {dtype!r}; expected bfloat16, float16 or float32.")

    def default_dtype(self) -> str:
        """The dtype Joule runs in on this device: bf16 on GPUs, fp32 on CPUs without AMX."""
        return "bfloat16" if self.peak_flops_bf16 > self.peak_flops_fp32 else "float32"


CATALOG: dict[str, HardwareSpec] = {
    spec.name: spec
    for spec in (
        HardwareSpec(
            "H100", "gpu", 989 * TERA, 67 * TERA, 3.35 * TERA, 80 * GIB, 70, 700, 3.00,
            "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, 80 GB, "
            "up to 700 W); anchors.md measured 783 TFLOP/s bf16 GEMM and 3.0 TB/s copy; price: typical "
            "on-demand 1-GPU H100 SXM list price",
        ),
        HardwareSpec(
            "H200", "gpu", 989 * TERA, 67 * TERA, 4.8 * TERA, 141 * GIB, 75, 700, 3.80,
            "NVIDIA H200 Tensor Core GPU datasheet (SXM: 989 TFLOP/s bf16 dense, 4.8 TB/s HBM3e, 141 GB, "
            "up to 700 W); price: typical on-demand 1-GPU H200 list price",
        ),
        HardwareSpec(
            "A100-80GB", "gpu", 312 * TERA, 19.5 * TERA, 2.039 * TERA, 80 * GIB, 50, 400, 1.80,
            "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM: 312 TFLOP/s bf16 dense, 2,039 GB/s HBM2e, "
            "400 W); price: typical on-demand 1-GPU A100 80GB list price",
        ),
        HardwareSpec(
            "L40S", "gpu", 362 * TERA, 91.6 * TERA, 864 * GIGA, 48 * GIB, 35, 350, 1.00,
            "NVIDIA L40S datasheet (362 TFLOP/s bf16 dense, 733 with sparsity; 864 GB/s GDDR6, 48 GB, "
            "350 W); price: typical on-demand 1-GPU L40S list price",
        ),
        HardwareSpec(
            "L4", "gpu", 121 * TERA, 30.3 * TERA, 300 * GIGA, 24 * GIB, 16, 72, 0.70,
            "NVIDIA L4 datasheet (121 TFLOP/s bf16 dense, 242 with sparsity; 300 GB/s GDDR6, 24 GB, 72 W); "
            "price: GCP g2-standard-4 on-demand",
        ),
        HardwareSpec(
            "A10G", "gpu", 70 * TERA, 31.2 * TERA, 600 * GIGA, 24 * GIB, 25, 300, 1.01,
            "AWS EC2 G5 documentation (A10G: 24 GB GDDR6, 600 GB/s, 300 W); NVIDIA publishes no A10G "
            "datasheet: 70 TFLOP/s dense fp16 tensor is the commonly cited figure; price: g5.xlarge on-demand",
        ),
        HardwareSpec(
            "CPU", "cpu", 1.5 * TERA, 3.0 * TERA, 200 * GIGA, 256 * GIB, 100, 350, 1.50,
            "generic 1-socket server CPU (32 cores with AVX-512 FMA at ~3 GHz gives ~3 TFLOP/s fp32; "
            "8 channels DDR5-4800 give ~300 GB/s peak, ~200 sustained); a representative figure, not one "
            "datasheet; bf16 set to half of fp32 because torch's bf16 GEMM without AMX is slower than fp32",
        ),
        HardwareSpec(
            "CPU-2core", "cpu", 147 * GIGA, 240 * GIGA, 23 * GIGA, 23 * GIB, 10, 40, 0.10,
            "the 2-core Xeon dev machine, measured (shared/anchors.md and runtime/device.py): ~207-240 "
            "GFLOP/s fp32 GEMM, ~147 GFLOP/s bf16 (AVX-512 BF16, no AMX), ~21-25 GB/s copy, 23 GiB RAM; "
            "power is an estimate for 2 vCPUs' share of a socket (no RAPL counters here); price: a 2-vCPU "
            "cloud VM",
        ),
    )
}

_ALIASES = {"h100-sxm": "H100", "h100sxm": "H100", "a100": "A100-80GB", "a100-80g": "A100-80GB", "cpu-dev": "CPU-2core"}


def get_hardware(name: str) -> HardwareSpec:
    """Look a device up by name, case-insensitively; the error lists what exists."""
    wanted = name.strip().lower()
    wanted = _ALIASES.get(wanted, wanted).lower()
    for key, spec in CATALOG.items():
        if key.lower() == wanted:
            return spec
    raise ValueError(f"unknown hardware {name!r}; known: {', '.join(CATALOG)}")


def with_price(spec: HardwareSpec, hourly_usd: float) -> HardwareSpec:
    """The same device at another hourly price (the catalog's prices are only defaults)."""
    return replace(spec, hourly_usd=hourly_usd)


def parse_price_overrides(text: str | None) -> dict[str, float]:
    """``"H100=2.1,L4=0.5"`` -> {"H100": 2.1, "L4": 0.5}, names checked against the catalog."""
    if not text:
        return {}
    prices: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"price override {item!r} must look like KIND=USD_PER_HOUR")
        try:
            prices[get_hardware(name).name] = float(value)
        except ValueError as error:
            raise ValueError(f"bad price override {item!r}: {error}") from None
    return prices
