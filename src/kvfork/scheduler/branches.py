"""BranchTable: the sequence-id pool and KV-cell budget, with fork and free on the backend's cache."""

from __future__ import annotations

import time

from kvfork.engine.backend import Backend
from kvfork.errors import ContextOverflow
from kvfork.scheduler.kv_sequence import KvSequence, SeqStatus

__all__ = ["BranchTable"]


class BranchTable:
    """Pairs every check with its action (can_allocate / allocate), as nano-vllm's block manager does.

    Contract: only the scheduler thread calls it. A sequence id is held from `allocate` to `free`.
    Cells are budgeted by reservation: each allocated sequence reserves its own tokens plus the tokens
    it may still generate; shared prefix cells are counted once, on the sequence that made them.
    A sequence released with defer=True is *spent*: it keeps its id and cells, which count as free
    (`can_allocate`), until `free_spent` or an `allocate` / `borrow_id` that needs them.
    A released sequence whose forks live on does not pin its cells: llama.cpp frees a cell only when
    no sequence id holds it, and each fork's id already holds the cells it shares. So the fork sharing
    the most takes over their accounting (`_hand_over`), its siblings become its forks, and only the
    cells no fork shares are freed. A sequence stays pinned only while a fork of it waits for its id
    (the fork's cells are tagged from the parent's at admission).
    """

    def __init__(self, backend: Backend, n_seq_max: int) -> None:
        self.backend = backend
        self.n_cells = backend.n_ctx
        self._free_ids = list(range(n_seq_max - 1, -1, -1))
        self._live: set[KvSequence] = set()
        self._spent: list[KvSequence] = []  # released, cells kept until free_spent (see release)
        # cells were freed since the cache was last compacted: free cells may lie below used ones (Scheduler.settle)
        self.holes = False
        self.fork_seconds = 0.0  # total time spent tagging shared cells (seq_cp): the cost of forking
        self.n_forks = 0

    @property
    def n_live(self) -> int:
        return len(self._live)

    def sequences(self) -> list[KvSequence]:
        """The sequences holding an id and a reservation."""
        return list(self._live)

    @property
    def n_free_ids(self) -> int:
        return len(self._free_ids) + len(self._spent)

    def cells_reserved(self) -> int:
        """Cells the live sequences may occupy (spent ones not counted: they are freed on demand).

        NOTE: a spent sequence with forks is counted whole: freeing it hands the cells its forks share
        over to them rather than freeing them.
        """
        spent = set(self._reclaimable())
        return sum(seq.cells_needed() for seq in self._live if seq not in spent)

    def _reclaimable(self) -> list[KvSequence]:
        """Spent sequences whose freeing frees their own cells (those with forks hand them over)."""
        return [s for s in self._spent if not s.children]

    def check_fits(self, seq: KvSequence) -> None:
        """Raise ContextOverflow if `seq` could never fit, even with every other branch gone."""
        pinned = sum(s.n_own_tokens for s in self._ancestors(seq))
        need = seq.cells_needed()
        if pinned + need > self.n_cells:
            raise ContextOverflow(
                f"{pinned + need:,} KV cells needed ({pinned:,} shared prefix + {need:,} for this branch: prompt and"
                f" max_tokens) but the context holds {self.n_cells:,}; shorten the input or raise n_ctx"
            )

    def can_allocate(self, seq: KvSequence) -> bool:
        """A sequence without an id needs a free id; every sequence needs room for its reservation."""
        if seq.seq_id is None and not self.n_free_ids:
            return False
        return self._cells_with(seq) <= self.n_cells

    def _cells_with(self, seq: KvSequence) -> int:
        """Cells reserved once `seq` holds its reservation (counted once if it already does)."""
        others = self.cells_reserved() - (seq.cells_needed() if seq in self._live else 0)
        return others + seq.cells_needed()

    def allocate(self, seq: KvSequence) -> None:
        """Give `seq` an id (sharing its parent's cells) if it has none; count its cells."""
        held = sum(s.n_own_tokens for s in self._reclaimable())
        if (seq.seq_id is None and not self._free_ids) or self._cells_with(seq) + held > self.n_cells:
            self.free_spent()
        if seq.seq_id is None:
            seq.seq_id = self._free_ids.pop()
            parent = seq.parent
            if parent is not None:
                assert parent.seq_id is not None, "a parent keeps its id while a fork waits for one"
                # NOTE: zero-copy fork: on a unified cache seq_cp only adds the new id to the parent's cells.
                t0 = time.perf_counter()
                self.backend.seq_cp(parent.seq_id, seq.seq_id, -1, seq.n_shared)
                self.fork_seconds += time.perf_counter() - t0
                self.n_forks += 1
                self._spend_if_unpinned(parent)
        self._live.add(seq)

    def detach(self, seq: KvSequence) -> None:
        """A fork still waiting for its id gives up its parent: it will compute the shared tokens itself.

        NOTE: a released parent that only this fork pinned is spent now (freed with the spent ones).
        """
        parent = seq.parent
        assert seq.seq_id is None and parent is not None, "only a waiting fork can be detached"
        parent.children.remove(seq)
        seq.parent, seq.n_shared, seq.n_in_kv = None, 0, 0
        self._spend_if_unpinned(parent)

    def _spend_if_unpinned(self, parent: KvSequence) -> None:
        """A released parent that waited only for its forks' ids (now all admitted or gone) is spent:
        freed with the spent ones (see release)."""
        if parent.released and parent.status is not SeqStatus.CLOSED and parent not in self._spent \
                and self._all_admitted(parent):
            self._spent.append(parent)

    def borrow_id(self) -> int:
        """A sequence id for a moment's scratch work (restoring cells before tagging them to a sequence).

        NOTE: it holds no reservation: the caller must have counted the cells it will write (on the
        sequence that keeps them) and must give it back, empty, with `return_id`.
        """
        self.free_spent()  # NOTE: the caller writes cells outside any reservation: make all room there is
        if not self._free_ids:
            raise ContextOverflow("no free sequence id; close snapshots or branches, or raise n_seq_max")
        return self._free_ids.pop()

    def return_id(self, seq_id: int) -> None:
        self.drop_cells(seq_id)  # NOTE: counted as freeing: a restore that failed half-way left cells only it held
        self._free_ids.append(seq_id)

    def drop_cells(self, seq_id: int, p0: int = -1, p1: int = -1, *, frees: bool = True) -> None:
        """Remove `seq_id` from its cells at positions [p0, p1); `frees`: some of them may have no other id
        (the cache may have holes below used cells now, see `holes`)."""
        self.backend.seq_rm(seq_id, p0, p1)
        self.holes = self.holes or frees

    def release(self, seq: KvSequence, *, defer: bool = False) -> None:
        """Free `seq` now (its forks keep the cells they share), or, defer=True, once turns end.

        defer=True (other sequences are mid-turn): keep its id and cells until `free_spent`.
        NOTE: llama.cpp puts new tokens in the lowest free cells, and flash attention sums a query's
        cells in cache order. Cells freed under a branch that is still decoding would take its next
        tokens below its earlier ones, and its logits would then differ in the last bits from a
        from-scratch run's (measured: up to 0.1 in a log-probability, 10 gemma3-270m branches ending at
        different lengths). Kept until the running turns end, they are freed at once, and the cache is compacted
        once before cells are written again (Scheduler.settle), not at every step.
        """
        if seq.released:
            return
        seq.released = True
        if defer and seq.seq_id is not None:
            if self._all_admitted(seq):  # NOTE: else allocate adds it once its last waiting fork has its id
                self._spent.append(seq)
        else:
            self._free(seq)

    def free_spent(self) -> None:
        """Free every spent sequence (no sequence is mid-turn, or their cells are needed now)."""
        spent, self._spent = self._spent, []
        for seq in spent:
            self._free(seq)

    def _free(self, seq: KvSequence) -> None:
        """Drop the sequence's own cells and return its id; cells its forks share stay with them."""
        if seq.status is SeqStatus.CLOSED:
            return  # NOTE: a spent parent can be freed first by its last fork's free (see below)
        if not self._all_admitted(seq):
            return  # NOTE: pinned until its waiting forks have tagged its cells (see allocate)
        parent = seq.parent
        if seq.children:
            self._hand_over(seq)
        if seq.seq_id is not None:
            self.drop_cells(seq.seq_id)
            self._free_ids.append(seq.seq_id)
            seq.seq_id = None
        self._live.discard(seq)
        seq.status = SeqStatus.CLOSED
        if parent is not None and seq in parent.children:
            parent.children.remove(seq)
            if parent.released and not parent.children:
                self._free(parent)

    @staticmethod
    def _hand_over(seq: KvSequence) -> None:
        """Make the fork sharing most of `seq` the owner of those cells, in `seq`'s place in the tree.

        Invariant kept: a sequence's first n_shared cells are its parent's first n_shared cells, and
        are counted on an ancestor. The heir holds `seq`'s first heir.n_shared cells under its own id, so
        its siblings (sharing no more) become its forks, and it becomes a fork of `seq`'s parent
        sharing what `seq` shared; the cells in between become its own, counted once.
        """
        heir = max(seq.children, key=lambda c: c.n_shared)
        for child in seq.children:
            if child is not heir:
                child.parent = heir
                heir.children.append(child)
        seq.children = []
        parent = seq.parent
        heir.parent = parent
        if parent is None:
            heir.n_shared = 0
        else:
            heir.n_shared = min(heir.n_shared, seq.n_shared)
            parent.children[parent.children.index(seq)] = heir
        seq.parent = None

    @staticmethod
    def _all_admitted(seq: KvSequence) -> bool:
        return all(child.seq_id is not None for child in seq.children)

    @staticmethod
    def _ancestors(seq: KvSequence) -> list[KvSequence]:
        out = []
        parent = seq.parent
        while parent is not None:
            out.append(parent)
            parent = parent.parent
        return out
