"""POST /v1/responses: the stateless subset of OpenAI's Responses API that agent SDKs use, served as a
chat completion (the same prefix sharing, tools and structured output) and reshaped.

`input` items (messages, `function_call`, `function_call_output`), `instructions`, `tools` (function
tools), `tool_choice`, `parallel_tool_calls`, `text.format`, `max_output_tokens`, `temperature`,
`top_p`, `stream` (typed events, see responses_stream.py). Responses are not kept: `previous_response_id`
is a 400.
"""

from __future__ import annotations

import json
import time
import uuid
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvfork.server.errors import APIError
from kvfork.server.protocol import IGNORED, ChatRequest, refuse_unsupported
from kvfork.server.responses_stream import call_item, message_item, response_events
from kvfork.server.routes import chat_completions

__all__ = ["router", "ResponsesRequest"]

router = APIRouter()

# NOTE: accepted and ignored besides the chat endpoint's: responses are never kept (`store` defaults to
# true here), `truncation` only matters for conversations the server would keep, one service tier.
_IGNORED = IGNORED | {"store", "truncation", "service_tier"}
# chat completion fields a 400 may name -> the Responses API's
_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text"}


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    previous_response_id: str | None = None

    def as_chat(self) -> ChatRequest:
        """The same request as a chat completion (400s for what it cannot say)."""
        refuse_unsupported(self.model_extra, _IGNORED, empty_ok=True)
        if self.previous_response_id is not None:
            raise APIError(400, "responses are not kept on this server: send the whole conversation as input",
                           param="previous_response_id", code="unsupported_parameter")
        fields: dict[str, Any] = {"model": self.model, "messages": _messages(self), "temperature": self.temperature,
                                  "top_p": self.top_p, "max_tokens": self.max_output_tokens}
        if self.stream:  # NOTE: the usage chunk carries what response.completed reports
            fields.update(stream=True, stream_options={"include_usage": True})
        if self.tools:
            fields["tools"] = [_chat_tool(i, t) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            fields["tool_choice"] = _chat_choice(self.tool_choice)
        if self.parallel_tool_calls is not None:
            fields["parallel_tool_calls"] = self.parallel_tool_calls
        fmt = (self.text or {}).get("format")
        if fmt is not None:
            fields["response_format"] = _chat_format(fmt)
        try:
            return ChatRequest(**fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise APIError(400, f"input: {where}: {first.get('msg')}", param="input", code="invalid_value") from None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, "only text content (input_text, output_text) is supported", param="input",
                   code="invalid_value")


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """Input items as chat messages: consecutive function calls become one assistant message."""
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for item in items:
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") in ("system", "developer", "user", "assistant"):
            out.append({"role": item["role"], "content": _text(item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": _text(item.get("output"))})
        else:
            raise APIError(400, f"input items of type {kind!r} are not supported (message, function_call,"
                                " function_call_output)", param="input", code="invalid_value")
    return out


def _chat_tool(i: int, tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise APIError(400, f"tools[{i}]: only function tools are supported", param="tools", code="invalid_value")
    fn = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
    return {"type": "function", "function": fn}


def _chat_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _chat_format(fmt: dict[str, Any]) -> dict[str, Any]:
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return fmt


def _output(chat: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """The response's output items from the chat completion's one choice, and why it is incomplete."""
    choice = chat["choices"][0]
    message, items = choice["message"], []
    incomplete = "max_output_tokens" if choice["finish_reason"] == "length" else None
    if message.get("content"):
        items.append(message_item(message["content"], "incomplete" if incomplete else "completed"))
    items += [call_item(call, "completed") for call in message.get("tool_calls") or []]
    return items, incomplete


def _response(body: ResponsesRequest, rid: str, created: int, output: list[dict[str, Any]], *, status: str,
              incomplete: str | None = None, usage: dict[str, Any] | None = None,
              error: dict[str, Any] | None = None) -> dict[str, Any]:
    """The response object (`usage`: the chat completion's, reshaped)."""
    return {
        "id": rid, "object": "response", "created_at": created, "model": body.model, "status": status,
        "incomplete_details": {"reason": incomplete} if incomplete else None, "error": error,
        "instructions": body.instructions, "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "temperature": body.temperature, "top_p": body.top_p, "max_output_tokens": body.max_output_tokens,
        "text": body.text or {"format": {"type": "text"}},
        "usage": None if usage is None else {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]},
    }


@router.post("/v1/responses", response_model=None)
async def responses(body: ResponsesRequest, request: Request) -> JSONResponse | StreamingResponse:
    """One response object, or (`stream`) its typed events reshaped from the chat completion's stream."""
    # NOTE: every 400 (fields, tools, limits, the context) is raised here, before a stream starts
    try:
        chat = await chat_completions(body.as_chat(), request)
    except APIError as exc:
        exc.param = _PARAMS.get(exc.param or "", exc.param)  # the field's name in this API
        raise
    shape = partial(_response, body, f"resp_{uuid.uuid4().hex[:24]}", int(time.time()))
    if isinstance(chat, StreamingResponse):
        return StreamingResponse(response_events(chat.body_iterator, shape), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    result = json.loads(bytes(chat.body))
    items, incomplete = _output(result)
    return JSONResponse(shape(items, status="incomplete" if incomplete else "completed", incomplete=incomplete,
                              usage=result["usage"]))
