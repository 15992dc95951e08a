"""Warm starts: an engine's prefill restores the longest stored prefix, and stores what it prefilled.

The engine's side of a SnapshotStore: the store holds blobs and finds prefixes; these functions put
blobs into the engine's context and take them out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

from kvfork.errors import ContextOverflow, KvforkError, SnapshotMismatch
from kvfork.kvcache.cells import covers, select
from kvfork.kvcache.codec import decode, encode
from kvfork.prompt import ChatLayout
from kvfork.scheduler.kv_sequence import KvSequence
from kvfork.scheduler.prefix_cache import MIN_SHARED, can_trim
from kvfork.store.host import HostSnapshot
from kvfork.store.layout import StateLayout
from kvfork.store.store import SnapshotStore

if TYPE_CHECKING:
    from kvfork.runtime.engine import Engine
    from kvfork.runtime.snapshot import Snapshot

__all__ = ["StoreTier", "adopt", "capture", "place_after", "remember", "restore_prefix"]

log = logging.getLogger(__name__)


def capture(snapshot: Snapshot) -> HostSnapshot:
    """Copy a live snapshot's cells out of its engine's context (the snapshot stays live)."""
    return _capture(snapshot.engine, snapshot.sequence, snapshot.layout, snapshot.prefill_s)


def _capture(engine: Engine, seq: KvSequence, chat: ChatLayout | None, prefill_s: float) -> HostSnapshot:
    with engine.lock:
        if seq.released or seq.seq_id is None:
            raise SnapshotMismatch("cannot copy out a snapshot that was closed")
        tokens = tuple(seq.tokens[: seq.n_in_kv])
        state = engine.ctx.state_seq_get(seq.seq_id)
    return HostSnapshot(tokens, state, engine.state_layout, chat, time.time(), prefill_s)


def adopt(engine: Engine, host: HostSnapshot, keep: int | None = None) -> KvSequence:
    """A new KvSequence of `engine` holding `host`'s cells (or their first `keep` tokens).

    Raises SnapshotMismatch if the engine's model or KV layout differs, or if `keep` cuts into a
    sliding window's past; ContextOverflow if the context has no room.
    """
    host.layout.check(engine.state_layout)
    if keep is not None and not 0 < keep <= host.n_tokens:
        raise SnapshotMismatch(f"keep={keep} is outside 1..{host.n_tokens}")
    if keep is not None and not can_trim(host.layout.n_swa, host.n_tokens, keep):
        raise SnapshotMismatch(
            f"cannot cut a {host.n_tokens:,}-token state back to {keep:,} tokens: the model's sliding"
            f" window ({host.layout.n_swa} tokens) no longer holds the positions needed; prefill instead"
        )
    with engine.lock:
        seq = engine.scheduler.adopt(list(host.tokens), host.state, keep)
        n_swa = host.layout.n_swa
        cut = keep is not None and keep < host.n_tokens
        if cut and n_swa > 0 and engine.ctx.seq_pos_min(seq.seq_id) > max(0, keep - n_swa):  # type: ignore[arg-type,operator]
            # NOTE: belt and braces for can_trim: the context itself says the window's past is gone.
            engine.scheduler.release(seq)
            raise SnapshotMismatch(f"the restored state lacks the sliding-window positions before {keep}")
    return seq


def restore_prefix(store: SnapshotStore, engine: Engine, tokens: list[int]) -> KvSequence | None:
    """A KvSequence for `tokens` holding the longest usable stored prefix; its tail is left pending.

    Falls back to the next shorter match when one cannot be loaded or restored, and to None (a full
    prefill) when none can: a store problem never fails the prefill.
    """
    for key, snap, keep in _stored(store, engine.state_layout, tokens):
        t0 = time.perf_counter()
        try:
            seq = adopt(engine, snap, keep if keep < snap.n_tokens else None)
        except ContextOverflow as exc:
            log.info("no room to restore a stored prefix (%s); prefilling instead", exc)
            break
        except KvforkError as exc:
            log.warning("could not restore snapshot %s: %s", key, exc)
            continue
        engine.scheduler.extend(seq, tokens[keep:])
        _count_saved(store, snap, keep, time.perf_counter() - t0)
        return seq
    return None


def _stored(store: SnapshotStore, layout: StateLayout, tokens: list[int],
            least: int = 0) -> Iterator[tuple[str, HostSnapshot, int]]:
    """The store's prefixes of `tokens` that load, longest first, down to `least` tokens: (key, snapshot,
    tokens it shares). NOTE: the file's own tokens decide, not its name."""
    for match in store.matches(layout, tokens):
        if match.n_shared < least:
            return  # NOTE: the rest are shorter still (and not worth loading)
        snap = store.get(match.key, layout)
        if snap is None:
            continue
        if list(snap.tokens[: match.n_shared]) != tokens[: match.n_shared]:
            log.warning("snapshot %s does not hold the tokens its index promised; skipped", match.key)
            continue
        yield match.key, snap, match.n_shared


