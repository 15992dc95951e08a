"""The OpenAI-compatible server: one engine loop thread, HTTP handlers that feed it (needs the `server` extra)."""

from __future__ import annotations

from kvfork.server.app import create_app
from kvfork.server.loop import EngineLoop

__all__ = ["create_app", "EngineLoop"]
