"""Tool: a Python function a pipeline agent may call, with the name, description and JSON-schema parameters
the model is shown; derived from the function's signature, type hints and docstring unless given."""

from __future__ import annotations

import collections.abc
import enum
import inspect
import json
import re
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from kvfork.engine.llama import json_grammar
from kvfork.errors import InvalidParameter, ToolError
from kvfork.pipeline.result import ToolUse
from kvfork.toolcalls import ToolCall

__all__ = ["Tool", "run_call", "schema_of"]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                               dict: "object", list: "array", tuple: "array"}
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Params|Returns|Return|Raises|Yields|Examples?|Notes?):\s*$")


def _object() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


@dataclass(frozen=True, eq=False)
class Tool:
    """A function an agent can call: `fn(**arguments)` runs on the runner's thread; its return value
    (a str as is, anything else as JSON, or str() when it is not JSON) is sent back as the tool's result.

    Args:
        name: what the model calls it (letters, digits, _ or -; at most 64).
        fn: the Python callable (not a coroutine function: wrap it in asyncio.run yourself).
        description: shown to the model with the name.
        parameters: the JSON Schema of the arguments object (OpenAI's `parameters`).

    `Tool.of(fn)` derives all of it from a plain function; an Agent does that for every callable in its
    `tools`. A Tool is callable itself (it calls `fn`).
    """

    name: str
    fn: Callable[..., Any]
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=_object)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ToolError(f"tool name {self.name!r}: use 1-64 letters, digits, _ or - (what the model writes)")
        if not callable(self.fn):
            raise ToolError(f"tool {self.name!r}: fn must be callable, got {type(self.fn).__name__}")
        if inspect.iscoroutinefunction(self.fn):
            raise ToolError(f"tool {self.name!r} is a coroutine function; tools run synchronously: pass"
                            " lambda **kw: asyncio.run(fn(**kw)) with explicit parameters instead")
        if not isinstance(self.parameters, Mapping) or self.parameters.get("type", "object") != "object":
            raise ToolError(f"tool {self.name!r}: parameters must be a JSON Schema of type 'object'")
        object.__setattr__(self, "parameters", dict(self.parameters))
        try:  # NOTE: a required call is constrained by a grammar built from this schema: check it now
            json_grammar(json.dumps(self.parameters, sort_keys=True))
        except InvalidParameter as exc:
            raise ToolError(f"tool {self.name!r}: parameters: {exc}") from None

    @classmethod
    def of(cls, fn: Callable[..., Any] | Tool, *, name: str | None = None, description: str | None = None) -> Tool:
        """A Tool from a function: its __name__, its docstring's text before the Args section, and a schema
        of its parameters from their type hints (str, int, float, bool, list[X], dict, Literal, Enum,
        X | None) and defaults (a parameter with a default is optional). A Tool is returned as is."""
        if isinstance(fn, Tool):
            return fn
        if not callable(fn):
            raise ToolError(f"an agent's tools must be callables or Tools, got {type(fn).__name__}")
        text, params = schema_of(fn)
        return cls(name or str(getattr(fn, "__name__", type(fn).__name__)), fn,
                   text if description is None else description, params)

    def definition(self) -> dict[str, Any]:
        """The OpenAI-shaped definition the chat template renders."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": dict(self.parameters)}}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def run_call(tools: Mapping[str, Tool], call: ToolCall) -> ToolUse:
    """Run one call the model made; what went wrong (unknown name, arguments that do not fit the
    function, an exception in it) becomes the result text the model reads, as agent frameworks do."""
    tool = tools.get(call.name)
    if tool is None:
        return ToolUse(call.id, call.name, call.arguments, f"Error: there is no tool named {call.name!r}; the"
                       f" tools are: {', '.join(sorted(tools))}.", error="unknown_tool")
    arguments = json.loads(call.arguments)  # NOTE: the parser made it: always a JSON object
    try:
        inspect.signature(tool.fn).bind(**arguments)
    except TypeError as exc:
        return ToolUse(call.id, call.name, call.arguments, f"Error: bad arguments for {call.name}: {exc}.",
                       error="bad_arguments")
    except ValueError:  # NOTE: a builtin without a signature: let the call itself tell
        pass
    t0 = time.perf_counter()
    try:
        value = tool.fn(**arguments)
    except Exception as exc:  # noqa: BLE001 - a tool's failure is the model's to read, not the run's
        return ToolUse(call.id, call.name, call.arguments, f"Error: {type(exc).__name__}: {exc}",
                       error="raised", seconds=time.perf_counter() - t0)
    return ToolUse(call.id, call.name, call.arguments, _as_text(value), seconds=time.perf_counter() - t0)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def schema_of(fn: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    """(description, parameters schema) of a function, from its signature, type hints and docstring."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        raise ToolError(f"{fn!r} has no signature to derive a tool schema from; give Tool(parameters=...)") from None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: fall back to the raw ones
        hints = {}
    description, notes = _docstring(inspect.getdoc(fn) or "")
    properties: dict[str, Any] = {}
    required: list[str] = []
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue  # NOTE: *args/**kwargs take nothing the model can name
        if p.kind is p.POSITIONAL_ONLY:
            raise ToolError(f"{getattr(fn, '__name__', fn)}: parameter {p.name!r} is positional-only; tools are"
                            " called with keyword arguments")
        hint = hints.get(p.name, p.annotation)
        try:
            prop = _schema(_resolve(hint, fn))
        except ToolError as exc:
            raise ToolError(f"{getattr(fn, '__name__', fn)}: parameter {p.name!r}: {exc}") from None
        if p.name in notes:
            prop["description"] = notes[p.name]
        properties[p.name] = prop
        if p.default is p.empty:
            required.append(p.name)
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return description, schema


def _resolve(hint: Any, fn: Callable[..., Any]) -> Any:
    """A string annotation (postponed evaluation) get_type_hints could not resolve as a whole, alone."""
    if not isinstance(hint, str):
        return hint
    scope = {**vars(typing), **getattr(fn, "__globals__", {})}
    try:
        return eval(hint, scope)  # noqa: S307 - the function's own annotation, in its module's scope
    except Exception:  # noqa: BLE001
        raise ToolError(f"annotation {hint!r} cannot be resolved (a name local to a function?)") from None


def _schema(hint: Any) -> dict[str, Any]:
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        return _schema(kept[0]) if len(kept) == 1 else {"anyOf": [_schema(a) for a in kept]}
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence):
        one = args[:1] if origin is not tuple else args[:1] if args[1:] == (Ellipsis,) else ()
        return {"type": "array", "items": _schema(one[0])} if one else {"type": "array"}
    if origin in (dict, collections.abc.Mapping):
        return {"type": "object"}
    raise ToolError(f"type {hint!r} has no JSON Schema here; give Tool(..., parameters=...)")


def _docstring(doc: str) -> tuple[str, dict[str, str]]:
    """The text before the first section (Args:, Returns:, ...), and Google-style `name: text` notes."""
    lines = doc.splitlines()
    cut = next((i for i, line in enumerate(lines) if _SECTION.match(line)), len(lines))
    notes: dict[str, str] = {}
    section, last = None, None
    for line in lines[cut:]:
        head = _SECTION.match(line)
        if head:
            section, last = head.group(1), None
            continue
        if section not in ("Args", "Arguments", "Parameters", "Params"):
            continue
        m = re.match(r"^\s{0,8}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
        if m:
            last = m.group(1)
            notes[last] = m.group(2).strip()
        elif last is not None and line.strip():
            notes[last] = f"{notes[last]} {line.strip()}".strip()
    return "\n".join(lines[:cut]).strip(), notes