def _count_saved(store: SnapshotStore, snap: HostSnapshot, n: int, seconds: float) -> None:
    """Count `n` of `snap`'s tokens brought back in `seconds` instead of prefilled."""
    per_token = snap.prefill_s / snap.n_tokens if snap.n_tokens else 0.0
    store.count(tokens_saved=n, restore_s=seconds, seconds_saved=per_token * n - seconds)


def remember(store: SnapshotStore, snapshot: Snapshot) -> None:
    """Put `snapshot` in the store unless its exact tokens are stored already (then mark it used).

    Never raises on a context or I/O problem: the store is a cache.
    """
    _put(store, snapshot.engine, snapshot.sequence, snapshot.layout, snapshot.prefill_s)


def _put(store: SnapshotStore, engine: Engine, seq: KvSequence, chat: ChatLayout | None, seconds: float,
         *, unless_mostly_stored: bool = False) -> None:
    """Copy `seq`'s cells into the store; `seconds`: what computing its uncached part took.

    unless_mostly_stored: skip it where the store holds all but MIN_SHARED or an eighth of its tokens already
    (see StoreTier.demote).
    """
    layout = engine.state_layout
    tokens = seq.tokens[: seq.n_in_kv]
    if store.touch(store.key_of(layout, tokens)):
        return
    if unless_mostly_stored:
        stored = store.lookup(layout, tokens)
        if stored is not None and len(tokens) - stored.n_shared < max(MIN_SHARED, len(tokens) // 8):
            return
    # NOTE: prefill_s of an entry estimates a from-scratch prefill of all its tokens; when part of it
    # was forked or restored, scale the measured time of the computed part.
    computed = seq.n_prompt_computed
    prefill_s = seconds * len(tokens) / computed if 0 < computed < len(tokens) else seconds
    try:
        store.put(_capture(engine, seq, chat, prefill_s))
    except KvforkError as exc:
        log.warning("could not copy a prefix out of the context into the store: %s", exc)


class StoreTier:
    """A SnapshotStore as the lower tier of an engine's prefix cache (see scheduler.prefix_cache.LowerTier).

    Prefixes the cache evicts are copied to the store (host RAM, then disk under its budgets), and a
    prompt the store covers better than the context is restored from it instead of prefilled. So a
    server restarted on the same store finds every prefix it had demoted (`demote_all` at shutdown).
    """

    def __init__(self, engine: Engine, store: SnapshotStore) -> None:
        self.engine = engine
        self.store = store

    def demote(self, seq: KvSequence) -> None:
        # NOTE: not where the store holds all but a little of it already (a document, with a short question
        # and answer after it): each blob costs the budget, and a capture, all of its cells. Where its own
        # part is larger (a session's note after a system prompt every session shares), it is placed back
        # after the live part (place_after); a rule of "half stored already" lost those: a 32-session
        # closed loop reused 80% of prompt tokens with it, against 86% with idle prefixes left live.
        _put(self.store, self.engine, seq, None, (seq.t_done or seq.t_submit) - seq.t_submit,
             unless_mostly_stored=True)

    def longest(self, tokens: Seq[int]) -> int:
        best = self.store.lookup(self.engine.state_layout, list(tokens))
        if best is None:
            self.store.count(misses=1)
            return 0
        return best.n_shared

    def restore(self, tokens: Seq[int]) -> KvSequence | None:
        return restore_prefix(self.store, self.engine, list(tokens))

    def place_after(self, seq: KvSequence, tokens: Seq[int]) -> int:
        return place_after(self.store, self.engine, seq, list(tokens))


def place_after(store: SnapshotStore, engine: Engine, seq: KvSequence, tokens: list[int]) -> int:
    """Place the longest stored prefix of `tokens`' cells after `seq`'s first len(seq.tokens) (a fork of
    a live prefix: they are `tokens`' first ones); how many tokens were placed (0: none, seq as it was).

    Only the stored cells past the fork are copied in (Scheduler.place, through a scratch id): a
    session's own part comes back without a second copy of the system prompt every session forks.
    Never raises for a store problem or a lack of room: the caller computes those tokens instead.
    """
    n0 = len(seq.tokens)
    layout = engine.state_layout
    for key, snap, k in _stored(store, layout, tokens, least=n0 + MIN_SHARED):
        t0 = time.perf_counter()
        try:
            cells = select(decode(snap.state), n0, k)
            if not covers(cells, n0, k, layout.n_swa or None):
                continue  # NOTE: a sliding window that no longer holds what attention past k needs
            with engine.lock:
                engine.scheduler.place(seq, tokens[n0:k], encode(cells))
        except ContextOverflow as exc:
            log.info("no room to place a stored part (%s); prefilling it instead", exc)
            return 0
        except KvforkError as exc:
            log.warning("could not place cells of snapshot %s: %s", key, exc)
            continue
        _count_saved(store, snap, k - n0, time.perf_counter() - t0)
        return k - n0
    return 0
