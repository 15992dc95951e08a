"""One in-process server for all server tests, and a reference engine of the same config."""

from __future__ import annotations

import pytest

from kvfork import Engine
from kvfork.config import ServerConfig
from tests.support.serving import API_KEY, ENGINE, serving


@pytest.fixture(scope="session")
def server(gemma_path):
    engine = Engine(gemma_path, **ENGINE)
    config = ServerConfig(api_key=API_KEY, model_name="gemma", max_queued=16, max_n=4, max_tokens=64,
                          max_body_bytes=200_000)
    with serving(engine, config) as running:
        yield running
    engine.close()


@pytest.fixture(scope="session")
def ref(gemma_path):
    """From-scratch reference runs, in their own context."""
    with Engine(gemma_path, **ENGINE) as engine:
        yield engine
