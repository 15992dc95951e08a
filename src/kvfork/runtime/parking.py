"""Parking: an Engine's idle snapshots wait in host RAM while other work runs (EngineConfig.park_idle)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from kvfork.errors import ContextOverflow
from kvfork.runtime import warm
from kvfork.scheduler.kv_sequence import KvSequence, SeqStatus
from kvfork.scheduler.prefix_cache import MIN_SHARED, common_prefix
from kvfork.store.host import HostSnapshot

if TYPE_CHECKING:
    from kvfork.runtime.engine import Engine
    from kvfork.runtime.snapshot import Snapshot

__all__ = ["Parking"]

# NOTE: parking and bringing back a 3,500-token snapshot costs ~0.1 s (capture + restore) at most, about what
# its idle cells cost ~10 decode steps or ~25 prompt tokens computed beside them (see EngineConfig.park_idle)
MIN_WORK = 32


class Parking:
    """The snapshots an engine gave out, and which of them wait in host RAM.

    A parked snapshot's sequence is released and its cells kept as a HostSnapshot by the Snapshot; its next
    use restores them (`unpark`), pinned in the prefix cache again if they were. Releasing it frees the cells
    no other sequence holds; those its forks share stay with them (BranchTable's hand-over), and a restore
    copies them again. So a snapshot is parked only where that frees at least half of its cells: a document
    whose chat template's first tokens a later prompt forked, yes; one its own branches share, no.
    Contract: every call holds the engine's lock (they take it).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._held: weakref.WeakSet[Snapshot] = weakref.WeakSet()  # the ones `before_run` may park
        self._shared: weakref.WeakSet[Snapshot] = weakref.WeakSet()  # parked ones that were prefix-cache entries
        # NOTE: only these come back for a prefill, and they are pinned in the prefix cache again

    def hold(self, snapshot: Snapshot) -> Snapshot:
        self._held.add(snapshot)
        return snapshot

    def park(self, snapshot: Snapshot) -> HostSnapshot | None:
        """Copy an idle snapshot's cells to host RAM and free them here: the copy; None where they stay (it
        is running or closed, a fork waits for its id, or its forks or its parent share half of its cells
        or more). What Snapshot.park does."""
        engine = self.engine
        with engine.lock:
            seq = snapshot.sequence
            if seq.released or seq.seq_id is None or seq.status is not SeqStatus.IDLE or seq.n_pending \
                    or any(c.seq_id is None for c in seq.children):  # NOTE: a fork waiting for its id pins it
                return None
            shared = max([seq.n_shared, *(c.n_shared for c in seq.children)])
            if 2 * shared > len(seq.tokens):
                return None  # NOTE: it would free less than half of its cells, and copy the rest again
            host = warm.capture(snapshot)
            if seq in engine.scheduler.prefixes:
                self._shared.add(snapshot)
            engine.scheduler.release(seq)
            return host

    def unpark(self, snapshot: Snapshot, host: HostSnapshot) -> KvSequence:
        """A parked snapshot's sequence, restored from `host` (and pinned in the prefix cache again if it
        was). Raises ContextOverflow where there is no room; the snapshot stays parked then."""
        engine = self.engine
        with engine.lock:
            seq = warm.adopt(engine, host)
            if snapshot in self._shared:
                self._shared.discard(snapshot)
                engine.scheduler.prefixes.pin(seq)
            return seq

    def before_run(self, seqs: list[KvSequence]) -> None:
        """Before a run that computes at least MIN_WORK tokens, park every snapshot it does not use
        (EngineConfig.park_idle: without flash attention their cells cost each token computed here), and,
        with a store, move the prefix cache's own idle entries (composed prompts' heads) to it, as the
        server does after each step (Scheduler.park_idle); a later prompt with that head restores it."""
        if not self.engine.config.park_idle:
            return
        if sum(s.n_pending + max(0, s.params.max_tokens - len(s.generated)) for s in seqs) < MIN_WORK:
            return
        for snapshot in list(self._held):
            snapshot.park()  # NOTE: one that `seqs` fork is skipped (its children), as are running ones
        self.engine.scheduler.park_idle()  # NOTE: none without a store (no lower tier), nor ones `seqs` fork

    def before_prefill(self, tokens: list[int]) -> None:
        """Before a prefill of `tokens`: bring back the parked snapshot that was a prefix-cache entry and
        shares the most of them, where that is at least half of it (and MIN_SHARED), so that the cache forks
        it rather than the prefill computing its tokens again; park the live ones it shares less than half of.
        NOTE: a document forked for its chat template's first tokens (the same system prompt) would stay in
        the context for a few tokens' sake (a fork waiting for its id pins it), and one brought back for
        them would be parked again at the next run, its cells copied out and in: the prefill computes them.
        """
        common = {s: common_prefix(s.tokens, tokens) for s in list(self._held)}
        half = {s: 2 * n >= s.n_tokens for s, n in common.items()}
        shared = {s: common[s] for s in list(self._shared) if s.parked and half.get(s)}  # NOTE: not closed ones
        best = max(shared, key=shared.__getitem__, default=None)
        if best is not None and shared[best] >= MIN_SHARED:
            try:
                best.unpark()
            except ContextOverflow:
                pass  # NOTE: no room to bring it back: the prefill computes those tokens instead
        work = len(tokens) - max([n for s, n in common.items() if half[s]], default=0)
        if self.engine.config.park_idle and work >= MIN_WORK:
            for snapshot, most in half.items():
                if not most:
                    snapshot.park()
