"""LLMEngine: text in, incremental RequestOutputs out.

Owns the tokenizer and the requests' output state (``OutputBuilder`` turns the
requests a step advanced into outputs); below it, EngineCore schedules and the
ModelExecutor computes. The server and ``LLM`` both drive this class.
"""

from __future__ import annotations

import time

from joule.config import EngineConfig
from joule.logger import get_logger
from joule.engine.core import EngineCore, lookahead_on
from joule.engine.kv_blocks import KVBlockManager
from joule.engine.request import Request, RequestSLO
from joule.engine.scheduler_config import SchedulerConfig
from joule.energy import AttributionWeights, EnergyLedger, EnergyMeter, select_energy_meter
from joule.model.layers import onednn_packs_weights
from joule.model.loader import load_model
from joule.output_builder import OutputBuilder, RequestState, SampleState
from joule.outputs import RequestMetrics, RequestOutput
from joule.runtime.attention.base import KVCache
from joule.runtime.attention.select import select_attention_backend
from joule.runtime.device import default_kv_cache_bytes, resolve_device, resolve_dtype
from joule.runtime.executor import ModelExecutor
from joule.runtime.host_allocator import ENVIRONMENT_SWITCH, keep_freed_memory
from joule.runtime.memory_profile import gpu_kv_cache_budget, profile_step_memory
from joule.runtime.sampler import Sampler
from joule.runtime.structured_output import GrammarCompiler, TokenConstraint
from joule.sampling_params import RequestOutputKind, SamplingParams
from joule.tokenizer import Tokenizer

logger = get_logger()

_DEFAULT_BATCHED_TOKENS = {"cpu": 2048, "cuda": 8192}
# An offline run keeps this many steps' budgets of prompt tokens waiting and adds the rest of its requests between
# steps (``add_while_wanted``): enough that no step plans with fewer prompts than if all were added first.
FEED_AHEAD_STEPS = 3
PromptType = str | list[int] | dict


