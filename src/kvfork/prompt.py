"""ChatLayout: where the shared part ends and each agent's part begins, in the model's own chat template.

The template is rendered by llama.cpp with a sentinel in place of the agent's instruction; the text
before the sentinel is the shared prefix (system prompt + document), the text after it is the tail
every agent's turn ends with. Prompts are then token concatenations prefix + turn, so the shared
prefix is an exact token prefix of every agent's prompt by construction, whatever the tokenizer
would do across the boundary.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ChatLayout", "Render", "slot", "split_slots"]

Render = Callable[[list[tuple[str, str]], bool], str]  # (messages, add_generation_prompt) -> text

_SENTINEL = "\u2063KVFORK-SLOT-{}\u2063"
_SENTINEL_RE = re.compile("\u2063KVFORK-SLOT-(.*?)\u2063")


def slot(name: object) -> str:
    """A marker standing for `name` in text that is rendered (chat template, turn framing), then cut
    apart again by split_slots (reuse modes put a segment's tokens where the marker was)."""
    return _SENTINEL.format(name)


def split_slots(text: str) -> list[tuple[str, bool]]:
    """`text` cut at slot markers, in order: (text, False) between them (empty ones dropped) and
    (name, True) for each marker."""
    return [(part, bool(i % 2)) for i, part in enumerate(_SENTINEL_RE.split(text)) if part or i % 2]


@dataclass(frozen=True)
class ChatLayout:
    """Splits chat prompts of one template into a shared prefix and per-agent turns."""

    prefix: str  # system prompt and document, up to where the instruction goes
    first_tail: str  # after the first instruction: end of the user turn + assistant header
    turn_head: str  # after an assistant reply: end of that turn + next user header
    turn_tail: str  # after a later instruction

    @classmethod
    def build(cls, render: Render, document: str, system: str | None) -> ChatLayout:
        slot = _SENTINEL.format(0)
        user = f"{document}\n\n{slot}" if document else slot
        messages = ([("system", system)] if system else []) + [("user", user)]
        prefix, first_tail = _split(render(messages, True), slot)
        reply, nxt = _SENTINEL.format(1), _SENTINEL.format(2)
        later = render([("user", "x"), ("assistant", reply), ("user", nxt)], True)
        _, rest = _split(later, reply)
        turn_head, turn_tail = _split(rest, nxt)
        return cls(prefix=prefix, first_tail=first_tail, turn_head=turn_head, turn_tail=turn_tail)

    def first_turn(self, instruction: str) -> str:
        """Text that follows the prefix for an agent's first instruction, up to the assistant header."""
        return instruction.strip() + self.first_tail

    def next_turn(self, instruction: str) -> str:
        """Text that follows an assistant reply for the next instruction."""
        return self.turn_head + instruction.strip() + self.turn_tail


def _split(text: str, slot: str) -> tuple[str, str]:
    before, found, after = text.partition(slot)
    if not found:
        raise ValueError("the chat template dropped the message content; it cannot be split into shared and own parts")
    return before, after
