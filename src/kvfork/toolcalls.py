"""A model's tool-call format: how it writes calls (a table of formats), parsing replies, the GBNF of a required call.

A model's chat template decides how tool definitions, assistant calls and tool results are laid out
(rendered by LlamaModel.render_chat); the model then writes its calls in its own format. `FORMATS`
lists the formats kvfork parses; a model is matched to one by its template (add a row for a new one).
The server (server/tools.py) and pipeline agents with tools (pipeline/tool_session.py) both read it.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from kvfork.engine.llama import json_grammar

__all__ = ["FORMATS", "ToolCall", "ToolFormat", "format_for"]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def body(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


@dataclass(frozen=True)
class ToolFormat:
    """Calls written as `open` + {"name": ..., "arguments": {...}} + `close`, one after another
    (Hermes' format, which Qwen2.5's template asks for)."""

    name: str
    open: str
    close: str
    detect: str  # what the chat template contains when its model writes this format

    def split(self, text: str, names: set[str] | None) -> tuple[str | None, list[ToolCall]]:
        """The reply's text outside the calls (None if empty) and its calls of the functions `names`
        (None: of any name).

        Calls between the markers; or, as llama.cpp's Hermes parser also accepts (small Qwen2.5 models
        write them so), a reply that is only such JSON objects, bare or in a ```json fence. A malformed
        call, or one of an undefined function, stays text.
        """
        calls: list[ToolCall] = []
        rest: list[str] = []
        at = 0
        for m in self._pattern.finditer(text):
            call = _call(m.group(1), names)
            if call is None:
                continue
            rest.append(text[at:m.start()])
            at = m.end()
            calls.append(call)
        rest.append(text[at:])
        content = "".join(rest).strip()
        if not calls:
            bare = _bare_calls(content, names)
            if bare:
                return None, bare
        return content or None, calls

    def malformed(self, text: str) -> list[str]:
        """The bodies between the markers that are not a call (bad JSON, no name, arguments not an object)."""
        return [m.group(1).strip() for m in self._pattern.finditer(text) if _call(m.group(1), None) is None]

    @property
    def _pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.open) + r"(.*?)" + re.escape(self.close), re.S)

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        """GBNF for replies that are only calls (tool_choice required or named): each names one of
        `tools` with arguments matching its parameters schema; one call unless `parallel`."""
        # NOTE: "name" before "arguments" (the converter keeps the properties' order): the model picks the
        # function before writing its arguments, as the format and its template write calls. The schema's
        # own keys are sorted: templates render arguments with Jinja's tojson, which sorts them.
        alternatives = [{"type": "object", "required": ["name", "arguments"],
                         "properties": {"name": {"const": t["function"]["name"]},
                                        "arguments": _sorted(t["function"].get("parameters") or {"type": "object"})}}
                        for t in tools]
        body = json_grammar(json.dumps({"anyOf": alternatives})).decode()
        body = re.sub(r"^root ::=", "call ::=", body, flags=re.M)
        one = f'{json.dumps(self.open)} "\\n" call "\\n" {json.dumps(self.close)}'
        root = f"root ::= {one} ( \"\\n\" {one} )*" if parallel else f"root ::= {one}"
        return f"{root}\n{body}"


def _sorted(schema: Any) -> Any:
    return json.loads(json.dumps(schema, sort_keys=True))


def _call(text: str, names: set[str] | None) -> ToolCall | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return _as_call(value, names)


def _as_call(value: Any, names: set[str] | None) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if names is not None and value["name"] not in names:
        return None
    args = value.get("arguments", {})
    if not isinstance(args, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(args, ensure_ascii=False))


def _bare_calls(text: str, names: set[str] | None) -> list[ToolCall]:
    """The calls of a reply made only of call objects (whitespace between them, an optional ```json fence)."""
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    decoder, at, calls = json.JSONDecoder(), 0, []
    while at < len(body):
        try:
            value, end = decoder.raw_decode(body, at)
        except ValueError:
            return []
        call = _as_call(value, names)
        if call is None:
            return []
        calls.append(call)
        at = end
        while at < len(body) and body[at].isspace():
            at += 1
    return calls


FORMATS = [ToolFormat("hermes", "<tool_call>", "</tool_call>", detect="<tool_call>")]


def format_for(template: str | None) -> ToolFormat | None:
    """The format a model writes its calls in, from its chat template; None if kvfork knows none."""
    return next((f for f in FORMATS if template and f.detect in template), None)
