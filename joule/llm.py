"""LLM: the offline facade with vLLM's signature, so switching is a one-line import change."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from joule.config import EngineConfig
from joule.engine.policies import DEFAULT_FAIR_PROMPT_CAP
from joule.heap import heap_frozen_while_running
from joule.logger import get_logger
from joule.offline_loop import run_until_done
from joule.llm_engine import LLMEngine, PromptType
from joule.outputs import RequestMetrics, RequestOutput
from joule.sampling_params import RequestOutputKind, SamplingParams

logger = get_logger()

# vLLM options that have no meaning here yet; accepted so scripts written for vLLM run.
_IGNORED_VLLM_OPTIONS = {"trust_remote_code", "tensor_parallel_size", "disable_log_stats"}


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        block_size: int = 16,
        kv_cache_memory_bytes: int | None = None,
        kv_cache_dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        load_format: str = "auto",
        enforce_eager: bool = False,
        scheduling_policy: str = "fcfs",
        admission_policy: str = "greedy",
        enable_chunked_prefill: bool = True,
        fair_prompt_cap: int = DEFAULT_FAIR_PROMPT_CAP,
        fair_split_decodes: bool = False,
        fair_keep_up: bool = True,
        decode_lookahead: bool | None = None,
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - _IGNORED_VLLM_OPTIONS)
        if unknown:
            raise TypeError(f"LLM() got unknown option(s): {', '.join(unknown)}")
        config = EngineConfig(
            model=model,
            tokenizer=tokenizer,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            block_size=block_size,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            kv_cache_dtype=kv_cache_dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            load_format=load_format,
            enforce_eager=enforce_eager,
            scheduling_policy=scheduling_policy,
            admission_policy=admission_policy,
            enable_chunked_prefill=enable_chunked_prefill,
            fair_prompt_cap=fair_prompt_cap,
            fair_split_decodes=fair_split_decodes,
            fair_keep_up=fair_keep_up,
            decode_lookahead=decode_lookahead,
        )
        self.llm_engine = LLMEngine(config)
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt block, as vLLM's ``LLM.reset_prefix_cache``."""
        return self.llm_engine.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        A prompt that is invalid (empty, too long, bad token ids) gets an output
        whose ``error`` holds the ValueError; the other prompts run normally.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        *,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, with the model's chat template (or
        ``chat_template``: a template's text or name). ``tools`` (OpenAI's function list) reach the template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.llm_engine._require_tokenizer()
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt and not continue_final_message,
                tools=tools, chat_template=chat_template, continue_final_message=continue_final_message,
                **(chat_template_kwargs or {})
            )
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self._run(prompts, _as_params_list(sampling_params, len(prompts)), use_tqdm)

    def _run(self, prompts: list, params_list: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        # No full collections of the start-up heap mid-run (joule/heap.py), from the first request added.
        with heap_frozen_while_running():
            return self._add_and_step(prompts, params_list, use_tqdm)

    def _add_and_step(self, prompts: list, params_list: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        """Requests go in as the engine wants them (``joule/offline_loop.py``)."""
        engine = self.llm_engine
        results: list[RequestOutput | None] = [None] * len(prompts)
        index_of: dict[str, int] = {}
        pending = iter(enumerate(zip(prompts, params_list)))
        progress = tqdm(total=len(prompts), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        started = time.perf_counter()
        counts = [0, 0]  # prompt and output tokens of the finished requests

        def add_next() -> bool:
            item = next(pending, None)
            if item is not None:
                self._add(*item, results, index_of, progress)
            return item is not None

        def on_output(output: RequestOutput) -> None:
            if not output.finished:
                return
            results[index_of[output.request_id]] = output
            counts[0] += len(output.prompt_token_ids)
            counts[1] += sum(len(completion.token_ids) for completion in output.outputs)
            elapsed = max(time.perf_counter() - started, 1e-9)
            progress.set_postfix_str(f"input: {counts[0] / elapsed:.1f} tok/s, output: {counts[1] / elapsed:.1f} tok/s",
                                     refresh=False)
            progress.update(1)

        try:
            run_until_done(engine, add_next, on_output)
        except BaseException:
            for request_id in index_of:
                engine.abort_request(request_id)
            raise
        finally:
            progress.close()
        return results  # type: ignore[return-value]

    def _add(self, index: int, prompt_and_params: tuple, results: list, index_of: dict[str, int], progress) -> None:
        """Add one prompt; a refused one (ValueError) gets its error output at once and counts as processed."""
        prompt, params = prompt_and_params
        request_id = str(next(self._request_counter))
        final_params = params if params.output_kind == RequestOutputKind.FINAL_ONLY else params.clone(
            output_kind=RequestOutputKind.FINAL_ONLY
        )
        try:
            self.llm_engine.add_request(request_id, prompt, final_params)
        except ValueError as error:
            results[index] = _error_output(request_id, prompt, error)
            progress.update(1)
            return
        index_of[request_id] = index


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(item, int) and not isinstance(item, bool) for item in prompts):
            return [list(prompts)]  # a single prompt given as token ids
        return list(prompts)
    raise ValueError(f"prompts must be a string, a dict or a list of them, got {type(prompts).__name__}.")


def _as_params_list(sampling_params, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params_list = list(sampling_params)
    if len(params_list) != count:
        raise ValueError(
            f"sampling_params has {len(params_list)} entries but there are {count} prompts; "
            "pass one SamplingParams or one per prompt."
        )
    return params_list


def _error_output(request_id: str, prompt, error: ValueError) -> RequestOutput:
    logger.warning("request %s rejected: %s", request_id, error)
    return RequestOutput(
        request_id=request_id,
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=[],
        outputs=[],
        finished=True,
        metrics=RequestMetrics(arrival_time=time.time()),
        error=error,
    )
