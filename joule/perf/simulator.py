"""Discrete-event serving simulator over the engine's own EngineCore, Scheduler and KVBlockManager.

Each replica is a real ``EngineCore`` whose executor is a ``SimulatedExecutor``
and whose clock is the simulated time, so every scheduling decision (token
budget, chunking, admission, preemption, prefix-cache hits) is made by the code
that serves. Events are request arrivals and step completions; a step that
starts at t ends at t + predicted step time, and its tokens appear then.
Arrivals during a step join the waiting queue and are considered by the next
step, as in the engine. A router assigns each arrival to a replica.
Each request's record keeps its largest gap between tokens, so a TBT SLO
(``SLO.tbt_s``) is judged in ``SimulationResult.summary`` like TTFT and TPOT;
the engine's ``RequestSLO`` has no TBT, so the ``deadline`` policy does not
schedule against it.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from joule.engine.core import EngineCore, lookahead_on
from joule.engine.kv_blocks import KVBlockManager
from joule.engine.policies import DEFAULT_FAIR_PROMPT_CAP
from joule.engine.request import Request, RequestSLO
from joule.engine.scheduler_config import SchedulerConfig
from joule.model.config import ModelConfig
from joule.perf.arrivals import TimedRequest
from joule.perf.hardware import HardwareSpec, get_hardware
from joule.perf.metrics import ReplicaTotals, RequestRecord, SimulationResult
from joule.perf.profile import DeviceProfile, resolve_profile
from joule.perf.simulated_executor import SimulatedExecutor
from joule.perf.step_model import StepModel
from joule.sampling_params import RequestOutputKind, SamplingParams

ROUTERS = ("least_loaded", "round_robin")
_GPU_ACTIVATION_RESERVE_BYTES = 2 << 30  # what the engine keeps back on a GPU (runtime/device.py)
_CPU_KV_MAX_BYTES = 2 << 30  # the engine's default CPU KV budget cap (runtime/device.py)


@dataclass
class ReplicaConfig:
    """One engine instance: a device (with its calibrated profile) and the engine settings."""

    hardware: HardwareSpec
    profile: DeviceProfile
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_kv_blocks: int | None = None  # None: what fits in memory after the weights
    gpu_memory_utilization: float = 0.9
    scheduling_policy: str = "fcfs"
    admission_policy: str = "greedy"
    enable_chunked_prefill: bool = True  # False: the prefill-first baseline
    fair_prompt_cap: int = DEFAULT_FAIR_PROMPT_CAP  # the fair policy's prompt tokens per step while it protects a tenant
    fair_split_decodes: bool = False  # ... and runs the flooding tenants' decodes half per step
    fair_keep_up: bool = True  # ... but never shorter than they need to keep up (the engine's default)
    # The engine's --decode-lookahead (continuation steps' host work overlaps); None: the engine's default,
    # on for a GPU, off for a CPU.
    decode_lookahead: bool | None = None
    lookahead_prompts: bool = True  # ... which also queues steps with prompt chunks under fcfs (the engine's default)
    metered: bool = True  # the energy ledger meters every step (benchmarks that time the engine alone turn it off)

    @classmethod
    def for_hardware(cls, name: str, profile_path=None, dtype: str | None = None, calibrated: bool = True,
                     **settings) -> "ReplicaConfig":
        spec = get_hardware(name)
        return cls(spec, resolve_profile(spec.name, dtype, profile_path, calibrated), **settings)

    def kv_blocks(self, model: ModelConfig) -> int:
        """KV blocks that fit: explicit, else memory x utilization - weights (- reserve on GPUs)."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        element_bytes = self.profile.element_bytes
        weights = model.num_parameters * element_bytes
        if self.hardware.kind == "gpu":
            budget = self.hardware.memory_bytes * self.gpu_memory_utilization - weights - _GPU_ACTIVATION_RESERVE_BYTES
        else:
            budget = min(self.hardware.memory_bytes * self.gpu_memory_utilization - weights, _CPU_KV_MAX_BYTES)
        blocks = int(budget // (model.kv_cache_bytes_per_token(element_bytes) * self.block_size))
        if blocks < 1:
            raise ValueError(
                f"{model.num_parameters / 1e9:.2f}B parameters ({weights / 2**30:.1f} GiB) leave no room for a KV "
                f"cache on {self.hardware.name} ({self.hardware.memory_bytes / 2**30:.0f} GiB)"
            )
        return blocks

    def simulated_kv_blocks(self, model: ModelConfig) -> int:
        """``kv_blocks``, capped where more could never be owned at once (max_num_seqs full-length
        sequences, twice over for prefix-cache room): a small model on a big GPU would otherwise
        build millions of block objects. Only how long freed prefixes stay cached can differ."""
        blocks = self.kv_blocks(model)
        if self.num_kv_blocks is not None:
            return blocks
        per_sequence = -(-min(self.max_model_len, model.max_position_embeddings) // self.block_size)
        return min(blocks, 2 * self.max_num_seqs * per_sequence)

    def label(self) -> str:
        extras = "".join(
            f",{name}={value}" for name, value, default in (
                ("policy", self.scheduling_policy, "fcfs"), ("admission", self.admission_policy, "greedy"),
                ("chunked", self.enable_chunked_prefill, True),
            ) if value != default
        )
        return f"{self.hardware.name}(seqs={self.max_num_seqs},tokens={self.max_num_batched_tokens}{extras})"


class _Replica:
    """An EngineCore on simulated time, with its ledger."""

    def __init__(self, index: int, config: ReplicaConfig, model: ModelConfig, record_plans: bool,
                 eos_token_id: int | None, eos_probability: float, fixed_step_seconds: float | None):
        self.index = index
        self.now = 0.0
        self.busy = False
        self.free_at = -math.inf  # when its last step ends: a request arriving before then waits for it
        num_blocks = config.simulated_kv_blocks(model)
        max_model_len = min(config.max_model_len, num_blocks * config.block_size, model.max_position_embeddings)
        scheduler_config = SchedulerConfig(
            config.max_num_seqs, config.max_num_batched_tokens, max_model_len, policy=config.scheduling_policy,
            admission=config.admission_policy, enable_chunked_prefill=config.enable_chunked_prefill,
            fair_prompt_cap=config.fair_prompt_cap, fair_split_decodes=config.fair_split_decodes,
            fair_keep_up=config.fair_keep_up,
            lookahead_prompts=config.lookahead_prompts,
        )
        self.executor = SimulatedExecutor(
            StepModel(model, config.profile), model.vocab_size, eos_token_id, eos_probability,
            fixed_step_seconds=fixed_step_seconds, record_plans=record_plans, metered=config.metered,
        )
        self.core = EngineCore(
            scheduler_config, KVBlockManager(num_blocks, config.block_size, config.enable_prefix_caching),
            self.executor, clock=lambda: self.now,
            decode_lookahead=lookahead_on(config.decode_lookahead, config.hardware.kind == "gpu"),
        )
        self.outstanding = 0
        self.outstanding_tokens = 0
        self.totals = ReplicaTotals(config.hardware.name, config.hardware.hourly_usd, config.profile.idle_watts)


class Router:
    """Picks a replica for each arrival: round robin, or least outstanding work weighted by capacity."""

    def __init__(self, policy: str, weights: list[float]):
        if policy not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {policy!r}")
        self.policy = policy
        self.weights = weights
        self._next = 0

    def choose(self, replicas: list[_Replica]) -> _Replica:
        if self.policy == "round_robin":
            replica = replicas[self._next % len(replicas)]
            self._next += 1
            return replica
        return min(replicas, key=lambda r: ((r.outstanding_tokens + 1) / self.weights[r.index], r.index))


class ClusterSimulator:
    """Replays timed requests on data-parallel replicas; returns per-request records and ledgers."""

    def __init__(
        self,
        model: ModelConfig,
        replicas: list[ReplicaConfig],
        router: str = "least_loaded",
        router_weights: list[float] | None = None,
        record_plans: bool = False,
        eos_token_id: int | None = None,
        eos_probability: float = 0.0,
        ignore_eos: bool = True,
        fixed_step_seconds: float | None = None,
        request_slo: RequestSLO | None = None,
        streamed_outputs: bool = True,
    ):
        """``request_slo`` is given to every request, so the ``deadline`` policy can schedule against it.
        ``streamed_outputs``: clients stream (DELTA, as a server's do), or take one output at the end (FINAL_ONLY,
        as ``LLM.generate``): the host work of an output every step is charged only for the first."""
        if not replicas:
            raise ValueError("a simulation needs at least one replica")
        self.model = model
        self.replicas = [
            _Replica(index, config, model, record_plans, eos_token_id, eos_probability, fixed_step_seconds)
            for index, config in enumerate(replicas)
        ]
        weights = router_weights or [1.0] * len(replicas)
        if len(weights) != len(replicas) or min(weights) <= 0:
            raise ValueError("router_weights needs one positive weight per replica")
        self.router = Router(router, weights)
        self.ignore_eos = ignore_eos and eos_probability == 0
        self.eos_ids = frozenset() if eos_token_id is None else frozenset({eos_token_id})
        self.request_slo = request_slo
        self.output_kind = RequestOutputKind.DELTA if streamed_outputs else RequestOutputKind.FINAL_ONLY

    def _make_request(self, timed: TimedRequest) -> Request:
        output_len = timed.request.output_len
        params = SamplingParams(
            max_tokens=output_len, ignore_eos=self.ignore_eos, temperature=0.0, output_kind=self.output_kind,
        )
        slo = self.request_slo
        if timed.slo is not None and (timed.slo.ttft_s is not None or timed.slo.tpot_s is not None):
            slo = RequestSLO(ttft_seconds=timed.slo.ttft_s, tpot_seconds=timed.slo.tpot_s)  # its tenant's targets
        return Request(
            request_id=timed.request_id, prompt_token_ids=timed.request.prompt_token_ids, sampling_params=params,
            max_tokens=output_len, eos_token_ids=self.eos_ids, arrival_time=timed.arrival_time, slo=slo,
            tenant=timed.tenant,
        )

    def run(self, requests: list[TimedRequest], progress: bool = False) -> SimulationResult:
        """Every request served in simulated time; ``progress`` shows a bar of finished requests (stderr, on a
        terminal only: logs stay clean)."""
        from tqdm.auto import tqdm

        with tqdm(total=len(requests), desc="simulated requests", unit="req", disable=None if progress else True,
                  dynamic_ncols=True, leave=False) as bar:
            return self._run(requests, bar)

    def _run(self, requests: list[TimedRequest], bar) -> SimulationResult:
        ordered = sorted(requests, key=lambda timed: timed.arrival_time)
        records: dict[str, RequestRecord] = {}
        result = SimulationResult([], [replica.totals for replica in self.replicas])
        steps: list[tuple[float, int]] = []  # (time, replica index) of pending step starts
        next_arrival = 0
        while next_arrival < len(ordered) or steps:
            arrival_time = ordered[next_arrival].arrival_time if next_arrival < len(ordered) else math.inf
            if steps and steps[0][0] < arrival_time:
                time, index = heapq.heappop(steps)
                bar.update(self._step(self.replicas[index], time, records, result, steps))
                continue
            timed = ordered[next_arrival]
            next_arrival += 1
            replica = self.router.choose(self.replicas)
            request = self._make_request(timed)
            replica.core.add_request(request)  # raises if it can never fit, as the engine does
            record = RequestRecord(timed.request_id, timed.arrival_time, len(request.prompt_token_ids), replica.index,
                                   tenant=timed.tenant, slo=timed.slo)
            records[timed.request_id] = record
            result.records.append(record)
            replica.outstanding += 1
            replica.outstanding_tokens += len(request.prompt_token_ids) + request.max_tokens
            if not replica.busy:
                replica.busy = True
                # A replica that emptied in its last step is still running it: an arrival before that step ends
                # waits for it (as the engine adds requests between steps) and finds it awake; one after, wakes
                # it, and that first step pays the wake-up (profile.wake_overhead_s).
                replica.executor.after_idle = timed.arrival_time > replica.free_at
                heapq.heappush(steps, (max(timed.arrival_time, replica.free_at), replica.index))
        return result

    def _step(self, replica: _Replica, time: float, records: dict, result: SimulationResult, steps: list) -> int:
        """One step of one replica; returns how many requests it finished."""
        replica.now = time
        progressed = replica.core.step()
        stats = replica.core.last_step
        totals = replica.totals
        totals.num_preemptions += len(stats.preempted_request_ids)
        if stats.num_sequences == 0:
            if stats.preempted_request_ids:  # it preempted itself: try again at once with the freed blocks
                heapq.heappush(steps, (time, replica.index))
                return 0
            scheduler = replica.core.scheduler
            if scheduler.waiting and not scheduler.running:
                raise RuntimeError(
                    f"replica {replica.index} stalled: {len(scheduler.waiting)} waiting requests and none can be scheduled"
                )
            replica.busy = False  # nothing runnable: sleep until the next arrival wakes it
            return 0
        end = time + stats.elapsed_seconds
        finished = 0
        totals.num_steps += 1
        totals.busy_seconds += stats.elapsed_seconds
        totals.busy_joules += stats.energy_joules or 0.0
        for request in progressed:
            record = records[request.request_id]
            count = request.num_output_tokens
            if count > record.num_output_tokens:
                if record.first_token_time is None:
                    record.first_token_time = end
                else:
                    gap = end - record.last_token_time
                    result.itl.append(gap)
                    record.max_itl = max(record.max_itl, gap)
                record.last_token_time = end
                record.num_output_tokens = count
            if request.is_finished:
                finished += 1
                record.finish_time = end
                replica.outstanding -= 1
                replica.outstanding_tokens -= request.num_prompt_tokens + request.max_tokens
        if replica.core.has_unfinished_requests():
            heapq.heappush(steps, (end, replica.index))
        else:
            replica.busy, replica.free_at = False, end
        return finished

    def plans(self, replica_index: int = 0):
        """Recorded plans of one replica (with ``record_plans=True``)."""
        return self.replicas[replica_index].executor.plans


def simulate(model: ModelConfig, replica: ReplicaConfig, requests: list[TimedRequest], num_replicas: int = 1,
             router: str = "least_loaded") -> SimulationResult:
    """One kind of replica, ``num_replicas`` times."""
    return ClusterSimulator(model, [replica] * num_replicas, router).run(requests)
