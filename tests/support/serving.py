"""An in-process server (uvicorn on 127.0.0.1, a free port, a background thread) and the prompts it builds."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import uvicorn

from kvfork import Engine
from kvfork.config import ServerConfig
from kvfork.server import create_app
from tests.support.models import GEMMA

API_KEY = "test-key"
# NOTE: the server's engine and the reference engine share one config: same batch shapes, same arithmetic.
ENGINE = dict(n_ctx=2048, n_seq_max=32, n_batch=256, n_ubatch=256, **GEMMA)


@dataclass
class Running:
    base_url: str
    model: str
    app: object

    def client(self, api_key: str = API_KEY, **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, **kw)

    def metric(self, name: str, default: float | None = None) -> float:
        """A sample of /metrics; `default` for a labelled series nothing has counted yet."""
        text = httpx.get(f"{self.base_url}/metrics").text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        if m is None and default is not None:
            return default
        assert m, f"{name} not in /metrics"
        return float(m.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(engine: Engine, config: ServerConfig, model: str = "gemma") -> Iterator[Running]:
    """Run create_app(engine, config) under uvicorn on a free loopback port until the block ends."""
    app = create_app(engine, config)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield Running(f"http://127.0.0.1:{port}", model, app)
    finally:
        srv.should_exit = True
        thread.join(15)


def chat_prompt(engine: Engine, messages: list[dict]) -> list[int]:
    """The tokens the server builds for `messages` (template + generation prompt, BOS, specials)."""
    text = engine.model.apply_chat_template([(m["role"], m["content"]) for m in messages], add_generation_prompt=True)
    return engine.tokenize(text, add_bos=True, special=True)
