"""Function calling: the tool-call formats models write (a table), OpenAI tool checks, parsing, grammars.

A model's chat template decides how tool definitions, assistant calls and tool results are laid out
(rendered by LlamaModel.render_chat); the model then writes its calls in its own format. `FORMATS`
lists the formats kvfork parses; a model is matched to one by its template (add a row for a new one).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from kvfork.engine.llama import json_grammar
from kvfork.errors import InvalidParameter
from kvfork.server.errors import APIError

__all__ = ["FORMATS", "ToolCall", "ToolFormat", "Tools", "format_for"]


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

    def split(self, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
        """The reply's text outside the calls (None if empty) and its calls of the functions `names`.

        Calls between the markers; or, as llama.cpp's Hermes parser also accepts (small Qwen2.5 models
        write them so), a reply that is only such JSON objects, bare or in a ```json fence. A malformed
        call, or one of an undefined function, stays text.
        """
        calls: list[ToolCall] = []
        rest: list[str] = []
        at = 0
        pattern = re.compile(re.escape(self.open) + r"(.*?)" + re.escape(self.close), re.S)
        for m in pattern.finditer(text):
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

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        """GBNF for replies that are only calls (tool_choice required or named): each names one of
        `tools` with arguments matching its parameters schema; one call unless `parallel`."""
        alternatives = [{"type": "object", "required": ["name", "arguments"],
                         "properties": {"name": {"const": t["function"]["name"]},
                                        "arguments": t["function"].get("parameters") or {"type": "object"}}}
                        for t in tools]
        body = json_grammar(json.dumps({"anyOf": alternatives}, sort_keys=True)).decode()
        body = re.sub(r"^root ::=", "call ::=", body, flags=re.M)
        one = f'{json.dumps(self.open)} "\\n" call "\\n" {json.dumps(self.close)}'
        root = f"root ::= {one} ( \"\\n\" {one} )*" if parallel else f"root ::= {one}"
        return f"{root}\n{body}"


def _call(text: str, names: set[str]) -> ToolCall | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return _as_call(value, names)


def _as_call(value: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    args = value.get("arguments", {})
    if not isinstance(args, dict):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(args, ensure_ascii=False))


def _bare_calls(text: str, names: set[str]) -> list[ToolCall]:
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


@dataclass(frozen=True)
class Tools:
    """A chat request's tools, checked: definitions, the choice and what decoding it needs."""

    definitions: list[dict]
    choice: str  # "auto", "required", "none", or the name of the function that must be called
    parallel: bool
    fmt: ToolFormat

    @staticmethod
    def check(tools: list[Any] | None, choice: Any, parallel: bool | None, fmt: ToolFormat | None) -> Tools | None:
        """Validate OpenAI `tools` / `tool_choice` (400s with OpenAI error objects); None without tools."""
        if not tools:
            if choice not in (None, "none", "auto"):
                raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
            return None
        if fmt is None:
            raise APIError(400, "this model's chat template has no tool-call format kvfork knows (it parses:"
                                f" {', '.join(f.name for f in FORMATS)})", param="tools", code="unsupported_parameter")
        names = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", fn["name"]):
                raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..."
                                    " (letters, digits, _ or -), 'parameters': {...}}}", param="tools",
                               code="invalid_value")
            params = fn.get("parameters", {"type": "object"})
            if not isinstance(params, dict):
                raise APIError(400, f"tools[{i}].function.parameters must be a JSON Schema object",
                               param="tools", code="invalid_value")
            try:
                json_grammar(json.dumps(params, sort_keys=True))
            except InvalidParameter as exc:
                raise APIError(400, f"tools[{i}].function.parameters: {exc}", param="tools",
                               code="invalid_value") from None
            names.append(fn["name"])
        if len(set(names)) != len(names):
            raise APIError(400, "two tools have the same name", param="tools", code="invalid_value")
        if choice is None:
            choice = "auto"
        if isinstance(choice, dict):
            fn = choice.get("function") if choice.get("type") == "function" else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if name not in names:
                raise APIError(400, f"tool_choice names no defined function ({name!r}; defined: {names})",
                               param="tool_choice", code="invalid_value")
            choice = name
        elif choice not in ("auto", "required", "none"):
            raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function',"
                                " 'function': {'name': ...}}", param="tool_choice", code="invalid_value")
        return Tools(list(tools), choice, parallel is not False, fmt)

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.definitions}

    def split(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The reply's text and its calls of these tools (none with tool_choice "none")."""
        return (text or None, []) if self.choice == "none" else self.fmt.split(text, self.names)

    @property
    def offered(self) -> list[dict] | None:
        """The definitions the prompt shows (none with tool_choice "none")."""
        return None if self.choice == "none" else self.definitions

    def grammar(self) -> str | None:
        """The decoding constraint: calls only, for "required" or a named function; None otherwise."""
        if self.choice == "required":
            return self.fmt.grammar(self.definitions, self.parallel)
        if self.choice not in ("auto", "none"):
            named = [t for t in self.definitions if t["function"]["name"] == self.choice]
            return self.fmt.grammar(named, False)
        return None
