"""`joule chat`: an interactive chat that streams its replies and keeps the conversation.

It follows the habits of llama.cpp's and Ollama's chat prompts: `/exit` (or `/quit`, `/bye`) leaves, and `/clear`
starts over. Ctrl-C during a reply stops that reply and keeps the chat; Ctrl-C or Ctrl-D at the prompt leaves. A
conversation that outgrows `max_model_len` is an error message, not a crash. The turn that did not fit is dropped.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from joule.sampling_params import RequestOutputKind, SamplingParams

EXIT_COMMANDS = ("/exit", "/quit", "/bye")
HELP = ("Chat with the model. /clear starts over, /exit (or an empty line, Ctrl-D) quits; "
        "Ctrl-C stops a reply.")


class StopFlag(threading.Event):
    """Set by Ctrl-C while a reply streams, read between engine steps, so a step is never cut in half."""

    __call__ = threading.Event.is_set

    @contextlib.contextmanager
    def on_interrupt(self) -> Iterator[None]:
        """Ctrl-C sets the flag for the block, instead of raising inside a step (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, lambda signum, frame: self.set())
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def run_chat(llm, params: SamplingParams, system: str | None = None, read: Callable[[str], str] | None = None,
             write: Callable[[str], None] | None = None, stop: StopFlag | None = None) -> int:
    """The chat loop over ``llm``'s engine; ``read``, ``write`` and ``stop`` are the terminal's (tests pass theirs)."""
    read = read or (lambda prompt: input(prompt))  # looked up when called, as a patched ``input`` is
    write = write or (lambda text: print(text, end="", flush=True))
    stop = stop or StopFlag()
    engine = llm.llm_engine
    tokenizer = engine._require_tokenizer()
    params = params.clone(output_kind=RequestOutputKind.DELTA)
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    write(HELP + "\n")
    turns = 0
    while True:
        try:
            text = read("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        command = text.strip()
        if not command or command.lower() in EXIT_COMMANDS:
            return 0
        if command.lower() == "/clear":
            history = list(opening)
            write("(conversation cleared)\n")
            continue
        if command.lower() in ("/help", "/?"):
            write(HELP + "\n")
            continue
        history.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        request_id = f"chat-{turns}"
        turns += 1
        try:
            engine.add_request(request_id, {"prompt_token_ids": tokenizer.encode(prompt, add_special_tokens=False)},
                               params)
        except ValueError as error:  # e.g. the conversation no longer fits max_model_len
            history.pop()
            write(f"error: {error}\n(the message was not sent; /clear starts over)\n")
            continue
        history.append({"role": "assistant", "content": _stream_reply(engine, request_id, write, stop)})


def _stream_reply(engine, request_id: str, write: Callable[[str], None], stop: StopFlag) -> str:
    """Print the reply as it comes; Ctrl-C aborts the request (its KV blocks freed) and keeps what came."""
    write("assistant> ")
    reply: list[str] = []
    stop.clear()
    with stop.on_interrupt():
        while engine.has_unfinished_requests():
            if stop():
                engine.abort_request(request_id)
                write(" [stopped]")
                while engine.has_unfinished_requests():  # a step queued ahead (decode lookahead) still lands
                    engine.step()
                break
            for output in engine.step():
                for completion in output.outputs:
                    reply.append(completion.text)
                    write(completion.text)
    write("\n")
    return "".join(reply)
