"""Request bodies of the OpenAI endpoints (and kvfork's snapshot extension), validated by pydantic."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvfork.engine.sampling import SamplingParams
from kvfork.server.errors import APIError

__all__ = ["ChatMessage", "CompletionRequest", "ChatRequest", "SnapshotRequest", "StreamOptions"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls (OpenAI's shape)
    tool_call_id: str | None = None  # a tool message: the call it answers

    @property
    def with_tools(self) -> bool:
        return self.role == "tool" or bool(self.tool_calls)

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (transformers' convention: call arguments as objects)."""
        role, text = self.as_pair()
        out: dict[str, Any] = {"role": role, "content": text}
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                fn = call.get("function") if isinstance(call, dict) else None
                try:
                    args = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]  # type: ignore[index]
                    calls.append({"id": call.get("id"), "type": "function",
                                  "function": {"name": fn["name"], "arguments": args}})  # type: ignore[index]
                except (TypeError, KeyError, ValueError):
                    raise APIError(400, "an assistant's tool_calls must be [{'id', 'type': 'function', 'function':"
                                        " {'name', 'arguments': JSON text}}]", param="messages",
                                   code="invalid_value") from None
            out["tool_calls"] = calls
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
        return out

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages", code="invalid_value")
            parts.append(part["text"])
        return "".join(parts)

    def as_pair(self) -> tuple[str, str]:
        """(role, text). A message field kvfork does not implement (`refusal`, `audio`, ...) is refused with a
        400; `name` is accepted and ignored (the catalog models' chat templates have no place for it)."""
        for key, value in (self.model_extra or {}).items():
            if key != "name" and value not in (None, [], ""):
                raise APIError(400, f"unsupported message field '{key}': kvfork does not implement it yet",
                               param=f"messages.{key}", code="unsupported_parameter")
        # NOTE: "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return ("system" if self.role == "developer" else self.role, self.text())


# NOTE: OpenAI fields kvfork accepts and ignores, because ignoring them changes nothing a client gets back:
# `user` (an end-user id for OpenAI's abuse monitoring) and `metadata` (tags for stored completions).
IGNORED = frozenset({"user", "metadata"})
# NOTE: values of unimplemented fields that ask for what kvfork does anyway (a client library's defaults):
# nothing is stored, there is one service tier.
_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "functions": (None, []), "function_call": (None, "none"),
    "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, ""), "store": (None, False),
    "service_tier": (None, "auto", "default"), "modalities": (None, ["text"]),
}
_WHY = {"functions": "the deprecated functions API (use tools) is not implemented by kvfork",
        "function_call": "the deprecated functions API (use tool_choice) is not implemented by kvfork"}


def refuse_unsupported(extra: dict[str, Any] | None, ignored: frozenset[str] = IGNORED, *,
                       empty_ok: bool = False) -> None:
    """Raise APIError(400) naming the first of a request's unknown fields (`model_extra`) that kvfork
    does not implement; `ignored` fields, the defaults in _DEFAULTS and, with empty_ok, empty values
    (None, [], {}: they ask for nothing) pass (no silent drops)."""
    for key, value in (extra or {}).items():
        if key in ignored or value in _DEFAULTS.get(key, ()) or (empty_ok and value in (None, [], {})):
            continue
        reason = _WHY.get(key, "kvfork does not implement it")
        raise APIError(400, f"unsupported parameter '{key}': {reason}", param=key, code="unsupported_parameter")


class _Generation(BaseModel):
    """Fields both endpoints share. A field kvfork does not implement is refused by `refuse_unsupported`
    (named, with a 400), except the few in IGNORED whose effect is nil here."""

    model_config = ConfigDict(extra="allow")
    model: str
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = False  # extension (as llama-server and vLLM): generate max_tokens even past end-of-text
    snapshot_id: str | None = None  # kvfork extension: continue from a snapshot made with POST /v1/snapshots

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and (len(v) > 4 or not all(v)):
            raise ValueError("at most 4 non-empty stop strings")
        return v or None

    def refuse_unsupported(self) -> None:
        """Raise APIError(400) naming the first field this server does not implement (no silent drops)."""
        refuse_unsupported(self.model_extra)

    def wanted_tokens(self) -> int | None:
        return self.max_tokens

    def wanted_logprobs(self) -> int | None:
        """None: no logprobs; k: each token's log-probability with its k likeliest alternatives."""
        return None

    def wanted_schema(self) -> dict | None:
        """The JSON Schema the reply must match (constrained decoding), or None."""
        return None

    def sampling(self, max_tokens: int) -> SamplingParams:
        """The engine's SamplingParams for one choice (temperature 0 is greedy)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=stop,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            ignore_eos=self.ignore_eos, logprobs=self.wanted_logprobs(), json_schema=self.wanted_schema(),  # type: ignore[arg-type]  # NOTE: a dict is taken
        )


class CompletionRequest(_Generation):
    prompt: str | list[int]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[int]) -> str | list[int]:
        if not v:
            raise ValueError("the prompt is empty")
        return v


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    # kvfork extension: reuse of long messages seen before at another offset (approximate unless "exact")
    reuse: Literal["exact", "shift", "kvcomm", "blend"] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def wanted_schema(self) -> dict | None:
        """json_object: any JSON object; json_schema: its `schema` (`strict` or not: always enforced)."""
        fmt = self.response_format
        kind = None if fmt is None else fmt.get("type")
        if fmt is None or kind == "text":
            return None
        if kind == "json_object":
            return {"type": "object"}
        spec = fmt.get("json_schema")
        if kind == "json_schema" and isinstance(spec, dict) and isinstance(spec.get("schema", {}), dict):
            return spec.get("schema") or {"type": "object"}
        raise APIError(400, "response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type':"
                            " 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}",
                       param="response_format", code="invalid_value")

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def wanted_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


class SnapshotRequest(BaseModel):
    """POST /v1/snapshots: prefill `prompt` (plain text) or `messages` (chat) once and keep it pinned."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
