"""The event stream of a streamed POST /v1/responses: a chat completion's stream (its SSE chunks, the same
generation path, cancellation and tool-call parsing) reshaped into the Responses API's typed events.

Order, as OpenAI's client accumulates it: `response.created`, `response.in_progress`; per message item
`response.output_item.added`, `response.content_part.added`, `response.output_text.delta`…,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`; per function call
`response.output_item.added`, `response.function_call_arguments.delta`/`.done`, `response.output_item.done`;
then `response.completed` (or `response.incomplete` at max_output_tokens, or `response.failed`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Protocol

__all__ = ["ResponseShape", "call_item", "message_item", "response_events"]


def message_item(text: str, status: str) -> dict[str, Any]:
    """An assistant message output item holding one output_text part."""
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def call_item(call: dict[str, Any], status: str, arguments: str | None = None) -> dict[str, Any]:
    """A function_call output item from a chat completion's tool call (`arguments`: its own, by default)."""
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:24]}", "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": call["function"]["arguments"] if arguments is None else arguments, "status": status}


class ResponseShape(Protocol):
    """Builds the response object (same id and settings every time) from what the stream has so far."""

    def __call__(self, output: list[dict[str, Any]], *, status: str, incomplete: str | None = None,
                 usage: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]: ...


def _event(kind: str, seq: int, fields: dict[str, Any]) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": seq, **fields}, ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()


def _chunks(raw: str | bytes | memoryview) -> list[dict[str, Any] | str]:
    """The `data:` payloads of one piece of the chat stream (JSON objects, or the "[DONE]" marker)."""
    text = raw if isinstance(raw, str) else bytes(raw).decode()
    out: list[dict[str, Any] | str] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


class _Events:
    """The events so far: numbered, with the output items they built."""

    def __init__(self) -> None:
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.message: dict[str, Any] | None = None  # the open message item, while its text streams

    def emit(self, kind: str, **fields: Any) -> bytes:
        self.seq += 1
        return _event(kind, self.seq - 1, fields)

    def text(self, delta: str) -> list[bytes]:
        out = []
        if self.message is None:
            self.message = message_item("", "in_progress")
            part = self.message["content"].pop()  # NOTE: announced empty, then added as its own event
            self.output.append(self.message)
            out.append(self.emit("response.output_item.added", output_index=len(self.output) - 1,
                                 item=self.message))
            self.message["content"].append(part)
            out.append(self.emit("response.content_part.added", **self._where(), part=part))
        self.message["content"][0]["text"] += delta
        out.append(self.emit("response.output_text.delta", **self._where(), delta=delta, logprobs=[]))
        return out

    def end_message(self, status: str) -> list[bytes]:
        if self.message is None:
            return []
        part, where = self.message["content"][0], self._where()
        self.message["status"] = status
        out = [self.emit("response.output_text.done", **where, text=part["text"], logprobs=[]),
               self.emit("response.content_part.done", **where, part=part),
               self.emit("response.output_item.done", output_index=where["output_index"], item=self.message)]
        self.message = None
        return out

    def call(self, call: dict[str, Any]) -> list[bytes]:
        """One whole tool call (the chat stream parses a call whole) as a function_call item."""
        out = self.end_message("completed")
        args = call["function"]["arguments"]
        item = call_item(call, "in_progress", arguments="")
        self.output.append(item)
        where = {"item_id": item["id"], "output_index": len(self.output) - 1}
        out.append(self.emit("response.output_item.added", output_index=where["output_index"], item=dict(item)))
        out.append(self.emit("response.function_call_arguments.delta", **where, delta=args))
        out.append(self.emit("response.function_call_arguments.done", **where, arguments=args))
        item.update(arguments=args, status="completed")
        out.append(self.emit("response.output_item.done", output_index=where["output_index"], item=item))
        return out

    def _where(self) -> dict[str, Any]:
        assert self.message is not None
        return {"item_id": self.message["id"], "output_index": self.output.index(self.message), "content_index": 0}


async def response_events(chat: AsyncIterable[str | bytes | memoryview], shape: ResponseShape) -> AsyncIterator[bytes]:
    """Reshape a chat completion stream (one choice, `stream_options.include_usage` on) into Responses
    events. A failure mid-stream ends it with `response.failed`, never a broken connection; closing this
    generator (the client left) closes `chat`, whose own cleanup cancels the generation."""
    ev = _Events()
    finish: str | None = None
    usage: dict[str, Any] | None = None
    try:
        yield ev.emit("response.created", response=shape([], status="in_progress"))
        yield ev.emit("response.in_progress", response=shape([], status="in_progress"))
        try:
            async for raw in chat:
                for chunk in _chunks(raw):
                    if chunk == "[DONE]":
                        for line in ev.end_message("incomplete" if finish == "length" else "completed"):
                            yield line
                        incomplete = "max_output_tokens" if finish == "length" else None
                        final = shape(ev.output, status="incomplete" if incomplete else "completed",
                                      incomplete=incomplete, usage=usage)
                        yield ev.emit("response.incomplete" if incomplete else "response.completed", response=final)
                        return
                    assert isinstance(chunk, dict)
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"].get("message") or "the generation failed")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices", []):
                        delta = choice.get("delta", {})
                        if delta.get("content"):
                            for line in ev.text(delta["content"]):
                                yield line
                        for call in delta.get("tool_calls") or []:
                            for line in ev.call(call):
                                yield line
                        finish = choice.get("finish_reason") or finish
            raise RuntimeError("the generation ended without finishing")
        except Exception as exc:  # NOTE: the stream has started (200 sent): say it in an event, not a reset
            error = {"code": "server_error", "message": str(exc) or type(exc).__name__}
            yield ev.emit("response.failed", response=shape(ev.output, status="failed", error=error))
    finally:
        # NOTE: a no-op when `chat` ran to its end; otherwise it runs the chat stream's cleanup (cancel the job).
        aclose = getattr(chat, "aclose", None)
        if aclose is not None:
            await aclose()
