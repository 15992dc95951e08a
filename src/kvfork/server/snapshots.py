"""kvfork's extension: POST/GET /v1/snapshots, DELETE /v1/snapshots/{id}: pinned prefixes to continue from."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from kvfork.server.dispatch import SnapshotInfo
from kvfork.server.errors import APIError
from kvfork.server.protocol import SnapshotRequest
from kvfork.server.routes import as_pairs, chat_tokens
from kvfork.server.state import state_of

__all__ = ["router"]

router = APIRouter()


def _body(info: SnapshotInfo) -> dict:
    kind = "chat" if "messages" in info.source else "text"
    return {"id": info.id, "object": "snapshot", "created": info.created, "n_tokens": info.n_tokens, "kind": kind}


@router.post("/v1/snapshots")
async def create(body: SnapshotRequest, request: Request) -> JSONResponse:
    """Prefill a prompt (plain) or messages (chat, without the assistant header) once and pin it.

    Continue with `snapshot_id` in /v1/completions (the prompt is appended to the snapshot's tokens)
    or /v1/chat/completions (the messages follow the snapshot's messages).
    """
    st = state_of(request)
    if st.check_model(body.model) is not None:
        raise APIError(400, f"a snapshot is the base model's prefill; make it with model '{st.model_id}' and name"
                            " the adapter when you continue it", param="model", code="invalid_value")
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt", code="invalid_value")
    if body.messages is not None:
        pairs = as_pairs(body.messages)
        tokens = await run_in_threadpool(chat_tokens, st, pairs, generation_prompt=False)
        source: dict = {"messages": [list(p) for p in pairs], "tokens": tokens}
    else:
        tokens = await run_in_threadpool(st.engine.tokenize, body.prompt or "", add_bos=True)
        source = {"tokens": tokens}
    if not tokens or len(tokens) >= st.engine.ctx.n_ctx:
        raise APIError(400, f"a snapshot needs 1 to {st.engine.ctx.n_ctx - 1} tokens; this one has {len(tokens)}",
                       param="prompt", code="context_length_exceeded")
    future: Future[SnapshotInfo | Exception] = Future()
    st.loop.call(lambda: st.loop.dispatcher.snapshot(tokens, source, future.set_result))
    result = await asyncio.wrap_future(future)
    if isinstance(result, Exception):
        raise result
    return JSONResponse(_body(result), status_code=201)


@router.get("/v1/snapshots")
async def listing(request: Request) -> JSONResponse:
    st = state_of(request)
    infos = await asyncio.wrap_future(st.loop.call(lambda: list(st.loop.dispatcher.snapshots.values())))
    return JSONResponse({"object": "list", "data": [_body(i) for i in infos]})


@router.delete("/v1/snapshots/{snapshot_id}")
async def delete(snapshot_id: str, request: Request) -> JSONResponse:
    st = state_of(request)
    found = await asyncio.wrap_future(st.loop.call(lambda: st.loop.dispatcher.drop_snapshot(snapshot_id)))
    if not found:
        raise APIError(404, f"no snapshot '{snapshot_id}'", param="snapshot_id", code="snapshot_not_found")
    return JSONResponse({"id": snapshot_id, "object": "snapshot.deleted", "deleted": True})
