"""The OpenAI API tests again, against a server whose engine queues greedy decode steps ahead.

The lookahead is the default with CUDA only, so CI (no GPU) would otherwise never serve through it:
streams, stop strings, n > 1, logprobs and seeded sampling beside greedy lookahead steps are checked here on the
CPU with `--decode-lookahead` forced on.
"""

from __future__ import annotations

import pytest

from server.live_server import start_server
from server.test_openai_api import *  # noqa: F401,F403 - the same tests, collected again with the fixtures below


@pytest.fixture(scope="module")
def live_server(tiny_model_dir, tmp_path_factory):
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("lookahead-server-logs"), "--decode-lookahead")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live_server):
    from openai import OpenAI

    return OpenAI(base_url=live_server.api_url, api_key="unused", max_retries=0, timeout=60.0)


def test_the_server_runs_with_the_lookahead_on(live_server, client):
    answer = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0.0,
                                       extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 4
    assert "decode lookahead: on" in live_server.log()
