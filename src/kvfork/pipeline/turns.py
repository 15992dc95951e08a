"""Turn texts: what each agent is sent in its own part of the prompt (role, upstream outputs, instruction)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kvfork.pipeline.agent import Agent
from kvfork.pipeline.definition import Pipeline

__all__ = ["first_turn", "next_turn", "placeholder_outputs"]


def first_turn(pipeline: Pipeline, agent: Agent, outputs: Mapping[str, Sequence[str]]) -> str:
    """The agent's first message: [its role (shared-first layout)] + upstream outputs + instruction.

    `outputs` maps every upstream agent to its replies (one per turn); all are shown, in order.
    """
    parts: list[str] = []
    if agent.role is not None and pipeline.layout == "shared-first":
        # NOTE: the role moves from the system message into the agent's own turn, after the shared
        # document: that keeps the snapshot an exact token prefix of this agent's prompt.
        parts.append(agent.role.strip())
    for name in agent.upstream(pipeline.documents):
        parts.append(_render_outputs(name, outputs[name]))
    parts.append(agent.instruction.strip())
    return _join(pipeline, parts)


def next_turn(pipeline: Pipeline, agent: Agent, replies: Mapping[str, str]) -> str:
    """A later turn: the peers' latest replies, then the agent's follow-up instruction."""
    parts = [f"{name} said:\n{replies[name].strip()}" for name in agent.peers if name in replies]
    parts.append(agent.followup.strip())
    return _join(pipeline, parts)


def placeholder_outputs(pipeline: Pipeline) -> dict[str, tuple[str, ...]]:
    """Stand-ins for agent outputs, for planning before anything has run."""
    return {a.name: tuple(f"<output of {a.name}>" for _ in range(a.turns)) for a in pipeline.agents}


def _render_outputs(name: str, replies: Sequence[str]) -> str:
    if len(replies) == 1:
        return f"{name} wrote:\n{replies[0].strip()}"
    return "\n\n".join(f"{name} (turn {i}) wrote:\n{text.strip()}" for i, text in enumerate(replies, 1))


def _join(pipeline: Pipeline, parts: list[str]) -> str:
    text = "\n\n".join(p for p in parts if p)
    # NOTE: in plain (non-chat) mode turns are appended to the document as is; keep them apart.
    return text if pipeline.chat else "\n\n" + text
