"""OpenAI response bodies: whole completions, stream chunks, usage, model lists."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Literal

from kvfork.engine.logprobs import TokenLogprob
from kvfork.server.job import Usage
from kvfork.server.tools import ToolCall

__all__ = ["Kind", "usage_body", "logprobs_body", "completion_body", "chunk_body", "usage_chunk", "sse", "models_body"]

Kind = Literal["text", "chat"]


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        # NOTE: placed_tokens is kvfork's extension: cached tokens whose KV was placed from a segment
        # computed at another offset (reuse modes, approximate); present only when there were some.
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens,
                                  **({"placed_tokens": usage.placed_tokens} if usage.placed_tokens else {})},
    }


def logprobs_body(kind: Kind, logprobs: tuple[TokenLogprob, ...], piece: Callable[[int], bytes]) -> dict[str, Any]:
    """One choice's logprobs in the endpoint's format (`piece`: a token's bytes)."""
    def text(token: int) -> str:
        return piece(token).decode("utf-8", errors="replace")

    if kind == "chat":
        def entry(token: int, logprob: float) -> dict[str, Any]:
            return {"token": text(token), "logprob": logprob, "bytes": list(piece(token))}

        return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in logprobs], "refusal": None}
    offsets, at = [], 0
    for lp in logprobs:
        offsets.append(at)
        at += len(text(lp.token))
    return {"tokens": [text(lp.token) for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{text(t): v for t, v in lp.top} for lp in logprobs], "text_offset": offsets}


def completion_body(kind: Kind, rid: str, model: str, texts: list[str | None], finish: list[str | None],
                    usage: Usage, logprobs: list[Any] | None = None,
                    calls: list[list[ToolCall]] | None = None) -> dict[str, Any]:
    """A whole (non-streamed) completion with one choice per text (and its logprobs body and tool calls,
    if any)."""
    lps = logprobs or [None] * len(texts)
    tool_calls = calls or [[] for _ in texts]
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t,
                                            **({"tool_calls": [c.body() for c in tc]} if tc else {})},
                    "logprobs": lp, "finish_reason": f}
                   for i, (t, f, lp, tc) in enumerate(zip(texts, finish, lps, tool_calls, strict=True))]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": f}
                   for i, (t, f, lp) in enumerate(zip(texts, finish, lps, strict=True))]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage_body(usage)}


def chunk_body(kind: Kind, rid: str, model: str, index: int, *, text: str | None = None,
               finish_reason: str | None = None, role: bool = False,
               tool_calls: list[ToolCall] | None = None) -> dict[str, Any]:
    """One stream chunk for one choice: a text delta, tool calls, the assistant role (chat's first
    chunk), or the end."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if text is not None:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = [c.body(i) for i, c in enumerate(tool_calls)]
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(kind: Kind, rid: str, model: str, usage: Usage) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage_body(usage)}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event line pair."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def models_body(model_ids: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "kvfork"} for model_id in model_ids]}
