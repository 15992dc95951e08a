"""Function calling on the server: a chat request's OpenAI `tools` and `tool_choice`, checked (400s).

How a model writes its calls (ToolCall, ToolFormat, FORMATS, format_for) lives in kvfork.toolcalls,
which the pipeline's agents read too; the names stay importable from here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from kvfork.engine.llama import json_grammar
from kvfork.errors import InvalidParameter
from kvfork.server.errors import APIError
from kvfork.toolcalls import FORMATS, ToolCall, ToolFormat, format_for

__all__ = ["FORMATS", "ToolCall", "ToolFormat", "Tools", "format_for"]


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
