"""Layout planner: how much of the agents' prompts is one shared token prefix, and how to get more."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from kvfork.pipeline.definition import Pipeline
from kvfork.pipeline.turns import first_turn, placeholder_outputs
from kvfork.runtime import Engine
from kvfork.scheduler.prefix_cache import common_prefix as pairwise_prefix

__all__ = ["Plan", "SnapshotPlan", "plan", "common_prefix", "shareable_fraction"]


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix common to every prompt (0 for none)."""
    if not prompts:
        return 0
    return min((pairwise_prefix(prompts[0], p) for p in prompts[1:]), default=len(prompts[0]))


def shareable_fraction(prompts: Sequence[Sequence[int]]) -> float:
    """The fraction of all prompt tokens that lie in the prefix common to every prompt."""
    total = sum(len(p) for p in prompts)
    return len(prompts) * common_prefix(prompts) / total if total else 0.0


@dataclass(frozen=True)
class SnapshotPlan:
    """One snapshot the runner will prefill: its document, system prompt, size and readers."""

    document: str | None
    system: str | None
    n_tokens: int
    agents: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """The planner's figures for one pipeline under one layout (first turns; upstream outputs as stand-ins)."""

    layout: str
    prompt_tokens: dict[str, int]  # agent -> first-turn prompt length
    common_prefix: int  # tokens common to every agent's prompt
    shareable_fraction: float
    snapshots: tuple[SnapshotPlan, ...]
    role_ahead: tuple[str, ...]  # agents whose own system prompt sits ahead of their document
    alternative: Plan | None = None  # the "shared-first" opt-in, offered when role_ahead is not empty

    @property
    def unshared_tokens(self) -> int:
        """Prefill tokens when every agent prefills its whole prompt itself."""
        return sum(self.prompt_tokens.values())

    @property
    def prefill_tokens(self) -> int:
        """Prefill tokens with sharing: each snapshot once, then each agent's own part."""
        own = {a: s.n_tokens for s in self.snapshots for a in s.agents}
        return sum(s.n_tokens for s in self.snapshots) + sum(n - own[a] for a, n in self.prompt_tokens.items())

    def report(self) -> str:
        """The human-readable report `kvfork plan` prints."""
        n = len(self.prompt_tokens)
        lines = [
            f"layout {self.layout!r}: {n} agents, first-turn prompts of {min(self.prompt_tokens.values()):,}"
            f"-{max(self.prompt_tokens.values()):,} tokens",
            f"longest common token prefix: {self.common_prefix:,} tokens;"
            f" shareable fraction {self.shareable_fraction:.0%} of {self.unshared_tokens:,} prompt tokens",
            f"prefill with sharing: {self.prefill_tokens:,} tokens; without: {self.unshared_tokens:,}"
            f" (saves {self.unshared_tokens - self.prefill_tokens:,})",
            "snapshots:",
        ]
        for s in self.snapshots:
            who = "own prefill" if len(s.agents) == 1 else f"shared by {len(s.agents)}"
            sysline = "no system prompt" if s.system is None else f"system {_short(s.system)}"
            doc = s.document or "(no document)"
            lines.append(f"  {doc} + {sysline}: {s.n_tokens:,} tokens, {who}: {', '.join(s.agents)}")
        if self.role_ahead:
            lines.append(
                f"agents with their own role in the system message, ahead of the document: {', '.join(self.role_ahead)}"
                " -- this breaks prefix sharing, so each of them gets its own prefill"
            )
            alt = self.alternative
            if alt is not None:
                lines.append(
                    f"opt-in layout 'shared-first' (shared system prompt and document first, role and instruction"
                    f" after): common prefix {alt.common_prefix:,} tokens ({alt.shareable_fraction:.0%} shareable),"
                    f" prefill {alt.prefill_tokens:,} tokens instead of {self.prefill_tokens:,}."
                    " It changes the prompts: set layout = \"shared-first\" in [pipeline] or pass --layout shared-first"
                )
        return "\n".join(lines)


def plan(engine: Engine, pipeline: Pipeline) -> Plan:
    """Tokenize every agent's first-turn prompt exactly as the runner will, and measure the sharing."""
    outputs = placeholder_outputs(pipeline)
    prompts: dict[str, list[int]] = {}
    groups: dict[tuple[str | None, str | None, str | None], list[str]] = {}
    sizes: dict[tuple[str | None, str | None, str | None], int] = {}
    for agent in pipeline.agents:
        doc_name = agent.document(pipeline.documents)
        system = pipeline.system_of(agent)
        document = pipeline.documents[doc_name] if doc_name is not None else ""
        turn = first_turn(pipeline, agent, outputs)
        # NOTE: an agent with tools has them in its prompt (the template lays them out): its own snapshot.
        tools = agent.tool_definitions if pipeline.chat else None
        if tools:
            layout = engine.layout(document, system, tools=tools)
            prompts[agent.name] = engine.tokenize(layout.prefix, add_bos=True, special=True) + engine.tokenize(
                layout.first_turn(turn), special=True)
        else:
            prompts[agent.name] = engine.prompt_tokens(document, turn, system=system, chat=pipeline.chat)
        key = (doc_name, system, json.dumps(tools) if tools else None)
        groups.setdefault(key, []).append(agent.name)
        if key not in sizes:
            sizes[key] = _prefix_length(engine, document, system, pipeline.chat, tools)
    role_ahead = tuple(
        a.name for a in pipeline.agents
        if pipeline.layout == "exact" and a.role is not None and a.role != pipeline.system
        and a.document(pipeline.documents) is not None
    )
    token_lists = list(prompts.values())
    return Plan(
        layout=pipeline.layout,
        prompt_tokens={name: len(p) for name, p in prompts.items()},
        common_prefix=common_prefix(token_lists),
        shareable_fraction=shareable_fraction(token_lists),
        snapshots=tuple(SnapshotPlan(k[0], k[1], sizes[k], tuple(v)) for k, v in groups.items()),
        role_ahead=role_ahead,
        alternative=plan(engine, pipeline.with_layout("shared-first")) if role_ahead else None,
    )


def _prefix_length(engine: Engine, document: str, system: str | None, chat: bool, tools: list[dict] | None) -> int:
    # NOTE: the same tokenization Engine.prefill uses for the snapshot.
    if not chat:
        return len(engine.tokenize(document, add_bos=True))
    return len(engine.tokenize(engine.layout(document, system, tools=tools).prefix, add_bos=True, special=True))


def _short(text: str, n: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 1] + "\u2026")
