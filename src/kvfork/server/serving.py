"""The handler side of one generation request: limits, submit to the loop, stream or collect the events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvfork.engine.adapters import Adapter
from kvfork.errors import KvforkError
from kvfork.reuse.config import ReuseConfig
from kvfork.server.errors import APIError
from kvfork.server.job import Event, Job, Sink
from kvfork.server.protocol import ChatRequest, CompletionRequest
from kvfork.server.responses import Kind, chunk_body, completion_body, logprobs_body, sse, usage_chunk
from kvfork.server.state import ServerState
from kvfork.server.tools import ToolCall, Tools

__all__ = ["serve"]

def make_job(st: ServerState, body: CompletionRequest | ChatRequest, tokens: list[int], kind: Kind,
             tools: Tools | None = None) -> Job:
    """Check n, max_tokens and the context length; one SamplingParams per choice."""
    cfg, n_ctx = st.config, st.engine.ctx.n_ctx
    if body.n > cfg.max_n:
        raise APIError(400, f"n must be <= {cfg.max_n} on this server", param="n", code="invalid_value")
    wanted = body.wanted_tokens()
    if wanted is not None and wanted > cfg.max_tokens:
        raise APIError(400, f"max_tokens must be <= {cfg.max_tokens} on this server", param="max_tokens",
                       code="invalid_value")
    room = n_ctx - len(tokens)
    if room < 1 or (wanted is not None and wanted > room):
        raise APIError(400, f"this model's context holds {n_ctx} tokens; the prompt has {len(tokens)} and"
                            f" {wanted or 1} more were asked for; shorten the prompt or lower max_tokens",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    # NOTE: OpenAI's default is 16 tokens for completions and "as many as fit" for chat.
    max_tokens = wanted or (min(16, room) if kind == "text" else min(cfg.max_tokens, room))
    try:
        base = body.sampling(max_tokens)
        grammar = tools.grammar() if tools is not None else None
        if grammar is not None:
            if base.json_schema is not None:
                raise APIError(400, "response_format and a required tool call cannot both constrain a reply",
                               param="response_format", code="invalid_value")
            base = base.with_overrides(grammar=grammar)
        base = st.engine.check_sampling(base)
    except KvforkError as exc:  # NOTE: a schema the grammar converter cannot express: before any prefill
        raise APIError(400, str(exc), param="response_format", code="invalid_value") from None
    # NOTE: n choices with one seed would be n identical samples; each choice gets seed + index.
    params = [base if base.seed is None else base.with_overrides(seed=(base.seed + i) % 2**32)
              for i in range(body.n)]
    return Job(tokens=tokens, params=params, sink=Sink(asyncio.get_running_loop()))


async def serve(request: Request, st: ServerState, body: CompletionRequest | ChatRequest, tokens: list[int],
                kind: Kind, reuse: tuple[list[tuple[list[int], bool]], ReuseConfig] | None = None,
                adapter: Adapter | None = None, tools: Tools | None = None) -> JSONResponse | StreamingResponse:
    """Submit the request's job and answer as a stream of chunks or one body (`reuse`: pieces and mode;
    `adapter`: the LoRA decoder of its choices; `tools`: replies are parsed for tool calls)."""
    job = make_job(st, body, tokens, kind, tools)
    job.adapter = adapter
    if reuse is not None:
        job.pieces, job.reuse = reuse
    if body.stream and job.params[0].logprobs is not None:
        raise APIError(400, "logprobs are returned for non-streamed requests only on this server",
                       param="logprobs", code="unsupported_parameter")
    st.loop.submit(job)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(st, job, kind, rid, body.model, include_usage, tools),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts: list[str] = [""] * job.n
    finish: list[str | None] = [None] * job.n
    logprobs: list[Any] = [None] * job.n
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        while True:
            event = await _next(job, gone)
            if event is None:  # the client went away
                st.loop.cancel(job)
                return JSONResponse({}, status_code=499)
            if event.kind == "delta":
                texts[event.index] += event.text
            elif event.kind == "finish":
                finish[event.index] = event.finish_reason
                if event.logprobs is not None:
                    logprobs[event.index] = logprobs_body(kind, event.logprobs, st.engine.model.token_bytes)
            elif event.kind == "error":
                raise event.error or APIError(500, "the request failed")
            elif event.kind == "done" and event.usage is not None:
                calls: list[list[ToolCall]] = [[] for _ in texts]
                contents: list[str | None] = list(texts)  # NOTE: None: a reply that is only tool calls
                if tools is not None:
                    for i, text in enumerate(texts):
                        contents[i], calls[i] = tools.split(text)
                        if calls[i]:
                            finish[i] = "tool_calls"
                return JSONResponse(completion_body(kind, rid, body.model, contents, finish, event.usage,
                                                    logprobs, calls))
    except BaseException:
        st.loop.cancel(job)
        raise
    finally:
        gone.cancel()


async def _disconnect(request: Request) -> None:
    """Returns when the client hangs up.

    NOTE: the body is read already, so the next ASGI message is the disconnect; polling
    request.is_disconnected() instead can miss it (the server may not be reading the socket then).
    """
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _next(job: Job, gone: asyncio.Future[None]) -> Event | None:
    """The job's next event, or None once the client is gone."""
    get = asyncio.ensure_future(job.sink.get())
    waits: set[asyncio.Future[object]] = {get, gone}  # type: ignore[arg-type]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    return None


async def _stream(st: ServerState, job: Job, kind: Kind, rid: str, model: str,
                  include_usage: bool, tools: Tools | None = None) -> AsyncIterator[bytes]:
    ended = False
    held = [""] * job.n  # NOTE: with tools, a choice's text is held until it ends: a call is parsed whole
    try:
        if kind == "chat":
            for i in range(job.n):
                yield sse(chunk_body(kind, rid, model, i, role=True))
        while True:
            event = await job.sink.get()
            if event.kind == "delta" and tools is not None:
                held[event.index] += event.text
            elif event.kind == "delta":
                yield sse(chunk_body(kind, rid, model, event.index, text=event.text))
            elif event.kind == "finish":
                reason = event.finish_reason
                if tools is not None:
                    content, calls = tools.split(held[event.index])
                    if content:
                        yield sse(chunk_body(kind, rid, model, event.index, text=content))
                    if calls:
                        yield sse(chunk_body(kind, rid, model, event.index, tool_calls=calls))
                        reason = "tool_calls"
                yield sse(chunk_body(kind, rid, model, event.index, finish_reason=reason))
            elif event.kind == "error":
                ended = True
                error = event.error if isinstance(event.error, APIError) else APIError(500, str(event.error))
                yield sse(error.body())
                return
            elif event.kind == "done":
                ended = True
                if include_usage and event.usage is not None:
                    yield sse(usage_chunk(kind, rid, model, event.usage))
                yield sse("[DONE]")
                return
    finally:
        if not ended:
            # NOTE: the client disconnected mid-stream (the generator is closed): free its branches now.
            st.loop.cancel(job)
