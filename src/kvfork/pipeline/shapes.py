"""Shapes: builders for common pipelines (review board, chain, debate, map-reduce) and document chunking."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kvfork.engine.sampling import SamplingParams
from kvfork.errors import InvalidParameter
from kvfork.pipeline.agent import Agent
from kvfork.pipeline.definition import Pipeline

__all__ = ["review_board", "chain", "debate", "map_reduce", "split_document", "REVIEWERS"]

REVIEWERS: dict[str, str] = {
    "timeline": "Check the incident timeline: list the key events with their times, and any gap or contradiction.",
    "root-cause": "Assess the stated root cause: is it supported by the evidence? Name what is missing.",
    "actions": "Review the corrective actions: which are concrete, owned and dated, and which are vague?",
    "numbers": "Check the figures (volumes, durations, readings) for consistency; list any mismatch.",
}
SIDES = (("people", "Argue that people caused it."), ("design", "Argue that the system design caused it."))


def review_board(
    document: str,
    *,
    reviewers: Mapping[str, str] = REVIEWERS,
    chair: str = "Merge the reviews above into one verdict: the three most important findings, then accept or revise.",
    system: str | None = "You review technical reports. Be brief and specific.",
    sampling: Mapping[str, Any] | None = None,
    chair_sampling: Mapping[str, Any] | None = None,
) -> Pipeline:
    """N reviewers read the document; a chair reads the document and every review and merges them."""
    agents = [Agent(name, text) for name, text in reviewers.items()]
    agents.append(Agent("chair", chair, inputs=("document", *reviewers), sampling=dict(chair_sampling or {})))
    return Pipeline.of(document, agents, system=system, sampling=_params(sampling), name="review-board")


def chain(
    document: str,
    *,
    writer: str = "Write a short summary of the document for a manager.",
    critic: str = "Criticize the summary above: what is wrong, missing or unclear? Give 3 points.",
    reviser: str = "Rewrite the summary so that it answers the criticism. Output only the new summary.",
    system: str | None = "You are a precise technical writer.",
    sampling: Mapping[str, Any] | None = None,
) -> Pipeline:
    """writer -> critic -> reviser; each reads the document and everything before it."""
    agents = [
        Agent("writer", writer),
        Agent("critic", critic, inputs=("document", "writer")),
        Agent("reviser", reviser, inputs=("document", "writer", "critic")),
    ]
    return Pipeline.of(document, agents, system=system, sampling=_params(sampling), name="chain")


def debate(
    document: str,
    *,
    question: str = "Was the incident mainly caused by people or by the system design?",
    sides: Sequence[tuple[str, str]] = SIDES,
    rounds: int = 3,
    judge: str = "You judge the debate above. Say which side argued better from the document and why, in 3 sentences.",
    system: str | None = "You are in a debate about the document. Be brief; cite the document.",
    sampling: Mapping[str, Any] | None = None,
) -> Pipeline:
    """Two (or more) sides argue for `rounds` turns on their own branches, each reading the others'
    previous reply; a judge reads the document and the whole debate."""
    names = [name for name, _ in sides]
    agents = [
        Agent(name, f"{question} {stance}", turns=rounds, peers=tuple(n for n in names if n != name),
              followup="Rebut the other side's latest argument in a few sentences.")
        for name, stance in sides
    ]
    agents.append(Agent("judge", f"{question} {judge}", inputs=("document", *names)))
    return Pipeline.of(document, agents, system=system, sampling=_params(sampling), name="debate")


def map_reduce(
    chunks: Sequence[str],
    *,
    mapper: str | Mapping[str, str] = "Summarize this part of the document in 2 sentences with its key facts.",
    reducer: str = "Combine the partial summaries above into one summary of the whole document.",
    system: str | None = "You summarize documents faithfully.",
    sampling: Mapping[str, Any] | None = None,
) -> Pipeline:
    """Mappers over every chunk (each chunk its own document), then a reducer over all their outputs.

    `mapper` is one instruction (agents map-1, map-2, ...) or several by name ({"facts": ...} gives
    facts-1, facts-2, ...); several mappers of one chunk share that chunk's snapshot.
    """
    if not chunks:
        raise InvalidParameter("map_reduce needs at least one chunk")
    mappers = {"map": mapper} if isinstance(mapper, str) else dict(mapper)
    documents = {f"part-{i}": text for i, text in enumerate(chunks, 1)}
    agents = [
        Agent(f"{name}-{i}", text, inputs=(f"part-{i}",))
        for i in range(1, len(chunks) + 1)
        for name, text in mappers.items()
    ]
    agents.append(Agent("reduce", reducer, inputs=tuple(a.name for a in agents)))
    return Pipeline(tuple(agents), documents, system=system, sampling=_params(sampling), name="map-reduce")


def split_document(text: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    """Split `text` at paragraph (then line, then word) boundaries into chunks of at most max_tokens.

    `count` measures a text in tokens, e.g. `lambda s: len(engine.tokenize(s))`.
    """
    if max_tokens < 1:
        raise InvalidParameter(f"max_tokens must be >= 1, got {max_tokens}")
    chunks: list[str] = []
    for sep in ("\n\n", "\n", " "):
        pieces = text.split(sep)
        if all(count(p) <= max_tokens for p in pieces):
            break
    else:
        raise InvalidParameter(f"a single word is longer than {max_tokens} tokens")
    current = ""
    for piece in pieces:
        candidate = f"{current}{sep}{piece}" if current else piece
        if current and count(candidate) > max_tokens:
            chunks.append(current)
            current = piece
        else:
            current = candidate
    if current.strip():
        chunks.append(current)
    return [c.strip() for c in chunks if c.strip()]


def _params(sampling: Mapping[str, Any] | None) -> SamplingParams:
    return SamplingParams().with_overrides(**dict(sampling or {}))
