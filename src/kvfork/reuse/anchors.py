"""AnchorPool: KVCOMM's online anchors: observed KV deviations of segments after each agent's prefix.

An anchor is one segment that agents really prefilled after their own prefixes: its content
summary (kvcache.cells.summary of the segment's base KV) and, per agent, its deviation: real KV
minus base KV placed at the same positions, per layer, K and V. Keys of a deviation are stored rotated back to a segment
that starts at position 0 (RoPE is linear), so they apply wherever the next segment lands. Only the
first `delta_tokens` rows are kept per position; the rest is one mean row (the deviation a prefix
causes is largest on the segment's first tokens and close to a constant bias after them).

A new segment of the same name is corrected, for an agent, by the anchors' deviations for that
agent weighted softmax(-distance / temperature); when that weighting is too uncertain (entropy
above gamma * log2(n anchors)) the caller prefills instead and adds the result as a new anchor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kvfork.kvcache.state import CacheState, SeqState
from kvfork.reuse.config import ReuseConfig

__all__ = ["Anchor", "AnchorPool", "Estimate", "PartDelta"]



@dataclass(frozen=True, eq=False)
class PartDelta:
    """One KV cache's deviation: rows for relative positions [0, len(k[0])), and a mean row per layer."""

    k: tuple[np.ndarray, ...]
    v: tuple[np.ndarray, ...]
    k_mean: tuple[np.ndarray, ...]
    v_mean: tuple[np.ndarray, ...]
    head: np.ndarray  # relative positions the rows belong to

    @classmethod
    def of(cls, part: CacheState, keep: int) -> PartDelta:
        """From a deviation state part whose positions are relative to the segment start."""
        order = np.argsort(part.positions, kind="stable")
        rows = order[part.positions[order] < keep]

        def head(ts: tuple) -> tuple[np.ndarray, ...]:
            return tuple(t.values[rows].astype(np.float16) for t in ts)

        def mean(ts: tuple) -> tuple[np.ndarray, ...]:
            return tuple(t.values.mean(axis=0).astype(np.float32) for t in ts)

        return cls(head(part.k), head(part.v), mean(part.k), mean(part.v), part.positions[rows].copy())

    def index(self, positions: np.ndarray) -> np.ndarray:
        """For cells at these relative positions: the row kept for each, or -1 (use the mean row)."""
        lookup = np.full(int(self.head.max(initial=-1)) + 1, -1, dtype=np.int64)
        lookup[self.head] = np.arange(len(self.head))
        inside = (positions >= 0) & (positions < len(lookup))
        out = np.full(len(positions), -1, dtype=np.int64)
        out[inside] = lookup[positions[inside]]
        return out

    def rows(self, index: np.ndarray, which: str, layer: int) -> np.ndarray:
        """Deviation rows for cells whose `index` came from index(): kept rows, else the mean row."""
        rows = (self.k if which == "k" else self.v)[layer]
        mean = (self.k_mean if which == "k" else self.v_mean)[layer]
        out = np.repeat(mean[None, :], len(index), axis=0)
        kept = index >= 0
        out[kept] = rows[index[kept]]
        return out


Parts = tuple[PartDelta | None, ...]  # one per KV cache part; None where the segment had no cells


@dataclass(eq=False)
class Anchor:
    """One segment an agent (or several) really prefilled: its summary and each agent's deviation."""

    summary: np.ndarray
    n_tokens: int
    created: int
    deviations: dict[str, Parts] = field(default_factory=dict)
    uses: int = 0


@dataclass(frozen=True)
class Estimate:
    """How a new segment would be corrected for one agent: anchors, weights, and whether the gate passed."""

    agent: str
    anchors: tuple[Anchor, ...]
    weights: np.ndarray
    entropy: float
    threshold: float
    accepted: bool


