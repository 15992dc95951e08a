"""ServerState: what every handler needs (engine, loop, limits, metrics), kept on app.state.kv."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from kvfork.config import ServerConfig
from kvfork.server.errors import APIError
from kvfork.server.loop import EngineLoop
from kvfork.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from kvfork.runtime import Engine

__all__ = ["ServerState", "state_of"]


@dataclass
class ServerState:
    """One server: its engine (owned by the loop thread once started), limits and metrics."""

    engine: Engine
    config: ServerConfig
    metrics: ServerMetrics
    loop: EngineLoop
    model_id: str
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str) -> None:
        """404 unless `name` is this server's model (its id or its file name)."""
        if name not in (self.model_id, self.engine.model_path.name, str(self.engine.model_path)):
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")


def state_of(request: Request) -> ServerState:
    return request.app.state.kv  # type: ignore[no-any-return]
