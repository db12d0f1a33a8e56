"""The step model: FLOPs and bytes of one engine step, and its predicted time and energy.

A step is one flattened batch (see ``joule.engine.plan.StepPlan``): every
sequence brings ``num_new_tokens`` rows at positions after ``context_length``
cached ones, and sequences that complete their known tokens are sampled. Counts
are per operator class so a profile can scale each class on its own:

- linear: the q/k/v, o, gate/up and down projections of every layer over all
  rows, plus lm_head over the sampled rows only;
- attention_prefill / attention_decode: QK^T and PV for rows of chunks (q > 1)
  and of single-token decodes, plus reading the cached K/V;
- elementwise: embedding gather, RMSNorms, rope, SiLU-and-mul, residual adds,
  KV-cache writes;
- sampling: passes over the sampled rows' fp32 logits.

Time per class is a roofline ``max(FLOPs / rate, bytes / bandwidth)`` times the
profile's scale for the class; fixed overheads (per step, sequence, layer, and
per layer in steps that carry a prompt chunk, which on a GPU run eagerly while
decode-only steps replay a CUDA graph) are added. On a GPU the per-layer host
work of an eager step (launches) overlaps the kernels it launches, so such a
step takes the larger of the two, not their sum. Energy is idle power x time plus per-FLOP and per-byte energies, capped
at the board's maximum power.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from joule.engine.plan import StepPlan
from joule.model.config import ModelConfig
from joule.perf.batch_shape import BatchShape, SequenceWork  # noqa: F401  (re-exported)
from joule.perf.decode_staging import DecodeStaging, staging_capacity
from joule.perf.profile import OPERATOR_CLASSES, DeviceProfile
from joule.runtime.chunk_sizes import chunk_graph_sizes, chunk_pieces

_LOGITS_BYTES = 4  # the sampler works on fp32 logits
_SAMPLING_PASSES = 4  # cast, softmax/log-softmax, argmax or top-k, penalties: ~4 reads of V floats
_SAMPLING_FLOPS_PER_LOGIT = 8


@dataclass
class OperatorCount:
    flops: float = 0.0
    bytes: float = 0.0


@dataclass
class StepCost:
    """Predicted time per class (seconds), counts, total time and energy of one step."""

    counts: dict[str, OperatorCount]
    seconds: dict[str, float]
    overhead_seconds: float
    elapsed_seconds: float
    energy_joules: float
    # The part of ``overhead_seconds`` spent on the device (a graph replay's per-layer gaps between dependent
    # kernels): a step queued behind another cannot hide it behind the host.
    device_overhead_seconds: float = 0.0

    @property
    def device_seconds(self) -> float:
        return sum(self.seconds.values()) + self.device_overhead_seconds

    @property
    def host_seconds(self) -> float:
        return self.overhead_seconds - self.device_overhead_seconds

    @property
    def flops(self) -> float:
        return sum(count.flops for count in self.counts.values())

    @property
    def bytes(self) -> float:
        return sum(count.bytes for count in self.counts.values())


def layer_gemm_shapes(config: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, K, N) of each decoder-layer GEMM, q/k/v and gate/up merged as the engine runs them."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    return [
        ("qkv_proj", hidden, q_width + 2 * kv_width),
        ("o_proj", q_width, hidden),
        ("gate_up_proj", hidden, 2 * config.intermediate_size),
        ("down_proj", config.intermediate_size, hidden),
    ]


def gemm_count(rows: int, k: int, n: int, element_bytes: int) -> OperatorCount:
    """A [rows, k] x [k, n] product: 2*rows*k*n FLOPs; reads weights and input, writes output."""
    return OperatorCount(2.0 * rows * k * n, float(element_bytes) * (k * n + rows * k + rows * n))


def chunk_graph_rows(num_tokens: int, largest: int) -> int:
    """Rows of the captured chunk graph a chunk replays: the next power of two from 16, at most ``largest``
    (joule/runtime/prefill_graphs.py captures 16, 32, ... and the step's token budget)."""
    size = 16
    while size < num_tokens:
        size *= 2
    return min(size, largest)


def count_linear(config: ModelConfig, batch: BatchShape, element_bytes: int,
                 passes: list[int] | None = None) -> list[tuple[int, OperatorCount]]:
    """(rows, count) of every GEMM in the step: the layers' over all rows (or once per graph pass, each
    reading the weights again), lm_head over sampled rows (last).

    The last layer's GEMMs after q/k/v run on the rows that sample only (``LlamaForCausalLM.forward``'s
    ``output_rows``): an eager step's sampling rows (one where none samples), one row per prompt-chunk graph
    pass, every row of a decode pass."""
    gemms = []
    layers = config.num_hidden_layers
    sampled = batch.num_sampled
    decodes = sum(1 for sequence in batch.sequences if sequence.num_new_tokens == 1)
    for index, rows in enumerate(passes or [batch.num_tokens]):
        if passes is None:
            tail = rows if sampled >= rows else max(1, sampled)
        else:
            tail = rows if index == 0 and decodes else 1  # graph_passes puts the decodes' pass first
        for name, k, n in layer_gemm_shapes(config):
            full_layers = layers if name == "qkv_proj" or tail == rows else max(layers - 1, 0)
            count = gemm_count(rows, k, n, element_bytes)
            if full_layers:
                gemms.append((rows, OperatorCount(count.flops * full_layers, count.bytes * full_layers)))
            if full_layers < layers:
                gemms.append((tail, gemm_count(tail, k, n, element_bytes)))
    if sampled:
        gemms.append((sampled, gemm_count(sampled, config.hidden_size, config.vocab_size, element_bytes)))
    return gemms


def count_attention(
    config: ModelConfig, batch: BatchShape, element_bytes: int, profile: DeviceProfile | None = None
) -> tuple[OperatorCount, OperatorCount]:
    """(prefill, decode) attention counts over all layers.

    Causal QK^T and PV cost 4*heads*head_dim FLOPs per (query row, visible key) pair. Bytes: Q read,
    output written, and cached K/V read ``kv_passes`` times (a fresh prompt's K/V come straight from
    the projection, read once). A padding backend batches a step's decodes into one call, reading
    every decoding sequence's KV padded to the longest decode context.
    """
    layers, heads, kv_heads, head_dim = (
        config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    )
    kv_token_bytes = 2.0 * kv_heads * head_dim * element_bytes
    q_token_bytes = 2.0 * heads * head_dim * element_bytes  # read q, write output
    kv_passes = profile.kv_passes if profile is not None else 1.0
    padded = profile is not None and profile.decode_attention_padded
    staged = profile is not None and profile.decode_staging and batch.staging in ("append", "rebuild")
    decode_passes = 1.0 if staged else kv_passes  # dense copies are read once
    longest = max((s.context_length + 1 for s in batch.sequences if s.num_new_tokens == 1), default=0)
    prefill, decode = OperatorCount(), OperatorCount()
    for sequence in batch.sequences:
        q, context = sequence.num_new_tokens, sequence.context_length
        pairs = q * context + q * (q + 1) / 2.0
        flops = 4.0 * heads * head_dim * pairs
        if q > 1:
            passes = kv_passes if context > 0 else 1.0
            prefill.flops += flops
            prefill.bytes += q * q_token_bytes + (context + q) * kv_token_bytes * passes
        else:
            visible = longest if padded else context + 1
            decode.flops += 4.0 * heads * head_dim * visible
            decode.bytes += q_token_bytes + visible * kv_token_bytes * decode_passes
    for count in (prefill, decode):
        count.flops *= layers
        count.bytes *= layers
    return prefill, decode


def count_elementwise(config: ModelConfig, batch: BatchShape, element_bytes: int, rows: int | None = None) -> OperatorCount:
    """Norms, rope, activation, residuals and KV writes: streaming passes over activations (``rows``:
    padded rows of graph replays, else the step's)."""
    rows = batch.num_tokens if rows is None else rows
    hidden, inter = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    per_row_layer = (
        2 * 2 * hidden  # two RMSNorms: read + write
        + 2 * (q_width + kv_width)  # rope on q and k
        + 3 * inter  # SiLU(gate) * up: read 2, write 1
        + 2 * 3 * hidden  # two residual adds: read 2, write 1
        + 2 * kv_width  # K and V written to the cache
    )
    elements = rows * per_row_layer * config.num_hidden_layers + rows * 3 * hidden  # + embedding, final norm
    return OperatorCount(flops=2.0 * elements, bytes=float(elements * element_bytes))


def count_sampling(config: ModelConfig, batch: BatchShape) -> OperatorCount:
    logits = batch.num_sampled * config.vocab_size
    return OperatorCount(_SAMPLING_FLOPS_PER_LOGIT * logits, float(_SAMPLING_PASSES * _LOGITS_BYTES * logits))


class StepModel:
    """Predicts one step's time and energy for a model on a device profile."""

    def __init__(self, config: ModelConfig, profile: DeviceProfile):
        self.config = config
        self.profile = profile
        self.element_bytes = profile.element_bytes
        # predict_plan follows the step sequence of one engine (the simulator gives each replica its
        # own StepModel) to know which decode steps rebuild a staging backend's KV copies.
        self.staging = DecodeStaging(config.kv_cache_bytes_per_token(self.element_bytes),
                                     profile.staging_max_copy_bytes) if profile.decode_staging else None

    def resolve_staging(self, batch: BatchShape) -> BatchShape:
        """A shape whose staging mode is known: a decode-only step of unknown history on a staging
        profile is taken as the steady state (appending), or a gather beyond the copies' bound."""
        if self.staging is None or batch.staging or not batch.is_decode_only or not batch.sequences:
            return batch
        longest = max(s.context_length + 1 for s in batch.sequences)
        capacity = staging_capacity(longest)
        bound = self.profile.staging_max_copy_bytes
        fits = not bound or len(batch.sequences) * capacity * self.staging.kv_bytes_per_token <= bound
        return replace(batch, staging="append" if fits else "gather", staging_capacity=capacity if fits else 0)

    def class_seconds(self, batch: BatchShape) -> tuple[dict[str, OperatorCount], dict[str, float]]:
        """Unscaled roofline seconds per operator class (calibration fits the scales on these)."""
        profile, element_bytes = self.profile, self.element_bytes
        bandwidth = profile.memory_bandwidth
        counts: dict[str, OperatorCount] = {}
        seconds: dict[str, float] = {}
        passes = self.graph_passes(batch)
        counts["linear"], seconds["linear"], _, _ = self.linear_parts(batch, passes)
        prefill, decode = count_attention(self.config, batch, element_bytes, profile)
        for name, count in (("attention_prefill", prefill), ("attention_decode", decode)):
            counts[name] = count
            seconds[name] = max(count.flops / profile.attention_flops, count.bytes / bandwidth)
        counts["elementwise"] = count_elementwise(self.config, batch, element_bytes, sum(passes) if passes else None)
        counts["sampling"] = count_sampling(self.config, batch)
        for name in ("elementwise", "sampling"):
            seconds[name] = counts[name].bytes / bandwidth
        return counts, seconds

    def linear_parts(self, batch: BatchShape, passes: list[int] | None = None
                     ) -> tuple[OperatorCount, float, float, float]:
        """(count, roofline seconds, compute seconds, weight-streaming seconds) of the step's GEMMs.

        Measured curves come from one cache-resident weight (compute); streaming every layer's
        weights from memory is the bytes term. Roofline seconds are their max per GEMM."""
        profile, bandwidth = self.profile, self.profile.memory_bandwidth
        linear = OperatorCount()
        roofline = compute_total = memory_total = 0.0
        gemms = count_linear(self.config, batch, self.element_bytes, passes)
        for index, (rows, count) in enumerate(gemms):
            linear.flops += count.flops
            linear.bytes += count.bytes
            is_lm_head = index == len(gemms) - 1 and batch.num_sampled > 0
            compute = count.flops / profile.gemm_rate(rows, lm_head=is_lm_head)
            memory = count.bytes / bandwidth
            roofline += max(compute, memory)
            compute_total += compute
            memory_total += memory
        return linear, roofline, compute_total, memory_total

    def graph_passes(self, batch: BatchShape) -> list[int] | None:
        """Rows of each graph replay of a step with prompt chunks that the profile's engine runs as
        CUDA graphs (its decodes, then each chunk's passes, each padded to a captured size); None when it runs eagerly
        (or is decode-only: one replay, the usual case)."""
        largest = self.profile.chunk_graph_max_tokens
        if not largest or batch.is_decode_only:
            return None
        chunks = [s.num_new_tokens for s in batch.sequences if s.num_new_tokens > 1]
        if len(chunks) > self.profile.max_graphed_chunks or max(chunks) > largest:
            return None
        decodes = sum(1 for s in batch.sequences if s.num_new_tokens == 1)
        sizes = chunk_graph_sizes(largest)
        return ([decodes] if decodes else []) + [chunk_graph_rows(piece, largest)
                                                 for n in chunks for piece in chunk_pieces(n, sizes)]

    def is_eager_chunk_step(self, batch: BatchShape) -> bool:
        return not batch.is_decode_only and self.graph_passes(batch) is None

    def host_layer_seconds(self, batch: BatchShape) -> float:
        """Per-layer host work: kernel launches (per graph replay), and in eager steps with a chunk
        their launches and the per-sequence attention loop."""
        profile, layers = self.profile, self.config.num_hidden_layers
        passes = self.graph_passes(batch)
        seconds = profile.layer_overhead_s * layers * (len(passes) if passes else 1)
        if passes:
            seconds += profile.chunk_pass_layer_overhead_s * layers * len(passes)
        if passes is None and not batch.is_decode_only:
            seconds += (profile.prefill_sequence_layer_overhead_s * batch.num_prompt_sequences
                        + profile.chunk_layer_overhead_s) * layers
        return seconds

    def overhead_seconds(self, batch: BatchShape) -> float:
        profile = self.profile
        num_sequences = len(batch.sequences)
        seconds = profile.step_overhead_s + profile.sequence_overhead_s * num_sequences + self.host_layer_seconds(batch)
        seconds += profile.streamed_sequence_overhead_s * batch.num_streamed
        if batch.metered:
            seconds += profile.metered_step_overhead_s + profile.metered_sequence_overhead_s * num_sequences
        if batch.staging == "rebuild":
            layers = self.config.num_hidden_layers
            seconds += profile.staging_rebuild_s_per_token_layer * num_sequences * batch.staging_capacity * layers
        seconds += self.event_seconds(batch)
        return seconds

    def event_seconds(self, batch: BatchShape) -> float:
        """Host work of request events: finishing requests (output closed, blocks cached and freed: per
        request and per KV token) and the first step after the engine sat idle."""
        profile = self.profile
        return (profile.finish_overhead_s * batch.num_finished
                + profile.finish_token_overhead_s * batch.finished_tokens
                + (profile.wake_overhead_s if batch.after_idle else 0.0))

    def predict(self, batch: BatchShape) -> StepCost:
        if not batch.sequences:
            return StepCost({}, {}, 0.0, 0.0, 0.0)
        batch = self.resolve_staging(batch)
        counts, raw = self.class_seconds(batch)
        scales = dict(self.profile.scales)
        if batch.is_decode_only:
            scales["linear"] = scales["linear_decode"]
        seconds = {name: raw[name] * scales[name] for name in OPERATOR_CLASSES}
        if self.profile.linear_roofline == "sum":
            _, _, compute, memory = self.linear_parts(batch, self.graph_passes(batch))
            seconds["linear"] = scales["linear"] * compute + scales["linear_memory"] * memory
        overhead = self.overhead_seconds(batch)
        device = sum(seconds.values())
        on_device = self.host_layer_seconds(batch) if self.replays_graphs(batch) else 0.0
        if batch.queued:
            elapsed = max(overhead - on_device, device + on_device)
        elif self.profile.host_overlaps_device and self.is_eager_chunk_step(batch):
            # An eager GPU step: kernels run while later ones are still being launched.
            host = self.host_layer_seconds(batch)
            elapsed = overhead - host + max(host, device)
        else:
            elapsed = device + overhead
        return StepCost(counts, seconds, overhead, elapsed, self.energy(counts, elapsed), on_device)

    def replays_graphs(self, batch: BatchShape) -> bool:
        """The step runs as CUDA graph replays, so its per-layer overhead is device time (the gaps between
        dependent kernels), not launches: profiles that say so (``graph_layer_overhead_on_device``)."""
        if not self.profile.graph_layer_overhead_on_device:
            return False
        return batch.is_decode_only or self.graph_passes(batch) is not None

    def predict_plan(self, plan: StepPlan, finished_ids=frozenset(), after_idle: bool = False,
                     queued: bool = False, metered: bool = True) -> StepCost:
        """One step of the engine this model follows (plans in order: see ``DecodeStaging``)."""
        shape = BatchShape.from_plan(plan, finished_ids, after_idle, queued, metered)
        if self.staging is not None:
            self.staging.observe_plan(plan, shape)
        return self.predict(shape)

    def busy_joules(self, batch: BatchShape, elapsed: float) -> float:
        """Energy of a step that took ``elapsed`` seconds (measured, not predicted) above idle power: its FLOPs and
        bytes at the profile's per-FLOP and per-byte energies, never above (max - idle) power x time."""
        if not batch.sequences:
            return 0.0
        counts, _ = self.class_seconds(self.resolve_staging(batch))
        return self.energy(counts, elapsed) - self.profile.idle_watts * elapsed

    def energy(self, counts: dict[str, OperatorCount], elapsed: float) -> float:
        """Idle power for the whole step plus dynamic energy, never above max power x time."""
        profile = self.profile
        flops = sum(count.flops for count in counts.values())
        moved = sum(count.bytes for count in counts.values())
        joules = profile.idle_watts * elapsed + profile.energy_per_flop * flops + profile.energy_per_byte * moved
        if profile.max_watts > 0:
            joules = min(joules, profile.max_watts * elapsed)
        return joules
