"""Guard: ASGI middleware for the API key (Bearer) and the request body cap, before any parsing."""

from __future__ import annotations

import hmac
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvfork.server.errors import APIError

__all__ = ["Guard"]

_OPEN_PATHS = ("/health", "/metrics")  # NOTE: probes and scrapers carry no API key


class Guard:
    """401 without the right `Authorization: Bearer KEY`; 413 for bodies over max_body_bytes.

    NOTE: pure ASGI rather than BaseHTTPMiddleware, so a streaming response still sees the client's
    disconnect (which is what frees its branches).
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope.get("path", "") not in _OPEN_PATHS:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                await _reply(send, APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                            code="invalid_api_key"))
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _reply(send, _too_large(self.max_body))
            return
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # a chunked body without a content-length
                    raise _too_large(self.max_body)
            return message

        await self.app(scope, capped, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds {limit:,} bytes", code="request_too_large")


async def _reply(send: Send, error: APIError) -> None:
    response: Any = error.response()
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
