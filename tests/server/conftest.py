"""Session fixtures: one tiny model, one live server shared by the API tests."""

from __future__ import annotations

import pytest

from server.live_server import start_server
from server.tiny_server_model import build_tiny_chat_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="session")
def live_server(tiny_model_dir, tmp_path_factory):
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("server-logs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(live_server):
    from openai import OpenAI

    return OpenAI(base_url=live_server.api_url, api_key="unused", max_retries=0, timeout=60.0)
