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


@pytest.fixture(scope="session")
def qwen_server(qwen_path):
    """A server on the catalog's default model, whose chat template knows tools (function calling, Responses)."""
    engine = Engine(qwen_path, n_ctx=4096, n_seq_max=16, progress=False)
    with serving(engine, ServerConfig(api_key=API_KEY, model_name="qwen", max_tokens=96), model="qwen") as running:
        yield running
    engine.close()
