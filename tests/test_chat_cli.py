"""`joule chat` on the default model: its commands, Ctrl-C during a reply and a conversation past max_model_len."""

from __future__ import annotations

import signal
import time

import pytest

from joule import LLM, SamplingParams
from joule.chat_cli import HELP, StopFlag, run_chat

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=256)


def chat(llm, lines: list[str], stop: StopFlag | None = None, stop_after_chunks: int | None = None) -> str:
    """Run the chat over ``lines`` (then end of input); returns what it printed. With ``stop_after_chunks``, Ctrl-C
    comes once that many chunks of the first reply were printed."""
    printed: list[str] = []
    pending = iter(lines)
    reply_chunks = None  # None outside the first reply

    def read(prompt: str) -> str:
        printed.append(prompt)
        try:
            return next(pending)
        except StopIteration:
            raise EOFError from None

    def write(text: str) -> None:
        nonlocal reply_chunks
        printed.append(text)
        if text == "assistant> " and "assistant> " not in printed[:-1]:
            reply_chunks = 0
        elif reply_chunks is not None and text:
            reply_chunks += 1
            if reply_chunks == stop_after_chunks:
                stop.set()
                reply_chunks = None

    assert run_chat(llm, GREEDY, read=read, write=write, stop=stop) == 0
    return "".join(printed)


def replies(transcript: str) -> list[str]:
    return [part.split("\n", 1)[0] for part in transcript.split("assistant> ")[1:]]


def test_clear_starts_the_conversation_over_and_exit_leaves(llm):
    transcript = chat(llm, ["/help", "What is the capital of France?", "/clear", "What is the capital of France?",
                            "/exit", "never read"])
    first, second = replies(transcript)
    assert first == second and first  # after /clear the same question meets the same (greedy) reply
    assert transcript.count(HELP) == 2 and "(conversation cleared)" in transcript
    assert "never read" not in transcript


@pytest.mark.parametrize("lookahead", [False, True])
def test_ctrl_c_stops_the_reply_frees_its_blocks_and_the_chat_goes_on(llm, lookahead):
    """With decode lookahead (CUDA's default) a step queued ahead is still in flight when Ctrl-C comes."""
    if lookahead:
        llm = LLM(dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=256, decode_lookahead=True)
    engine = llm.llm_engine
    alone = chat(llm, ["Tell me a long story about a dragon."], stop=StopFlag(), stop_after_chunks=2)
    assert replies(alone)[0].endswith(" [stopped]")
    assert not engine.has_unfinished_requests()  # nothing left in flight once the chat is back at its prompt
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    transcript = chat(llm, ["Tell me a long story about a dragon.", "Thanks!"], stop=StopFlag(), stop_after_chunks=2)
    stopped, after = replies(transcript)
    assert stopped.endswith(" [stopped]") and not after.endswith("[stopped]") and after
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_message_past_max_model_len_is_an_error_and_is_not_kept(llm):
    too_long = "word " * 400  # over 256 tokens
    transcript = chat(llm, [too_long, "What is the capital of France?"])
    assert "error:" in transcript and "max_model_len" in transcript and "/clear starts over" in transcript
    alone = chat(llm, ["What is the capital of France?"])
    assert replies(transcript) == replies(alone)  # the refused turn left nothing in the history


def test_ctrl_c_while_a_reply_streams_sets_the_flag_instead_of_raising():
    before = signal.getsignal(signal.SIGINT)
    flag = StopFlag()
    with flag.on_interrupt():
        signal.raise_signal(signal.SIGINT)  # Python runs the handler in this thread, between bytecodes
        deadline = time.monotonic() + 5.0
        while not flag() and time.monotonic() < deadline:
            time.sleep(0.001)
    assert flag()
    assert signal.getsignal(signal.SIGINT) is before  # outside a reply Ctrl-C does what it did before