@dataclass(eq=False)
class AnchorPool:
    """Anchors per segment name, each with per-agent deviations (KVCOMM's anchor pool).

    NOTE: a segment that is itself an anchor but lacks this agent's deviation is refused, so the
    agents reading one segment fall back together and the anchor gets every agent's deviation:
    their gates then see the same anchors and decide alike.
    Contract: used under the engine's lock (one thread at a time).
    """

    _pools: dict[str, list[Anchor]] = field(default_factory=dict)
    _clock: int = 0

    def n_anchors(self, name: str | None = None, agent: str | None = None) -> int:
        pools = [self._pools.get(name, [])] if name is not None else list(self._pools.values())
        return sum(1 for pool in pools for a in pool if agent is None or agent in a.deviations)

    def estimate(self, name: str, agent: str, summary: np.ndarray, config: ReuseConfig) -> Estimate:
        """Weights of the anchors holding this agent's deviation, for a segment with this summary, and the gate."""
        pool = self._pools.get(name, [])
        if any(agent not in a.deviations and _same(a.summary, summary) for a in pool):
            return Estimate(agent, (), np.zeros(0), math.inf, 0.0, False)  # complete that anchor first
        anchors = tuple(a for a in pool if agent in a.deviations)
        if len(anchors) < config.min_anchors:
            return Estimate(agent, anchors, np.zeros(len(anchors)), math.inf, 0.0, False)
        norm = float(np.linalg.norm(summary)) or 1.0
        dist = np.array([np.linalg.norm(summary - a.summary) / norm for a in anchors])
        logits = -(dist - dist.min()) / config.temperature
        weights = np.exp(logits)
        weights /= weights.sum()
        nz = weights[weights > 0]
        entropy = float(-(nz * np.log2(nz)).sum())
        threshold = config.gamma * math.log2(len(anchors))
        # NOTE: one anchor has zero entropy and a zero threshold: it is used (KVCOMM's first reuse).
        return Estimate(agent, anchors, weights, entropy, threshold, entropy <= threshold + 1e-12)

    def deviation(self, estimate: Estimate, placed: SeqState) -> SeqState:
        """The weighted deviation for `placed` (a segment whose positions start at 0), as a state."""
        parts = []
        for i, part in enumerate(placed.caches):
            if part.n_cells == 0:
                parts.append(part)
                continue
            used: list[tuple[float, PartDelta]] = []
            for a, w in zip(estimate.anchors, estimate.weights, strict=True):
                deltas = a.deviations[estimate.agent]
                delta = deltas[i] if i < len(deltas) else None
                if w > 1e-4 and delta is not None:
                    used.append((w, delta))
            index = [d.index(part.positions) for _, d in used]

            def mixed(which: str, layer: int, part: CacheState = part, used: list = used, index: list = index
                      ) -> np.ndarray:
                acc = np.zeros((part.n_cells, (part.k if which == "k" else part.v)[layer].n_embd), np.float32)
                for (w, delta), idx in zip(used, index, strict=True):
                    acc += np.float32(w) * delta.rows(idx, which, layer).astype(np.float32)
                return acc

            k = tuple(t.with_values(mixed("k", j)) for j, t in enumerate(part.k))
            v = tuple(t.with_values(mixed("v", j)) for j, t in enumerate(part.v))
            parts.append(part.with_layers(k=k, v=v))
        for a, w in zip(estimate.anchors, estimate.weights, strict=True):
            if w > 1e-4:
                a.uses += 1
        return placed.with_caches(tuple(parts))

    def add(self, name: str, agent: str, summary: np.ndarray, deviation: SeqState, n_tokens: int,
            config: ReuseConfig) -> Anchor:
        """Keep an agent's deviation (positions relative to the segment start) on the segment's anchor,
        made (and the pool evicted past max_anchors) when the segment is not one yet."""
        parts = tuple(PartDelta.of(p, config.delta_tokens) if p.n_cells else None for p in deviation.caches)
        pool = self._pools.setdefault(name, [])
        anchor = next((a for a in pool if _same(a.summary, summary)), None)
        if anchor is None:
            self._clock += 1
            anchor = Anchor(summary.astype(np.float32), n_tokens, self._clock)
            if len(pool) >= config.max_anchors:
                # NOTE: KVCOMM evicts the least used among the older anchors, so new ones get a chance.
                older = sorted(pool, key=lambda a: a.created)[: (len(pool) + 1) // 2]
                pool.remove(min(older, key=lambda a: (a.uses, a.created)))
            pool.append(anchor)
        anchor.deviations[agent] = parts
        return anchor

    def clear(self) -> None:
        self._pools.clear()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """The same segment (its summary is a function of its base KV)."""
    return a.shape == b.shape and bool(np.array_equal(a, b))