class LLMEngine:
    def __init__(self, config: EngineConfig, energy_meter: EnergyMeter | None = None):
        """``energy_meter`` overrides the meter chosen for the device (tests inject a fake one)."""
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        loaded = load_model(config.model, self.dtype, self.device, config.load_format)
        self.model, self.model_config, self.model_path = loaded.model, loaded.config, loaded.path
        packs = onednn_packs_weights(self.device, self.dtype)
        self.model.merge_projections(transpose_weight=self.device.type == "cpu" and not packs)
        if packs:
            self.model.pack_for_onednn()
        self.tokenizer = _load_tokenizer(config.tokenizer or self.model_path)

        layers = self.model_config.num_hidden_layers
        kv_heads, head_dim = self.model_config.num_key_value_heads, self.model_config.head_dim
        self.kv_cache_dtype = KVCache.resolve_dtype(config.kv_cache_dtype, self.dtype)
        bytes_per_block = KVCache.bytes_per_block(layers, config.block_size, kv_heads, head_dim, self.kv_cache_dtype)
        backend = select_attention_backend(self.device)
        budget = config.kv_cache_memory_bytes
        if budget is None and self.device.type == "cuda":
            budget = self._profiled_kv_budget(backend, bytes_per_block)
        elif budget is None:
            budget = default_kv_cache_bytes(self.device, config.gpu_memory_utilization)
        num_blocks = budget // bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory_bytes={budget} is smaller than one KV block ({bytes_per_block} bytes)."
            )
        self.kv_capacity_tokens = num_blocks * config.block_size
        self.max_model_len = self._choose_max_model_len()
        batched_tokens = config.max_num_batched_tokens or _DEFAULT_BATCHED_TOKENS[self.device.type]
        if config.max_num_batched_tokens is None and not config.enable_chunked_prefill:
            batched_tokens = max(batched_tokens, self.max_model_len)  # any prompt fits one step, as in vLLM

        self.kv_cache = KVCache.allocate(
            layers, num_blocks, config.block_size, kv_heads, head_dim, self.kv_cache_dtype, self.device
        )
        executor = ModelExecutor(
            self.model, self.kv_cache, backend, Sampler(config.seed, self.device),
            self.device, max_model_len=self.max_model_len, max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager, max_num_batched_tokens=batched_tokens,
        )
        if self.device.type == "cuda" and getattr(backend, "name", None) == "triton":
            executor.compile_eager_step_kernels(self.max_model_len, config.max_num_seqs)
        self.block_manager = KVBlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        scheduler_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=batched_tokens,
            max_model_len=self.max_model_len,
            policy=config.scheduling_policy,
            admission=config.admission_policy,
            enable_chunked_prefill=config.enable_chunked_prefill,
            fair_prompt_cap=config.fair_prompt_cap,
            fair_split_decodes=config.fair_split_decodes,
            fair_keep_up=config.fair_keep_up,
        )
        self.energy_meter = energy_meter if energy_meter is not None else select_energy_meter(
            self.device, model_config=self.model_config, dtype=str(self.dtype).removeprefix("torch."))
        self.energy_ledger = EnergyLedger(
            self.energy_meter, AttributionWeights.for_hidden_size(self.model_config.hidden_size), clock=time.time
        )
        self.core = EngineCore(scheduler_config, self.block_manager, executor, step_observer=self.energy_ledger,
                               decode_lookahead=lookahead_on(config.decode_lookahead, self.device.type == "cuda"))
        logger.info("decode lookahead: %s", "on" if self.core.decode_lookahead else "off")
        if self.device.type == "cpu" and keep_freed_memory():  # after loading: the loader's temporaries may leave
            logger.info("host allocator: step temporaries reuse the heap (%s=0 turns this off)", ENVIRONMENT_SWITCH)
        self._outputs = OutputBuilder(self.tokenizer, self.energy_ledger, lambda request_id, stop_string:
                                      self.core.finish_request(request_id, stop_reason=stop_string))
        self.eos_token_ids = _eos_ids(self.tokenizer, self.model_config)
        self._grammars: GrammarCompiler | None = None  # built at the first structured_outputs request
        self._states: dict[str, RequestState] = {}
        self._sample_owner: dict[str, tuple[RequestState, int]] = {}
        logger.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB, %s), max_model_len %d",
            num_blocks, config.block_size, self.kv_capacity_tokens, num_blocks * bytes_per_block / 2**20,
            str(self.kv_cache_dtype).removeprefix("torch."), self.max_model_len,
        )

    def _profiled_kv_budget(self, backend, bytes_per_block: int) -> int:
        """Measure a worst-case step's memory (which also compiles its kernels), then size the cache."""
        config = self.config
        tokens = config.max_num_batched_tokens or _DEFAULT_BATCHED_TOKENS["cuda"]
        if not config.enable_chunked_prefill:
            tokens = max(tokens, config.max_model_len or self.model_config.max_position_embeddings)
        model_config = self.model_config
        profile = profile_step_memory(
            self.model, backend, self.device, self.kv_cache_dtype, model_config.num_hidden_layers,
            model_config.num_key_value_heads, model_config.head_dim, config.block_size, tokens,
            config.max_num_seqs, model_config.vocab_size,
        )
        # The prompt-chunk graphs keep a pool as large as the worst step, and eager steps (more chunks,
        # longer chunks) still need one on top: reserve the peak twice unless graphs are off.
        reserved = profile.peak_step_bytes * (1 if config.enforce_eager else 2)
        budget = gpu_kv_cache_budget(self.device, config.gpu_memory_utilization, reserved)
        if budget < bytes_per_block:
            raise ValueError(
                f"no GPU memory is left for the KV cache at gpu_memory_utilization={config.gpu_memory_utilization}: "
                f"weights and a {tokens}-token step (peak {profile.peak_step_bytes / 2**20:.0f} MiB) fill it; raise "
                "gpu_memory_utilization or lower max_num_batched_tokens / max_num_seqs."
            )
        return budget

    @classmethod
    def from_kwargs(cls, energy_meter: EnergyMeter | None = None, **kwargs) -> "LLMEngine":
        return cls(EngineConfig.from_kwargs(**kwargs), energy_meter=energy_meter)

    def _choose_max_model_len(self) -> int:
        model_limit = self.model_config.max_position_embeddings
        wanted = self.config.max_model_len
        if wanted is None:
            return min(model_limit, self.kv_capacity_tokens)
        if wanted > model_limit:
            raise ValueError(f"max_model_len={wanted} exceeds the model's max_position_embeddings={model_limit}.")
        if wanted > self.kv_capacity_tokens:
            raise ValueError(
                f"max_model_len={wanted} does not fit the KV cache ({self.kv_capacity_tokens} tokens); "
                f"raise kv_cache_memory_bytes or lower max_model_len."
            )
        return wanted

    # -- requests ---------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self._require_tokenizer().encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _check_token_ids(prompt["prompt_token_ids"], self.model_config.vocab_size)
            if "prompt" in prompt and isinstance(prompt["prompt"], str):
                return prompt["prompt"], self._require_tokenizer().encode(prompt["prompt"])
            raise ValueError("prompt dict must have 'prompt' (a string) or 'prompt_token_ids' (a list of ints).")
        if isinstance(prompt, list):
            return None, _check_token_ids(prompt, self.model_config.vocab_size)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}.")

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        tenant: str | None = None,
        slo: RequestSLO | None = None,
    ) -> None:
        """Queue a request; raises ValueError naming the bad field, touching nothing else."""
        if slo is not None and not isinstance(slo, RequestSLO):
            raise ValueError(f"slo must be a RequestSLO, got {type(slo).__name__}.")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}.")
        if request_id in self._states:
            raise ValueError(f"request_id {request_id!r} is already in use.")
        vocab_size = self.model_config.vocab_size
        for name, token_ids in (("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids)):
            outside = [token_id for token_id in token_ids or () if token_id >= vocab_size]
            if outside:
                raise ValueError(f"{name} token id {outside[0]} is outside the vocabulary [0, {vocab_size}).")
        prompt_text, prompt_ids = self.tokenize_prompt(prompt)
        keep = params.truncate_prompt_tokens
        if keep is not None and len(prompt_ids) > keep:  # the text no longer matches the ids: drop it
            prompt_text, prompt_ids = None, prompt_ids[-keep:]
        if not prompt_ids:
            raise ValueError("prompt is empty: it must contain at least one token.")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(prompt_ids)} tokens long, which leaves no room to generate within "
                f"max_model_len={self.max_model_len}."
            )
        room = self.max_model_len - len(prompt_ids)
        max_tokens = min(params.max_tokens or room, room)
        constraints = [self._constraint(params) for _ in range(params.n)] if params.structured_outputs else None
        arrival = time.time() if arrival_time is None else arrival_time
        state = RequestState(request_id, prompt_text, prompt_ids, params, RequestMetrics(arrival_time=arrival))
        for index in range(params.n):
            child_id = request_id if params.n == 1 else f"{index}_{request_id}"
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = child_params.clone(seed=params.seed + index)
            if index > 0 and params.prompt_logprobs is not None:  # the first sample scores the prompt for all
                child_params = child_params.clone(prompt_logprobs=None)
            request = Request(
                request_id=child_id,
                prompt_token_ids=prompt_ids,
                sampling_params=child_params,
                max_tokens=max_tokens,
                eos_token_ids=self.eos_token_ids,
                arrival_time=arrival,
                priority=priority,
                tenant=tenant,
                slo=slo,
                group_id=request_id if params.n > 1 else None,
                constraint=constraints[index] if constraints else None,
            )
            state.samples.append(SampleState(request, self._outputs.detokenizer(prompt_ids, params)))
        for index, sample in enumerate(state.samples):
            self.core.add_request(sample.request)
            self._sample_owner[sample.request.request_id] = (state, index)
        self._states[request_id] = state

    def _constraint(self, params: SamplingParams) -> TokenConstraint:
        """A fresh grammar state for one sample; ValueError naming ``structured_outputs`` when it cannot be made."""
        if self._grammars is None:
            tokenizer = self._require_tokenizer()
            self._grammars = GrammarCompiler(tokenizer.backend.to_str(), self.model_config.vocab_size,
                                             sorted(self.eos_token_ids))
        return self._grammars.constraint(params.structured_outputs)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its KV blocks are free before the next step."""
        state = self._states.pop(request_id, None)
        if state is None:
            return
        for sample in state.samples:
            self.core.abort_request(sample.request.request_id)
            self._sample_owner.pop(sample.request.request_id, None)
            self.energy_ledger.release(sample.request.request_id)  # its joules stay in the attributed total

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt block (vLLM's call: benchmarks run cold, changed weights stay unshared).
        False, and nothing forgotten, while requests are unfinished: their blocks could be cached again."""
        if self.has_unfinished_requests():
            return False
        self.block_manager.reset_prefix_cache()
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._states) or self.core.has_step_in_flight

    def get_num_unfinished_requests(self) -> int:
        return len(self._states)

    def add_while_wanted(self, add_next) -> bool:
        """Call ``add_next()`` (adds one request, or refuses one; False once none is left) while the engine wants
        more before its next step; returns False once ``add_next`` ran out. For offline loops (``LLM.generate``,
        the benchmarks; ``joule/offline_loop.py``). Why not add them all first: adding 256 requests took ~10 ms of
        host time on the H100 machine while the GPU sat idle (~1 % of workload 3); between steps it overlaps the
        GPU's work. Under first-come-first-served the steps are the same as long as the waiting queue holds
        ``FEED_AHEAD_STEPS`` budgets of prompt tokens (the lookahead plans one step ahead) or a batch of requests;
        other policies reorder the whole queue, so they get everything. The queue is summed once a call and each
        added request's own tokens counted on top, so a refill costs O(queue), not O(queue) per request."""
        scheduler = self.core.scheduler
        config = scheduler.config
        if config.policy != "fcfs":
            while add_next():
                pass
            return False
        waiting = scheduler.waiting
        wanted = FEED_AHEAD_STEPS * config.max_num_batched_tokens
        wanted -= sum(request.num_tokens - request.num_computed_tokens for request in waiting)
        while wanted > 0 and len(waiting) < config.max_num_seqs:
            before = len(waiting)
            if not add_next():
                return False
            for newest in range(1, len(waiting) - before + 1):  # its samples, at the queue's end
                request = waiting[-newest]
                wanted -= request.num_tokens - request.num_computed_tokens
        return True

    # -- stepping ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        progressed = self.core.step()
        now = time.time()
        # The states with something to send: a FINAL_ONLY request's only once one of its samples finishes (most
        # rows of most steps are neither, and skip the second loop).
        changed: dict[str, RequestState] = {}
        owners, advance = self._sample_owner, self._outputs.advance  # every row of every step passes here
        final_only = RequestOutputKind.FINAL_ONLY
        for request in progressed:
            owner = owners.get(request.request_id)
            if owner is None:
                continue
            state, index = owner
            sample = state.samples[index]
            advance(state, sample, now)
            if sample.finish_reason is not None or state.params.output_kind is not final_only:
                changed[state.request_id] = state
        outputs = []
        for state in changed.values():
            finished = state.finished
            if finished or state.params.output_kind != final_only:
                outputs.append(self._outputs.make_output(state, finished))
            if finished:
                state.metrics.finished_time = now
                self._states.pop(state.request_id, None)
                for sample in state.samples:
                    self._sample_owner.pop(sample.request.request_id, None)
                    self.energy_ledger.release(sample.request.request_id)
        return outputs

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass prompts as {'prompt_token_ids': [...]}.")
        return self.tokenizer


