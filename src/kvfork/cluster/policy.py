"""PrefixPolicy: which replica serves a request, from the prefixes replicas hold and the work they have.

Pure logic (no Ray): the Ray Serve request router (cluster/router.py) feeds it the replicas' reported
route keys and asks it for a decision; tests drive it with fake replicas and a fake clock.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvfork.cluster.routekeys import ROUTE_BLOCK
from kvfork.errors import InvalidParameter

__all__ = ["REASONS", "Decision", "PrefixPolicy", "Route", "RouterConfig"]

# NOTE: every decision has exactly one reason, the label of the ingress's kvfork_route_decisions counter:
# session   - the request named a session (or pipeline) already placed on a live replica;
# prefix    - the replica reported (routing stats) holding the longest prefix of the prompt;
# coalesced - the longest prefix is one this router sent there moments ago (prefilling there now, or not yet
#             in the replica's stats): requests that share a document and arrive together meet on one replica;
# spilled   - the replica holding the prefix has spill_tokens more work queued than the least loaded one;
# restored  - (shared tier) the prefix is in the tier every replica reads: a replica that does not hold it
#             restores it, chosen because it finishes as soon and has had less work lately;
# fallback  - no replica holds a useful prefix: the least loaded one.
REASONS = ("session", "prefix", "coalesced", "spilled", "restored", "fallback")


@dataclass(frozen=True)
class RouterConfig:
    """The router's knobs (RequestRouterConfig.request_router_kwargs carries them to every router)."""

    block_size: int = ROUTE_BLOCK  # tokens per route key: the ingress and replicas must agree
    # NOTE: prefix affinity without a load term collapses under skew (one hot document, one busy replica).
    # Work is counted in tokens a replica still has to compute (prompt not matched + max_tokens); past this
    # margin over the least loaded replica, a prefix hit is spilled to it. A spilled request restores the
    # prefix from the shared snapshot tier (~2% of a prefill) or, without one, prefills it again.
    spill_tokens: int = 16384
    min_match_blocks: int = 2  # shorter matches (64 tokens) are not worth a replica's extra queue
    recent_s: float = 60.0  # how long the router's own placements count before a replica's stats confirm them
    session_ttl_s: float = 1800.0  # a session idle this long may be placed elsewhere
    inflight_ttl_s: float = 900.0  # a request never reported complete stops counting as work after this
    max_recent_keys: int = 1 << 16  # per replica
    # NOTE: with a tier every replica reads (`--snapshot-url`), a prefix some request has finished with is
    # written there, and any replica restores it for restore_ratio of its prefill (measured 1.6%, docs/
    # benchmarks.md). Affinity then matters little and the router places each request where it would finish
    # first (queued work + its own cost there); among replicas within balance_tokens of the best, the one
    # with the least work routed to it lately (a sum decaying with balance_halflife_s) wins, so a hot
    # document spreads over replicas instead of keeping one busy. Without the tier the spill rule applies.
    # A server writes only prompts it computed 512+ tokens of (server/dispatch.py): a shorter one taken for
    # published costs at most that much prefill where a restore was expected.
    shared_tier: bool = False
    restore_ratio: float = 0.02
    balance_tokens: int = 256
    balance_halflife_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("block_size", "min_match_blocks", "max_recent_keys"):
            if getattr(self, name) < 1:
                raise InvalidParameter(f"router {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.restore_ratio <= 1:
            raise InvalidParameter(f"router restore_ratio must be in [0, 1], got {self.restore_ratio}")
        if self.balance_halflife_s <= 0:
            raise InvalidParameter(f"router balance_halflife_s must be > 0, got {self.balance_halflife_s}")
        for name in ("spill_tokens", "recent_s", "session_ttl_s", "inflight_ttl_s", "balance_tokens"):
            if getattr(self, name) < 0:
                raise InvalidParameter(f"router {name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Route:
    """What the router knows of one request: its prompt's route keys, its size, and its session."""

    keys: tuple[str, ...]
    n_tokens: int
    max_tokens: int
    session: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "n_tokens": self.n_tokens, "max_tokens": self.max_tokens,
                "session": self.session}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Route:
        return cls(keys=tuple(data.get("keys") or ()), n_tokens=int(data.get("n_tokens", 0)),
                   max_tokens=int(data.get("max_tokens", 0)), session=data.get("session"))


class Decision(NamedTuple):
    replica: str
    reason: str  # one of REASONS
    matched_tokens: int  # prompt tokens the chosen replica is expected to hold (0 for fallback and spills)


class _Placed(NamedTuple):
    """A request the router placed and has not heard complete."""

    replica: str
    cost: float  # tokens of work it adds there
    expiry: float
    decision: Decision
    keys: tuple[str, ...]


class PrefixPolicy:
    """Longest prefix first, within a load margin; sessions stick; the router's own recent placements count.

    Contract: not thread-safe (one router, one event loop). `now` is a monotonic clock in seconds.
    Replicas are opaque ids; a replica not in the candidate list of a call is never chosen, and `forget`
    drops everything known of one (it died or was removed).
    """

    def __init__(self, config: RouterConfig | None = None, *, rng: random.Random | None = None) -> None:
        self.config = config or RouterConfig()
        self._rng = rng or random.Random()
        self._reported: dict[str, frozenset[str]] = {}
        self._reported_from: dict[str, int] = {}  # id() of the stats list each set was built from
        self._recent: dict[str, OrderedDict[str, float]] = {}  # key -> expiry
        self._work: dict[str, float] = {}
        self._inflight: dict[str, _Placed] = {}
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()  # session -> (replica, expiry)
        self._published: OrderedDict[str, None] = OrderedDict()  # keys of finished prompts: in the shared tier
        self._lately: dict[str, tuple[float, float]] = {}  # replica -> (decaying sum of work routed, as of when)

    # -- what replicas hold ------------------------------------------------------------------------
    def report(self, replica: str, keys: Iterable[str] | None) -> None:
        """A replica's routing stats: the route keys of every prefix it holds now (replaces the last report)."""
        if keys is None:
            return
        if self._reported_from.get(replica) == id(keys) and replica in self._reported:
            return  # NOTE: Serve hands the same stats object until the next poll: no rebuild per request
        self._reported[replica] = frozenset(keys)
        self._reported_from[replica] = id(keys)

    def forget(self, replica: str) -> None:
        """The replica is gone: no traffic, no prefixes, no sessions, no work."""
        self._reported.pop(replica, None)
        self._reported_from.pop(replica, None)
        self._recent.pop(replica, None)
        self._work.pop(replica, None)
        self._lately.pop(replica, None)  # NOTE: the shared tier keeps what it published: _published stays
        for rid in [r for r, v in self._inflight.items() if v.replica == replica]:
            del self._inflight[rid]
        for s in [s for s, (r, _) in self._sessions.items() if r == replica]:
            del self._sessions[s]

    def keep_only(self, replicas: Iterable[str]) -> None:
        live = set(replicas)
        known = (set(self._reported) | set(self._recent) | set(self._work) | set(self._lately)
                 | {r for r, _ in self._sessions.values()})
        for replica in known - live:
            self.forget(replica)

    def work(self, replica: str) -> float:
        """Tokens this router sent to `replica` that are not finished yet (its load as this router sees it)."""
        return self._work.get(replica, 0.0)

    # -- decisions ----------------------------------------------------------------------------------
    def choose(self, request_id: str, route: Route, replicas: list[str], now: float) -> Decision:
        """Place one request among `replicas` (non-empty) and count it as their work until `completed`."""
        if not replicas:
            raise ValueError("no replica to route to")
        self._expire(now)
        previous = self._inflight.get(request_id)
        if previous is not None:
            # NOTE: Serve asks again when every replica was full (it backs off and retries): same answer while
            # that replica lives (its recent keys now include this request's own), else decide afresh.
            if previous.replica in replicas:
                return previous.decision
            self.completed(request_id, finished=False)
        decision, cost = self._decide(route, replicas, now)
        self._inflight[request_id] = _Placed(decision.replica, cost, now + self.config.inflight_ttl_s, decision,
                                             route.keys)
        self._add_work(decision.replica, cost)
        self._add_lately(decision.replica, cost, now)
        recent = self._recent.setdefault(decision.replica, OrderedDict())
        expiry = now + self.config.recent_s
        for key in route.keys:
            recent[key] = expiry
            recent.move_to_end(key)
        while len(recent) > self.config.max_recent_keys:
            recent.popitem(last=False)
        if route.session is not None:
            self._sessions[route.session] = (decision.replica, now + self.config.session_ttl_s)
            self._sessions.move_to_end(route.session)
        return decision

    def completed(self, request_id: str, *, finished: bool = True) -> None:
        """The request is done (`finished`: it ran to the end, so with a shared tier its prompt is there)."""
        item = self._inflight.pop(request_id, None)
        if item is None:
            return
        self._add_work(item.replica, -item.cost)
        if finished and self.config.shared_tier:
            for key in item.keys:
                self._published[key] = None
                self._published.move_to_end(key)
            while len(self._published) > self.config.max_recent_keys:
                self._published.popitem(last=False)

    def lately(self, replica: str, now: float) -> float:
        """Tokens of work routed to `replica`, each weighing half as much every balance_halflife_s."""
        total, when = self._lately.get(replica, (0.0, now))
        return total * math.exp2(-(now - when) / self.config.balance_halflife_s)

    def matched_blocks(self, replica: str, keys: tuple[str, ...], *, reported_only: bool = False) -> int:
        """How many leading route keys `replica` holds (reported, plus the router's recent placements)."""
        reported = self._reported.get(replica, frozenset())
        recent: Mapping[str, float] = {} if reported_only else self._recent.get(replica, {})
        return _leading(keys, reported, recent)

    def _decide(self, route: Route, replicas: list[str], now: float) -> tuple[Decision, float]:
        """The decision and its cost: tokens the chosen replica computes (or restores, weighted) for it."""
        cfg = self.config
        if route.session is not None:
            placed = self._sessions.get(route.session)
            if placed is not None and placed[0] in replicas:
                n = self.matched_blocks(placed[0], route.keys)
                return self._costed(Decision(placed[0], "session", min(route.n_tokens, n * cfg.block_size)), route)
        if cfg.shared_tier:
            return self._decide_with_tier(route, replicas, now)
        return self._costed(self._decide_by_affinity(route, replicas), route)

    def _costed(self, decision: Decision, route: Route) -> tuple[Decision, float]:
        return decision, float(max(0, route.n_tokens - decision.matched_tokens) + route.max_tokens)

    def _decide_with_tier(self, route: Route, replicas: list[str], now: float) -> tuple[Decision, float]:
        cfg = self.config
        published = _leading(route.keys, self._published)
        if published < cfg.min_match_blocks:
            published = 0
        holders = [(self.matched_blocks(r, route.keys), r) for r in replicas]
        if max(n for n, _ in holders) > max(published, cfg.min_match_blocks - 1):
            # NOTE: a replica holds more than the tier (it is prefilling it now, or wrote it before this
            # router knew): any other would compute that part again, so affinity and the spill margin decide
            return self._costed(self._decide_by_affinity(route, replicas), route)
        options = []  # (finish, replica, held blocks, cost)
        for held, replica in holders:
            held = held if held >= cfg.min_match_blocks else 0
            have = max(held, published)
            cost = (max(0, route.n_tokens - have * cfg.block_size) + route.max_tokens
                    + (have - held) * cfg.block_size * cfg.restore_ratio)
            options.append((self.work(replica) + cost, replica, held, cost))
        soonest = min(o[0] for o in options)
        near = [o for o in options if o[0] <= soonest + cfg.balance_tokens]
        lately = {o[1]: self.lately(o[1], now) for o in near}
        low = min(lately.values())
        _, replica, held, cost = self._rng.choice([o for o in near if lately[o[1]] <= low + 1e-6])
        best_held = max(o[2] for o in options)
        if held > 0 and held == best_held:
            reported = self.matched_blocks(replica, route.keys, reported_only=True)
            reason = "prefix" if reported >= held else "coalesced"
        elif published > held:
            reason = "restored"
        else:
            reason = "fallback"
        return Decision(replica, reason, min(route.n_tokens, max(held, published) * cfg.block_size)), cost

    def _decide_by_affinity(self, route: Route, replicas: list[str]) -> Decision:
        cfg = self.config
        least = self._least_loaded(replicas)
        best, best_n = None, 0
        for replica in replicas:
            n = self.matched_blocks(replica, route.keys)
            if n > best_n or (n == best_n and best is not None and self.work(replica) < self.work(best)):
                best, best_n = replica, n
        if best is None or best_n < cfg.min_match_blocks:
            return Decision(least, "fallback", 0)
        if self.work(best) - self.work(least) > cfg.spill_tokens:
            return Decision(least, "spilled", 0)
        reported = self.matched_blocks(best, route.keys, reported_only=True)
        reason = "prefix" if reported >= best_n else "coalesced"
        return Decision(best, reason, min(route.n_tokens, best_n * cfg.block_size))

    def _least_loaded(self, replicas: list[str]) -> str:
        low = min(self.work(r) for r in replicas)
        return self._rng.choice([r for r in replicas if self.work(r) == low])

    def _add_lately(self, replica: str, tokens: float, now: float) -> None:
        self._lately[replica] = (self.lately(replica, now) + tokens, now)

    def _add_work(self, replica: str, tokens: float) -> None:
        value = self._work.get(replica, 0.0) + tokens
        self._work[replica] = value if value > 1e-9 else 0.0

    def _expire(self, now: float) -> None:
        for rid in [r for r, v in self._inflight.items() if v.expiry < now]:
            self.completed(rid, finished=False)
        while self._sessions:
            session, (_, expiry) = next(iter(self._sessions.items()))
            if expiry >= now:
                break
            del self._sessions[session]
        for recent in self._recent.values():
            while recent:
                key, expiry = next(iter(recent.items()))
                if expiry >= now:
                    break
                del recent[key]


def _leading(keys: tuple[str, ...], *held: Container[str]) -> int:
    """How many of `keys`, from the first, are in any of `held`."""
    n = 0
    for key in keys:
        if not any(key in h for h in held):
            break
        n += 1
    return n
