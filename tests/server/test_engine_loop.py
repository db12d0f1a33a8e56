"""The engine loop's reports: a request's prompt token ids cross to the API side once, with its first tokens,
and not again with every later output (each report is pickled to the API process)."""

from __future__ import annotations

import queue

from joule.config import EngineConfig
from joule.llm_engine import LLMEngine
from joule.sampling_params import RequestOutputKind, SamplingParams
from joule.server.engine_loop import AbortCommand, AddCommand, EngineLoop, StopCommand


def _loop_reports(engine, commands: list, later: dict | None = None) -> list:
    """Run the loop over ``commands``; ``later``: {report count: commands} sent once that many reports came."""
    inbox: queue.Queue = queue.Queue()
    for command in commands:
        inbox.put(command)
    later = dict(later or {})
    reports = []

    def receive(timeout):
        for command in later.pop(len(reports), []):
            inbox.put(command)
        if inbox.empty() and not engine.has_unfinished_requests() and not later:
            return StopCommand()
        return inbox.get_nowait()  # raises queue.Empty while requests still run

    EngineLoop(engine, receive, reports.append).run()
    return reports


def test_prompt_token_ids_travel_once_with_the_first_tokens(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), max_model_len=256, kv_cache_memory_bytes=8 * 2**20,
                                    dtype="float32", max_num_batched_tokens=256))
    engine.core.scheduler.config.max_num_batched_tokens = 8  # the long prompt runs in chunks: outputs before tokens
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    prompts = {"short": [1, 2, 3], "long": list(range(4, 24)), "aborted": [7, 8, 9, 10]}
    commands = [AddCommand(request_id, prompt, params) for request_id, prompt in prompts.items()]
    reports = _loop_reports(engine, commands[:2])
    outputs: dict[str, list] = {}
    for report in reports:
        for output in report.outputs:
            outputs.setdefault(output.request_id, []).append(output)
    for request_id in ("short", "long"):
        with_tokens = [output for output in outputs[request_id] if output.outputs and output.outputs[0].token_ids]
        first = outputs[request_id].index(with_tokens[0])
        assert all(output.prompt_token_ids == prompts[request_id] for output in outputs[request_id][: first + 1])
        assert all(output.prompt_token_ids == [] for output in outputs[request_id][first + 1:])
        assert sum(len(output.outputs[0].token_ids) for output in with_tokens) == 5
    assert len(outputs["long"]) > len(with_tokens), "the long prompt's chunks gave outputs before its tokens"

    # A request aborted after its first tokens is forgotten: the same id added again sends its prompt again.
    again = AddCommand("aborted", [7, 8], params)
    reports = _loop_reports(engine, [commands[2]], later={3: [AbortCommand("aborted")], 4: [again]})
    sent = [output for report in reports for output in report.outputs if output.outputs[0].token_ids]
    assert [output.prompt_token_ids for output in sent[:2]] == [[7, 8, 9, 10], []]
    assert any(aborted.request_id == "aborted" for report in reports for aborted in report.aborted)
    assert [output.prompt_token_ids for output in sent if output.prompt_token_ids] == [[7, 8, 9, 10], [7, 8]]