def _load_tokenizer(path) -> Tokenizer | None:
    """The model's tokenizer; a bare checkpoint without one serves token ids only."""
    from pathlib import Path

    if not (Path(path) / "tokenizer.json").exists():
        logger.warning("no tokenizer.json in %s: prompts must be given as token ids", path)
        return None
    return Tokenizer.from_pretrained(path)


def _eos_ids(tokenizer: Tokenizer | None, model_config) -> frozenset[int]:
    ids: set[int] = set(tokenizer.eos_token_ids) if tokenizer is not None else set()
    configured = model_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(configured)
    return frozenset(ids)


def _check_token_ids(token_ids, vocab_size: int) -> list[int]:
    """Why the fast test first: a per-token Python loop cost ~40 us per 512-token prompt, ~1 % of a 256-request
    GPU run; plain ints in range pass with three passes in C, anything else takes the loop that names the culprit."""
    if not isinstance(token_ids, (list, tuple)):
        raise ValueError(f"prompt_token_ids must be a list of integers, got {type(token_ids).__name__}.")
    if not token_ids or (set(map(type, token_ids)) == {int} and min(token_ids) >= 0 and max(token_ids) < vocab_size):
        return list(token_ids)
    for token_id in token_ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise ValueError(f"prompt_token_ids must contain integers, got {token_id!r}.")
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"prompt_token_ids contains {token_id}, outside the vocabulary [0, {vocab_size}).")
    return list(token_ids)
