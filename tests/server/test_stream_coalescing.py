"""A loaded event loop: queued DELTA outputs leave as one merged chunk, and first tokens leave first."""

from __future__ import annotations

import asyncio

from helpers.silent_channel import SilentChannel

from joule.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, merge_delta_outputs
from joule.server.async_engine import AsyncEngine
from joule.server.generation_stream import GenerationStream


def _delta(request_id: str, text: str, token_ids: list[int], finish: str | None = None,
           logprob: float | None = None) -> RequestOutput:
    logprobs = None if logprob is None else [{token: Logprob(logprob, rank=1)} for token in token_ids]
    completion = CompletionOutput(0, text, token_ids, cumulative_logprob=logprob, logprobs=logprobs,
                                  finish_reason=finish)
    return RequestOutput(request_id, None, [1, 2], [completion], finished=finish is not None,
                         metrics=RequestMetrics(arrival_time=float(len(text))))


def test_merged_delta_joins_text_tokens_and_logprobs_and_keeps_the_latest_state():
    merged = merge_delta_outputs(_delta("r", "Hel", [5], logprob=-1.0), _delta("r", "lo", [6, 7], "length", -3.0))
    (completion,) = merged.outputs
    assert completion.text == "Hello" and completion.token_ids == [5, 6, 7]
    assert [list(entry) for entry in completion.logprobs] == [[5], [6], [7]]
    assert completion.cumulative_logprob == -3.0 and completion.finish_reason == "length"
    assert merged.finished and merged.metrics.arrival_time == 2.0


class _Recorder:
    def __init__(self):
        self.aborted = []

    def abort(self, request_id):
        self.aborted.append(request_id)


async def _drain(stream: GenerationStream) -> list[tuple[int, RequestOutput]]:
    return [item async for item in stream]


def test_a_stream_that_fell_behind_yields_one_merged_output_per_prompt():
    stream = GenerationStream(_Recorder(), ["a", "b"], coalesce=True)
    for index, piece in [(0, "x"), (1, "p"), (0, "y"), (1, "q")]:
        stream._push(index, _delta(f"r{index}", piece, [ord(piece)]))
    stream._push(0, _delta("r0", "z", [ord("z")], "stop"))
    stream._push(1, _delta("r1", "!", [ord("!")], "length"))
    items = asyncio.run(_drain(stream))
    assert [(index, output.outputs[0].text, output.finished) for index, output in items] == [
        (0, "xyz", True), (1, "pq!", True)]


def test_without_coalescing_every_output_is_yielded():
    stream = GenerationStream(_Recorder(), ["a"], coalesce=False)
    for piece in "ab":
        stream._push(0, _delta("r", piece, [1]))
    stream._push(0, _delta("r", "c", [1], "stop"))
    assert [output.outputs[0].text for _, output in asyncio.run(_drain(stream))] == ["a", "b", "c"]


def test_an_error_after_queued_outputs_still_ends_the_stream():
    stream = GenerationStream(_Recorder(), ["a"], coalesce=True)
    stream._push(0, _delta("r", "a", [1]))
    stream._push(0, RuntimeError("step failed"))
    seen = []

    async def consume():
        try:
            async for _, output in stream:
                seen.append(output.outputs[0].text)
        except RuntimeError as error:
            return str(error)

    assert asyncio.run(consume()) == "step failed" and seen == ["a"]



class _CapturingLoop:
    def __init__(self):
        self.calls = []

    def call_soon_threadsafe(self, callback, *args):
        self.calls.append(args)


def test_first_tokens_are_delivered_before_later_tokens_of_running_streams():
    from joule.server.async_engine import _Route
    from joule.server.engine_loop import EngineReport

    running, new = _delta("running", "b", [2]), _delta("new", "a", [1])
    engine = AsyncEngine(SilentChannel())
    engine._loop = _CapturingLoop()
    stream = GenerationStream(engine, ["x"])
    engine._routes["running"] = _Route(stream, 0, generated_tokens=1)  # it had a token already
    engine._routes["new"] = _Route(stream, 0)
    engine._apply(EngineReport(outputs=[running, new]))
    (_, deliveries) = engine._loop.calls[0]
    assert [output.request_id for _, _, output in deliveries] == ["new", "running"]


def test_plain_chunks_render_the_same_json_as_the_pydantic_models():
    import json

    from joule.server.responses import (
        ChatCompletionChunk,
        ChatDelta,
        ChatStreamChoice,
        CompletionChoice,
        CompletionResponse,
    )
    from joule.server.serving_common import PlainChunks, sse

    texts = ["", "plain", 'quote " and \\ backslash', "new\nline\ttab\x01", "héllo wörld ✓ 漢字", "a\u2028b"]
    endings = [(None, None), ("stop", None), ("stop", 13), ("stop", "</s>"), ("length", None)]
    for request_id, model in [("cmpl-1", "tiny"), ('id "q"', "mödel/name")]:
        completions = PlainChunks(request_id, "text_completion", 1700000000, model)
        chats = PlainChunks(request_id, "chat.completion.chunk", 1700000000, model)
        for text in texts:
            for finish_reason, stop_reason in endings:
                expected = sse(CompletionResponse(id=request_id, model=model, created=1700000000, choices=[
                    CompletionChoice(index=2, text=text, finish_reason=finish_reason, stop_reason=stop_reason)]))
                fast = completions.completion(2, text, finish_reason, stop_reason)
                assert fast.endswith("\n\n") and fast.startswith("data: ")
                assert json.loads(fast[6:]) == json.loads(expected[6:])
                assert list(json.loads(fast[6:])) == list(json.loads(expected[6:]))  # same field order
                expected = sse(ChatCompletionChunk(id=request_id, model=model, created=1700000000, choices=[
                    ChatStreamChoice(index=1, delta=ChatDelta(content=text), finish_reason=finish_reason,
                                     stop_reason=stop_reason)]))
                assert json.loads(chats.chat(1, text, finish_reason, stop_reason)[6:]) == json.loads(expected[6:])
