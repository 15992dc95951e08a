"""Graph: the agents' dependency DAG, checked before anything runs, cut into topological levels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvfork.errors import PipelineError
from kvfork.pipeline.agent import Agent

__all__ = ["Graph"]


@dataclass(frozen=True)
class Graph:
    """The validated dependency structure of a pipeline.

    `levels[i]` holds the names of the agents that can run once every agent of earlier levels is
    done, in definition order; peers (lockstep multi-turn agents) always share a level.
    """

    levels: tuple[tuple[str, ...], ...]
    inputs: Mapping[str, tuple[str, ...]]  # agent -> upstream agents
    downstream: Mapping[str, tuple[str, ...]]  # agent -> agents that read it

    @classmethod
    def build(cls, agents: Sequence[Agent], documents: Mapping[str, str]) -> Graph:
        """Check names, inputs, peers and cycles; raises PipelineError with what to fix."""
        by_name: dict[str, Agent] = {}
        for agent in agents:
            if agent.name in by_name:
                raise PipelineError(f"duplicate agent name {agent.name!r}: agent names must be unique")
            if agent.name in documents:
                raise PipelineError(f"agent {agent.name!r} has the name of a document; rename one of them")
            by_name[agent.name] = agent
        if not by_name:
            raise PipelineError("a pipeline needs at least one agent")
        for agent in agents:
            _check_inputs(agent, by_name, documents)
        group = _peer_groups(agents, by_name)
        inputs = {a.name: a.upstream(documents) for a in agents}
        levels = _levels(agents, inputs, group)
        downstream = {a.name: tuple(b.name for b in agents if a.name in inputs[b.name]) for a in agents}
        return cls(levels=levels, inputs=inputs, downstream=downstream)


def _check_inputs(agent: Agent, by_name: Mapping[str, Agent], documents: Mapping[str, str]) -> None:
    known = f"documents {sorted(documents)} and agents {sorted(by_name)}"
    for name in agent.inputs:
        if name == agent.name:
            raise PipelineError(f"agent {agent.name!r} lists itself as an input")
        if name not in by_name and name not in documents:
            raise PipelineError(
                f"agent {agent.name!r} reads {name!r}, which is neither a document nor an agent; known: {known}"
            )
    if len(set(agent.inputs)) != len(agent.inputs):
        raise PipelineError(f"agent {agent.name!r} lists an input twice: {list(agent.inputs)}")
    docs = [i for i in agent.inputs if i in documents]
    if len(docs) > 1:
        raise PipelineError(f"agent {agent.name!r} reads {len(docs)} documents {docs}; an agent reads one at most")
    for peer in agent.peers:
        if peer == agent.name or peer not in by_name:
            raise PipelineError(f"agent {agent.name!r}: peer {peer!r} is not another agent of this pipeline")
        if peer in agent.inputs:
            raise PipelineError(f"agent {agent.name!r} lists {peer!r} as input (runs after it) and peer (runs with it)")
        if by_name[peer].turns != agent.turns:
            raise PipelineError(
                f"peers {agent.name!r} ({agent.turns} turns) and {peer!r} ({by_name[peer].turns}) need equal turns"
            )


def _peer_groups(agents: Sequence[Agent], by_name: Mapping[str, Agent]) -> dict[str, str]:
    """Union of the peer relation: agent name -> the name that represents its group."""
    root = {a.name: a.name for a in agents}

    def find(name: str) -> str:
        while root[name] != name:
            name = root[name]
        return name

    for agent in agents:
        for peer in agent.peers:
            root[find(peer)] = find(agent.name)
    return {a.name: find(a.name) for a in agents}


def _levels(
    agents: Sequence[Agent], inputs: Mapping[str, tuple[str, ...]], group: Mapping[str, str]
) -> tuple[tuple[str, ...], ...]:
    # NOTE: levels are computed over peer groups, so lockstep peers land together; an agent that
    # reads a member of its own group would have to run both before and with it, which is a cycle.
    deps: dict[str, set[str]] = {g: set() for g in group.values()}
    for name, ups in inputs.items():
        deps[group[name]].update(group[u] for u in ups)
    level: dict[str, int] = {}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(g: str, path: list[str]) -> int:
        if state.get(g) == 2:
            return level[g]
        if state.get(g) == 1 or g in deps[g]:
            cycle = path[path.index(g):] + [g] if g in path else [g, g]
            raise PipelineError(
                f"the agents form a cycle: {' -> '.join(cycle)}; a pipeline must be a DAG (use peers for debates)"
            )
        state[g] = 1
        level[g] = 1 + max((visit(d, path + [g]) for d in sorted(deps[g])), default=-1)
        state[g] = 2
        return level[g]

    for g in deps:
        visit(g, [])
    out: list[list[str]] = [[] for _ in range(max(level.values()) + 1)]
    for agent in agents:
        out[level[group[agent.name]]].append(agent.name)
    return tuple(tuple(names) for names in out)
