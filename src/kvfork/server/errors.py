"""APIError: an OpenAI-style error object ({"error": {message, type, param, code}}) with its HTTP status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kvfork.errors import ContextOverflow, InvalidParameter, KvforkError

__all__ = ["APIError", "cache_full", "install_error_handlers", "from_kvfork"]

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error"}


def cache_full() -> APIError:
    """503: the KV cache has no room for this request now (others hold it); a retry may succeed."""
    return APIError(503, "no room in the KV cache for this request now (snapshots or other requests hold it);"
                         " retry", code="cache_full")


class APIError(Exception):
    """An error the client should see, shaped as OpenAI's API shapes them."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_kvfork(exc: Exception) -> APIError:
    """Map an engine error to what the client did wrong (4xx) or what broke here (500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflow):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, InvalidParameter):
        return APIError(400, str(exc), code="invalid_value")
    if isinstance(exc, KvforkError):
        return APIError(500, str(exc), code="engine_error")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    """Every failure leaves as an OpenAI error object; the server keeps serving everyone else."""

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON", code="invalid_json").response()
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        # NOTE: OpenAI answers bad parameter values with 400, not FastAPI's 422.
        return APIError(400, message, param=".".join(loc) or None, code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return from_kvfork(exc).response()
