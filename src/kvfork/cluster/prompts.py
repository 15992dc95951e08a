"""route_tokens: the prompt tokens a request will have on a replica, rendered at the ingress for routing.

The ingress holds the model's vocabulary and chat template only (LlamaModel(vocab_only=True)). It renders
a request the way the server's routes do (server/routes.py: the chat template, tools through the Jinja
template, the Responses API as a chat completion), so its route keys match what replicas report. Nothing
here validates: a request the ingress cannot read is routed without keys and the replica answers its 400.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from kvfork.server.protocol import ChatRequest
from kvfork.server.responses_api import ResponsesRequest
from kvfork.server.routes import as_pairs

if TYPE_CHECKING:
    from kvfork.engine.llama import LlamaModel

__all__ = ["DEFAULT_MAX_TOKENS", "route_tokens"]

DEFAULT_MAX_TOKENS = 256  # what a request that names no limit is counted as (its work, for the load term)


def route_tokens(model: LlamaModel, path: str, body: bytes) -> tuple[list[int], int]:
    """(prompt tokens, tokens it may generate over all its choices) of a request to `path`; ([], 0) when the
    request is not a generation or cannot be read."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return [], 0
    if not isinstance(data, dict):
        return [], 0
    try:
        if path == "/v1/completions":
            return _completion(model, data)
        if path == "/v1/chat/completions":
            return _chat(model, ChatRequest(**data)), _limit(data)
        if path == "/v1/responses":
            chat = ResponsesRequest(**data).as_chat()
            return _chat(model, chat), int(data.get("max_output_tokens") or DEFAULT_MAX_TOKENS)
    except Exception:  # noqa: BLE001 - the replica answers with the precise error
        return [], 0
    return [], 0


def _limit(data: dict[str, Any]) -> int:
    per_choice = data.get("max_completion_tokens") or data.get("max_tokens") or DEFAULT_MAX_TOKENS
    return int(per_choice) * max(1, int(data.get("n") or 1))


def _completion(model: LlamaModel, data: dict[str, Any]) -> tuple[list[int], int]:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt), _limit(data)
    if isinstance(prompt, str):
        return model.tokenize(prompt, add_special=True, parse_special=False), _limit(data)
    return [], 0


def _chat(model: LlamaModel, body: ChatRequest) -> list[int]:
    if body.tools or any(m.with_tools for m in body.messages):
        offered = body.tools if body.tool_choice != "none" else None
        text = model.render_chat([m.template_dict() for m in body.messages], tools=offered)
    else:
        text = model.apply_chat_template(as_pairs(body.messages), add_generation_prompt=True)
    return model.tokenize(text, add_special=True, parse_special=True)
