"""PipelineReuse: a pipeline run's reuse of documents and upstream replies that are not prefixes.

Under a reuse mode other than "exact" (opt-in, approximate), an agent whose system prompt (its
role) differs from the one a document was first computed after gets the document's KV placed
instead of computing it again, and a downstream agent gets its upstream agents' replies placed
from their branches. The first computation of a document is exact and becomes its segment.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kvfork.errors import KvforkError
from kvfork.pipeline.agent import Agent
from kvfork.pipeline.definition import Pipeline
from kvfork.pipeline.turns import first_turn
from kvfork.prompt import slot, split_slots
from kvfork.reuse.composer import Part, Segment
from kvfork.reuse.config import ReuseConfig
from kvfork.reuse.report import ReuseReport

if TYPE_CHECKING:
    from kvfork.runtime import Engine
    from kvfork.runtime.branch import Branch
    from kvfork.runtime.snapshot import Snapshot

__all__ = ["PipelineReuse"]

log = logging.getLogger(__name__)


class PipelineReuse:
    """Segments of one run: documents (by name) and replies (by agent), and per-agent reports."""

    def __init__(self, engine: Engine, pipeline: Pipeline, config: ReuseConfig) -> None:
        self.engine = engine
        self.pipeline = pipeline
        self.config = config
        self.reports: dict[str, ReuseReport] = {}
        self._documents: dict[str, Segment] = {}
        self._replies: dict[str, list[Part]] = {}  # an agent's reply: its Segment (+ tokens never cached)

    @property
    def active(self) -> bool:
        return self.config.mode != "exact" and self.pipeline.chat

    def snapshot(self, doc_name: str | None, system: str | None, text: str, agent: str,
                 turn: list[Part] | None = None) -> Snapshot:
        """A snapshot of (document, system prompt) [+ an agent's first turn], composed under the mode."""
        layout = self.engine.layout(text, system)
        at = layout.prefix.find(text) if text else -1
        parts: list[Part]
        capture = None
        if at < 0:  # NOTE: no document, or a template that rewrites it: nothing of it to place
            parts = [self.engine.tokenize(layout.prefix, add_bos=True, special=True)]
        else:
            head = self.engine.tokenize(layout.prefix[:at], add_bos=True, special=True)
            body = self.engine.tokenize(text)
            tail = self.engine.tokenize(layout.prefix[at + len(text):], special=True)
            segment = self._documents.get(doc_name) if doc_name is not None else None
            if segment is not None and segment.tokens == tuple(body):
                parts = [head, segment, tail]
            else:
                parts, capture = [head, body, tail], (len(head), len(head) + len(body))
        snapshot = self.engine.compose(parts + (turn or []), agent=agent, reuse=self.config)
        if capture is not None and doc_name is not None:
            self._documents[doc_name] = self.engine.capture_segment(snapshot, *capture, f"document:{doc_name}")
        snapshot.layout = layout
        return snapshot

    def first_turn(self, agent: Agent, system: str | None) -> list[Part] | None:
        """The agent's framed first turn with its upstream replies as Segments; None unless every
        upstream reply was kept (then the runner sends the turn as text, as in exact mode)."""
        ups = agent.upstream(self.pipeline.documents)
        if not ups or any(u not in self._replies for u in ups):
            return None
        text = first_turn(self.pipeline, agent, {u: (slot(u),) for u in ups})
        turn: list[Part] = []
        for chunk, is_slot in split_slots(self.engine.layout("", system).first_turn(text)):
            if is_slot:
                turn += self._replies[chunk]
            else:
                turn.append(self.engine.tokenize(chunk, special=True))
        return turn

    def keep_reply(self, agent: Agent, branch: Branch | None) -> None:
        """Keep the KV of a one-turn agent's reply (before its branch is closed) for downstream agents.

        NOTE: the reply's tokens are placed as generated (end-of-generation tokens dropped); the
        exact path re-tokenizes the stripped reply text, which can differ in white space.
        """
        if branch is None or agent.turns != 1:
            return
        tokens, start, cached = self.engine.composer.reply(branch.sequence)
        if cached < max(1, self.config.min_segment):
            self._replies[agent.name] = [tokens]
            return
        try:
            seg = self.engine.capture_segment(branch, start, start + cached, f"reply:{agent.name}")
        except KvforkError as exc:  # NOTE: downstream agents then compute the reply's tokens
            log.warning("could not keep %s's reply for reuse: %s", agent.name, exc)
            self._replies[agent.name] = [tokens]
            return
        self._replies[agent.name] = [seg, tokens[cached:]] if cached < len(tokens) else [seg]
