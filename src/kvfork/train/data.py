"""Training examples: a JSONL file tokenized exactly as kvfork serves the prompt (llama.cpp's tokenizer)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kvfork.errors import InvalidParameter

__all__ = ["Example", "load_examples", "REQUIRED_KEYS"]

REQUIRED_KEYS: tuple[str, ...] = ("document", "instruction", "response")


class _Tokenizer(Protocol):
    """What load_examples needs of a kvfork.Engine."""

    model: Any  # has .eot

    def prompt_tokens(self, document: str, instruction: str, *, system: str | None = None) -> list[int]: ...

    def prefix_tokens(self, document: str, *, system: str | None = None) -> list[int]: ...

    def tokenize(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Example:
    """One training example: the prompt an agent's branch holds, and the reply to learn (ends with EOT).

    shared: how many leading prompt tokens are the document's shared prefix (what `Engine.prefill`
    computes and every instruction over that document forks); 0 when unknown. Cache-mode training
    computes that prefix's base KV once for every example, and every decoder, over the same document.
    """

    prompt: list[int]
    response: list[int]
    shared: int = 0

    def __post_init__(self) -> None:
        if len(self.prompt) < 2:
            raise InvalidParameter("an example's prompt needs at least 2 tokens (the base prefills all but the last)")
        if not self.response:
            raise InvalidParameter("an example's response is empty")
        if not 0 <= self.shared < len(self.prompt):
            raise InvalidParameter(f"shared={self.shared} must be in [0, {len(self.prompt)}) (the prompt's length)")


def load_examples(path: str | os.PathLike[str], engine: _Tokenizer) -> list[Example]:
    """Read a JSONL file: one object per line, {"document", "instruction", "response"} and optional "system".

    The prompt is `engine.prompt_tokens(document, instruction, system=system)`, the tokens a kvfork branch
    holds for that agent (chat template included); the response is its tokens plus the end-of-turn token,
    so the decoder learns to stop. Blank lines are skipped, other keys ignored; a bad line raises
    InvalidParameter naming it.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidParameter(f"cannot read the training data {path}: {exc}") from exc
    eot = int(engine.model.eot)
    out: list[Example] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = _record(line, where)
        prompt = engine.prompt_tokens(record["document"], record["instruction"], system=record.get("system"))
        prefix = engine.prefix_tokens(record["document"], system=record.get("system"))
        shared = len(prefix) if prompt[: len(prefix)] == prefix and len(prefix) < len(prompt) else 0
        response = engine.tokenize(record["response"]) + [eot]
        try:
            out.append(Example(prompt=prompt, response=response, shared=shared))
        except InvalidParameter as exc:
            raise InvalidParameter(f"{where}: {exc}") from None
    if not out:
        raise InvalidParameter(f"{path} holds no examples (one JSON object per line)")
    return out


def _record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidParameter(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise InvalidParameter(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise InvalidParameter(f"{where}: missing {', '.join(missing)} (each line needs {', '.join(REQUIRED_KEYS)})")
    for key in REQUIRED_KEYS:
        if not isinstance(record[key], str):
            raise InvalidParameter(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    if not record["response"].strip():
        raise InvalidParameter(f"{where}: 'response' is empty")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise InvalidParameter(f"{where}: 'system' must be a string or null, got {type(system).__name__}")
    return record
