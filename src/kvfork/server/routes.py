"""The OpenAI endpoints: /v1/models, /v1/completions, /v1/chat/completions, plus /health and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from kvfork.engine.adapters import Adapter
from kvfork.prompt import slot, split_slots
from kvfork.reuse.config import ReuseConfig
from kvfork.server.errors import APIError
from kvfork.server.protocol import ChatMessage, ChatRequest, CompletionRequest
from kvfork.server.responses import models_body
from kvfork.server.serving import serve
from kvfork.server.state import ServerState, state_of
from kvfork.server.tools import Tools

__all__ = ["router", "as_pairs", "chat_tokens", "snapshot_source"]

router = APIRouter()


def chat_tokens(st: ServerState, messages: list[tuple[str, str]], *, generation_prompt: bool = True) -> list[int]:
    """The prompt tokens of a conversation in the model's chat template (as Engine.prefill tokenizes it)."""
    text = st.engine.model.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    return st.engine.tokenize(text, add_bos=True, special=True)


def chat_pieces(st: ServerState, messages: list[tuple[str, str]]) -> list[tuple[list[int], bool]]:
    """The prompt as pieces for reuse modes: (tokens, is a message's content), in order.

    NOTE: contents are tokenized on their own, so a message is the same tokens wherever it appears
    (the exact path tokenizes the whole text, which can join tokens across a boundary).
    """
    text = st.engine.model.apply_chat_template([(role, slot(i)) for i, (role, _) in enumerate(messages)],
                                               add_generation_prompt=True)
    pieces: list[tuple[list[int], bool]] = []
    for chunk, is_slot in split_slots(text):
        if is_slot and chunk.isdigit() and int(chunk) < len(messages):
            pieces.append((st.engine.tokenize(messages[int(chunk)][1], special=True), True))
        elif not is_slot:
            pieces.append((st.engine.tokenize(chunk, add_bos=not pieces, special=True), False))
    return pieces


def snapshot_source(st: ServerState, snapshot_id: str | None) -> dict | None:
    if snapshot_id is None:
        return None
    info = st.loop.dispatcher.snapshots.get(snapshot_id)
    if info is None:
        raise APIError(404, f"no snapshot '{snapshot_id}' on this server (GET /v1/snapshots lists them)",
                       param="snapshot_id", code="snapshot_not_found")
    return info.source


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    st = state_of(request)
    return JSONResponse(models_body(st.model_ids(), st.created))


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    body.refuse_unsupported()
    st = state_of(request)
    adapter = st.check_model(body.model)
    source = snapshot_source(st, body.snapshot_id)

    def tokens() -> list[int]:
        if isinstance(body.prompt, list):
            n_vocab = st.engine.model.n_vocab
            if not all(isinstance(t, int) and 0 <= t < n_vocab for t in body.prompt):
                raise APIError(400, f"prompt token ids must be in [0, {n_vocab})", param="prompt",
                               code="invalid_value")
            own = list(body.prompt)
        else:
            own = st.engine.tokenize(body.prompt, add_bos=source is None)
        # NOTE: a snapshot's tokens + the new tokens: the snapshot is an exact token prefix by construction.
        return [*source["tokens"], *own] if source is not None else own

    return await serve(request, st, body, await run_in_threadpool(tokens), "text", adapter=adapter)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
    body.refuse_unsupported()
    st = state_of(request)
    adapter = st.check_model(body.model)
    source = snapshot_source(st, body.snapshot_id)
    tools = Tools.check(body.tools, body.tool_choice, body.parallel_tool_calls, st.tool_format)
    if tools is not None or any(m.with_tools for m in body.messages):
        return await _with_tools(request, st, body, source, tools, adapter)
    messages = as_pairs(body.messages)
    if source is not None:
        if "messages" not in source:
            raise APIError(400, "this snapshot was made from a prompt; continue it with /v1/completions",
                           param="snapshot_id", code="invalid_value")
        messages = [*[tuple(m) for m in source["messages"]], *messages]
    mode = body.reuse or st.config.reuse
    if mode != "exact" and source is None:
        pieces = await run_in_threadpool(chat_pieces, st, messages)
        tokens = [t for piece, _ in pieces for t in piece]
        return await serve(request, st, body, tokens, "chat", reuse=(pieces, ReuseConfig(mode=mode)),
                           adapter=adapter)
    tokens = await run_in_threadpool(chat_tokens, st, messages)
    return await serve(request, st, body, tokens, "chat", adapter=adapter)


async def _with_tools(request: Request, st: ServerState, body: ChatRequest, source: dict | None,
                     tools: Tools | None, adapter: Adapter | None) -> JSONResponse | StreamingResponse:
    """A chat request with tools or tool messages: the model's Jinja template lays them out."""
    if body.reuse not in (None, "exact") or st.config.reuse != "exact":
        raise APIError(400, "reuse modes do not take tools or tool messages yet", param="reuse",
                       code="unsupported_parameter")
    if not st.engine.model.knows_tools:
        raise APIError(400, "this model's chat template has no place for tools or tool calls", param="tools",
                       code="unsupported_parameter")
    if source is not None and "messages" not in source:
        raise APIError(400, "this snapshot was made from a prompt; continue it with /v1/completions",
                       param="snapshot_id", code="invalid_value")
    messages = [{"role": r, "content": c} for r, c in (source or {}).get("messages", [])]
    calls: set[str] = set()
    for m in body.messages:
        entry = m.template_dict()
        calls |= {c["id"] for c in entry.get("tool_calls", []) if c.get("id")}
        if m.role == "tool" and m.tool_call_id not in calls:
            raise APIError(400, f"a tool message answers {m.tool_call_id!r}, which no earlier assistant message"
                                " called", param="messages", code="invalid_value")
        messages.append(entry)

    def tokens() -> list[int]:
        text = st.engine.model.render_chat(messages, tools=tools.offered if tools else None)
        return st.engine.tokenize(text, add_bos=True, special=True)

    return await serve(request, st, body, await run_in_threadpool(tokens), "chat", adapter=adapter, tools=tools)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    st = state_of(request)
    ok = st.loop.alive
    return JSONResponse({"status": "ok" if ok else "engine loop stopped", "model": st.model_id},
                        status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def as_pairs(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    return [m.as_pair() for m in messages]
