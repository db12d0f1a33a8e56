"""Fixtures: tiny random-weight checkpoints of every supported architecture, built once per session."""

from __future__ import annotations

import pytest
from helpers.tiny_models import ARCHITECTURES, build_tiny_checkpoint


@pytest.fixture(scope="session", params=list(ARCHITECTURES))
def tiny_checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = build_tiny_checkpoint(request.param, directory)
    return request.param, directory, model
