"""Gateway: the ingress's work for one HTTP request: route keys, forwarding, and failures turned into errors.

Ray-free (cluster/app.py wraps it in a Serve deployment): `send` is whatever reaches a replica, so tests
drive it with fake replicas.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvfork.cluster.bridge import Forwarded, ResponseStart
from kvfork.cluster.metrics import CLUSTER, ClusterMetrics
from kvfork.cluster.policy import Route
from kvfork.cluster.prompts import route_tokens
from kvfork.cluster.routekeys import ROUTE_BLOCK, route_keys

if TYPE_CHECKING:
    from kvfork.engine.llama import LlamaModel

__all__ = ["SESSION_HEADERS", "Gateway", "Reply", "Send"]

log = logging.getLogger(__name__)

# NOTE: a pipeline's or a conversation's requests name it so they stay on one replica (x-session-id is
# also what Ray Serve's consistent-hash router reads).
SESSION_HEADERS = ("x-session-id", "x-kvfork-session")
_GENERATION = ("/v1/completions", "/v1/chat/completions", "/v1/responses")

Send = Callable[[Forwarded, "Route | None"], AsyncIterator["ResponseStart | bytes"]]


@dataclass
class Reply:
    """What the ingress answers: status, headers, and either a whole body or a stream of chunks."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None


def error_reply(status: int, message: str, code: str, *, retry: bool = False) -> Reply:
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": code}}).encode()
    headers = [("content-type", "application/json")]
    if retry:
        headers.append(("retry-after", "1"))
    return Reply(status, tuple(headers), body)


class Gateway:
    """Forwards OpenAI requests to engine replicas with their route (prompt keys, size, session).

    Contract: a replica that fails before its response started gives the client a 503 with Retry-After
    (retryable: nothing was generated for it); one that fails mid-stream ends the stream with an SSE error
    event. Non-streamed responses are read whole before they are answered, so they never end half-sent.
    """

    def __init__(self, model: LlamaModel, send: Send, *, block_size: int = ROUTE_BLOCK, root: bytes,
                 metrics: ClusterMetrics = CLUSTER) -> None:
        self.model = model
        self.send = send
        self.block_size = block_size
        self.root = root
        self.metrics = metrics

    def route(self, request: Forwarded) -> Route | None:
        """The request's route; None for requests that generate nothing (any replica answers those)."""
        if request.method != "POST" or request.path not in _GENERATION:
            return None
        tokens, max_tokens = route_tokens(self.model, request.path, request.body)
        session = next((v for v in map(request.header, SESSION_HEADERS) if v), None)
        keys = tuple(route_keys(self.root, tokens, self.block_size))
        return Route(keys=keys, n_tokens=len(tokens), max_tokens=max_tokens, session=session)

    async def handle(self, request: Forwarded) -> Reply:
        refused = self._refuse(request)
        if refused is not None:
            self.metrics.requests.labels("refused").inc()
            return refused
        route = self.route(request)
        parts = self.send(request, route)
        try:
            first = await anext(parts)
        except Exception as exc:  # noqa: BLE001 - a replica that died or could not be reached
            log.warning("replica failed before answering %s: %s", request.path, exc)
            self.metrics.requests.labels("replica_failed").inc()
            return error_reply(503, f"the engine replica serving this request failed ({type(exc).__name__});"
                                    " nothing was generated, retry it", "replica_unavailable", retry=True)
        if not isinstance(first, ResponseStart):
            return error_reply(502, "the replica answered without a status line", "bad_replica_response")
        headers = tuple((k, v) for k, v in first.headers if k.lower() != "content-length")
        if any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers):
            return Reply(first.status, headers, stream=self._stream(parts))
        chunks: list[bytes] = []
        try:
            async for part in parts:
                if isinstance(part, bytes):
                    chunks.append(part)
        except Exception as exc:  # noqa: BLE001
            log.warning("replica failed while answering %s: %s", request.path, exc)
            self.metrics.requests.labels("replica_failed").inc()
            return error_reply(503, f"the engine replica serving this request failed ({type(exc).__name__})"
                                    " before its answer was complete; retry it", "replica_unavailable", retry=True)
        self.metrics.requests.labels("ok" if first.status < 400 else "error").inc()
        return Reply(first.status, headers, b"".join(chunks))

    async def _stream(self, parts: AsyncIterator[ResponseStart | bytes]) -> AsyncIterator[bytes]:
        try:
            async for part in parts:
                if isinstance(part, bytes):
                    yield part
        except Exception as exc:  # noqa: BLE001 - the stream has begun: say so in the stream
            log.warning("replica failed mid-stream: %s", exc)
            self.metrics.requests.labels("replica_failed").inc()
            error = {"error": {"message": f"the engine replica failed mid-stream ({type(exc).__name__}); retry"
                                          " the request", "type": "server_error", "param": None,
                               "code": "replica_unavailable"}}
            yield f"data: {json.dumps(error)}\n\n".encode()
            return
        finally:
            close = getattr(parts, "aclose", None)
            if close is not None:
                await close()
        self.metrics.requests.labels("ok").inc()

    @staticmethod
    def _refuse(request: Forwarded) -> Reply | None:
        # NOTE: snapshots made through the API live on the replica that made them; the ingress cannot
        # name one, so the extension is refused here rather than answered by whichever replica is picked.
        if request.path.startswith("/v1/snapshots"):
            return error_reply(400, "the snapshots API (/v1/snapshots) is per replica and not served through"
                                    " the cluster ingress; use --snapshot-url so replicas share prefixes",
                               "unsupported_endpoint")
        if request.method == "POST" and b'"snapshot_id"' in request.body:
            try:
                named = json.loads(request.body).get("snapshot_id") is not None
            except (ValueError, AttributeError):
                named = False
            if named:
                return error_reply(400, "snapshot_id is not served through the cluster ingress (snapshots are"
                                        " per replica)", "unsupported_parameter")
        return None
