"""create_app: the FastAPI application around one Engine and its loop thread."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from kvfork.config import ServerConfig
from kvfork.server import responses_api, routes, snapshots
from kvfork.server.errors import install_error_handlers
from kvfork.server.guard import Guard
from kvfork.server.loop import EngineLoop
from kvfork.server.metrics import ServerMetrics
from kvfork.server.state import ServerState
from kvfork.server.tools import format_for

if TYPE_CHECKING:
    from kvfork.runtime import Engine

__all__ = ["create_app"]


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """An OpenAI-compatible app serving `engine`; its loop thread runs from startup to shutdown.

    From startup on, the loop thread owns the engine: do not use it directly meanwhile.
    """
    config = config or ServerConfig()
    metrics = ServerMetrics(engine.store)
    metrics.kv_cells.labels("total").set(engine.ctx.n_ctx)
    loop = EngineLoop(engine, config, metrics)
    model_id = config.model_name or engine.model_path.stem

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="kvfork", lifespan=lifespan, docs_url=None, redoc_url=None)
    # NOTE: the model's tool-call markers must reach the text the parser reads (llama.cpp hides specials).
    fmt = format_for(engine.model.chat_template) if engine.model.knows_tools else None
    if fmt is not None:
        engine.model.show_special([fmt.open, fmt.close])
    app.state.kv = ServerState(engine=engine, config=config, metrics=metrics, loop=loop, model_id=model_id,
                               tool_format=fmt)
    install_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(snapshots.router)
    app.include_router(responses_api.router)
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    return app
