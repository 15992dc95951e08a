"""ServerState: what every handler needs (engine, loop, limits, metrics), kept on app.state.kv."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from kvfork.config import ServerConfig
from kvfork.engine.adapters import Adapter
from kvfork.server.errors import APIError
from kvfork.server.loop import EngineLoop
from kvfork.server.metrics import ServerMetrics
from kvfork.server.tools import ToolFormat

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
    tool_format: ToolFormat | None = None  # how the model writes tool calls (None: no tools on this server)
    created: int = field(default_factory=lambda: int(time.time()))

    def check_model(self, name: str) -> Adapter | None:
        """The LoRA decoder `name` asks for: None for this server's model (its id or its file name), an
        adapter for "<model>+<adapter name>"; 404 for anything else."""
        base, plus, wanted = name.partition("+")
        adapters = self.engine.adapters
        if base in (self.model_id, self.engine.model_path.name, str(self.engine.model_path)):
            if not plus:
                return None
            if wanted in adapters.names():
                return adapters.get(wanted)
        served = ", ".join(self.model_ids())
        raise APIError(404, f"the model '{name}' does not exist; this server serves {served}",
                       param="model", code="model_not_found")

    def model_ids(self) -> list[str]:
        """What /v1/models lists: the base model and base+adapter for every loaded decoder."""
        return [self.model_id, *(f"{self.model_id}+{name}" for name in self.engine.adapters.names())]


def state_of(request: Request) -> ServerState:
    return request.app.state.kv  # type: ignore[no-any-return]
