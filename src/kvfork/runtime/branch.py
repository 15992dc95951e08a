"""Branch: one agent's continuation of a snapshot; it can take several turns and keeps its KV between them."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvfork.prompt import ChatLayout
from kvfork.result import Completion
from kvfork.scheduler.kv_sequence import KvSequence

if TYPE_CHECKING:
    from kvfork.engine.adapters import Adapter
    from kvfork.runtime.engine import Engine

__all__ = ["Branch"]


class _Keep(enum.Enum):
    ADAPTER = "keep"  # Branch.fork's default: the child keeps its parent's adapter


class Branch:
    """A sequence forked from a snapshot (or another branch) without copying its cells.

    `send` queues text for the next turn; `generate` prefills what is new (batched with every other
    branch that is generating) and decodes. Close a branch, or use it as a context manager, to free
    its own cells; the shared prefix stays with the snapshot.
    """

    def __init__(self, engine: Engine, seq: KvSequence, layout: ChatLayout | None, replies: int) -> None:
        self._engine = engine
        self._seq = seq
        self._layout = layout  # None: plain completion, text is appended as is
        self._replies = replies  # assistant turns so far; decides how the next user turn is framed
        self._outbox: list[str] = []
        self._framed: list[int] = []  # tokens sent as they are (send_tokens), after the outbox's text
        self.last: Completion | None = None

    @property
    def tokens(self) -> list[int]:
        """Every token of this branch: the shared prefix, its turns and its replies."""
        return list(self._seq.tokens)

    @property
    def closed(self) -> bool:
        return self._seq.released

    def send(self, text: str) -> Branch:
        """Add a user message (chat) or raw text (plain) to the next turn; returns self for chaining."""
        if not isinstance(text, str):
            raise TypeError(f"send() takes a str, got {type(text).__name__}")
        self._outbox.append(text)
        return self

    def send_tokens(self, tokens: Sequence[int]) -> Branch:
        """Add tokens to the next turn exactly as given, after any text sent: text already framed by the
        caller (e.g. tool results as the chat template lays them out). Returns self for chaining."""
        self._framed.extend(int(t) for t in tokens)
        return self

    def generate(self, **sampling: Any) -> Completion:
        """Prefill what was sent and generate a reply (SamplingParams fields as keywords).

        With nothing sent it generates from what the branch holds (a composed prompt, say).
        """
        return self._engine.generate_branches([self], [self._engine.sampling(**sampling)])[0]

    @property
    def adapter(self) -> str | None:
        """The name of the LoRA decoder that decodes this branch (None: the base model)."""
        return self._seq.adapter.name if self._seq.adapter is not None else None

    def fork(self, *, adapter: str | Adapter | None | _Keep = _Keep.ADAPTER) -> Branch:
        """Another branch sharing everything this one holds so far; it keeps this branch's adapter
        unless `adapter` names another one (None there: the base model)."""
        return self._engine.fork(self, adapter=self._seq.adapter if adapter is _Keep.ADAPTER else adapter)

    def close(self) -> None:
        self._engine.release(self)

    def __enter__(self) -> Branch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what Engine.generate_branches asks of a branch ------------------------------------------
    @property
    def sequence(self) -> KvSequence:
        """The scheduler's sequence behind this branch (read it; only the scheduler changes it)."""
        return self._seq

    @property
    def layout(self) -> ChatLayout | None:
        """The chat layout its turns are framed in (None: plain completion, text appended as is)."""
        return self._layout

    @property
    def replies(self) -> int:
        """Assistant turns so far; decides how the next user turn is framed."""
        return self._replies

    def turn_tokens(self) -> list[int]:
        """The tokens the text sent since the last turn adds (framed as the next user turn), then those sent
        with send_tokens; [] if none.

        NOTE: with nothing sent the branch generates from what it holds (e.g. a composed prompt that
        ends with the assistant header already). Nothing changes until `took_turn`.
        """
        if not self._outbox:
            return list(self._framed)
        text = "\n\n".join(self._outbox)
        if self._layout is None:
            new = text
        elif self._replies == 0:
            new = self._layout.first_turn(text)
        else:
            new = self._layout.next_turn(text)
        return (self._engine.tokenize(new, add_bos=False, special=self._layout is not None) if new else []) \
            + self._framed

    def took_turn(self, completion: Completion) -> None:
        """The turn of `turn_tokens` ran: the sent text is consumed and `completion` is the last reply."""
        self._outbox.clear()
        self._framed.clear()
        self._replies += 1
        self.last = completion
