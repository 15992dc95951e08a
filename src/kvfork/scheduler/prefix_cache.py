"""PrefixCache: the prefilled prefixes in the KV cache, as a radix tree over token ids; what may be shared.

Every rule about which cells a new prompt may share lives here: the minimum length worth a fork, the
sliding-window limit on cutting a prefix short, exact mode's back-off from tiny suffixes and chunks,
prompts in flight (forked before they are computed), namespaces (approximate prompts apart from exact
prefixes), locked (pinned) entries and least-recently-used eviction. The scheduler owns it; Engine.prefill, the
Composer and the server's dispatcher all match against this one cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from collections.abc import Sequence as Seq
from typing import NamedTuple, Protocol

import numpy as np

from kvfork.errors import KvforkError
from kvfork.scheduler.kv_sequence import KvSequence, SeqStatus

__all__ = ["EXACT", "MIN_SHARED", "MIN_SUFFIX", "LowerTier", "PrefixCache", "PrefixHit", "can_trim", "common_prefix",
           "in_flight"]

EXACT = "exact"  # the namespace of prefixes whose cells are what a from-scratch prefill computes

# NOTE: a shorter common prefix is not worth a fork of its own (the server's nodes, Engine.prefill).
MIN_SHARED = 16

# NOTE: a fork that leaves only a few prompt tokens to prefill computes them as a tiny ubatch, and
# llama.cpp's CPU kernels for 3-7 rows round differently from the same rows inside a long prompt:
# measured on gemma3-270m (q8_0 KV, flash attention), suffixes of 3-6 tokens (once 7) flipped a greedy
# token against a from-scratch run; 1-2 and 8-16 did not. So in exact mode on those kernels such forks
# back off to leave this many (fast mode promises agreement up to rounding only, and forks as late as it
# can; kvfork's patched kernels round every chunk size alike, so exact mode on them does too).
MIN_SUFFIX = 16


def can_trim(n_swa: int, n_tokens: int, keep: int) -> bool:
    """Whether the cells of `n_tokens` can be cut back to their first `keep` tokens and still be exact.

    NOTE: a sliding-window layer keeps (and a state blob holds) only the last n_swa positions of a
    sequence; the token after a cut at `keep` needs positions keep-n_swa.. of those layers, which
    are gone once n_tokens > n_swa. Full-attention models (n_swa == 0) can always be cut.
    """
    return keep >= n_tokens or n_swa <= 0 or n_tokens <= n_swa


def common_prefix(a: Seq[int] | np.ndarray, b: Seq[int] | np.ndarray) -> int:
    """Length of the longest common token prefix of `a` and `b` (lists or arrays)."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def in_flight(seq: KvSequence) -> bool:
    """A prompt being prefilled (queued or running, generating nothing): its tokens are fixed."""
    return seq.status in (SeqStatus.WAITING, SeqStatus.RUNNING) and seq.params.max_tokens == 0


def _indexed(seq: KvSequence) -> list[int]:
    """The tokens an entry is indexed by: all of a prompt in flight's, the cached ones of an idle entry."""
    return seq.tokens if in_flight(seq) else seq.tokens[: seq.n_in_kv]


class PrefixHit(NamedTuple):
    """Fork `node`'s first `n` cached tokens: they are the first `n` tokens of the prompt."""

    node: KvSequence
    n: int


class LowerTier(Protocol):
    """Where the cache's own entries go when evicted, and come back from (host RAM and disk: a SnapshotStore).

    Contract: called in the scheduler's thread; none of these raise for a storage problem (the tier is
    a cache: a failed demotion loses an entry, a failed restore is a miss).
    """

    def demote(self, seq: KvSequence) -> None:
        """Copy an entry's cells out before the scheduler releases it."""

    def longest(self, tokens: Seq[int]) -> int:
        """How many leading tokens of `tokens` a restore would bring back (0: none)."""

    def restore(self, tokens: Seq[int]) -> KvSequence | None:
        """A new sequence with the longest stored prefix of `tokens` in the cache and the rest pending;
        None when nothing could be restored."""

    def place_after(self, seq: KvSequence, tokens: Seq[int]) -> int:
        """Place the stored cells of `tokens[len(seq.tokens):k]` after `seq`'s (Scheduler.place), k the
        longest stored prefix of `tokens`; how many were placed (0: none, `seq` as it was)."""


class _Node:
    """A radix-tree node: `edge` leads here from `parent`; `entries` hold exactly the path's tokens."""

    __slots__ = ("edge", "parent", "children", "entries")

    def __init__(self, edge: tuple[int, ...], parent: _Node | None) -> None:
        self.edge = edge
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.entries: list[KvSequence] = []

    def subtree_entries(self) -> Iterator[KvSequence]:
        stack = [self]
        while stack:
            node = stack.pop()
            yield from node.entries
            stack.extend(node.children.values())


class PrefixCache:
    """Prefilled prompts (and prompts being prefilled), indexed by their tokens; `match` finds the best one to fork.

    Contract: only the scheduler's thread uses it. An entry is either idle, its `tokens[:n_in_kv]` in
    the cache, or a prompt in flight (submitted with max_tokens=0 and share=True): all its `tokens` are
    indexed while its chunks are computed, so a request arriving meanwhile forks it at a point it has
    not reached yet (Scheduler.fork: the fork waits for it). Nothing is appended to an entry.
    Unlocked entries belong to the cache: `evict` hands them back, least recently used first, for the
    scheduler to release. Locked entries (a Snapshot's, a pinned server snapshot's) stay until unlocked
    or released. A released sequence leaves the cache (`remove`, called by Scheduler.release).
    NOTE: a fork inside an entry's tokens (n < n_in_kv) copies the first n cells of any entry below
    that point; where the model has a sliding window it is offered only where `can_trim` holds.
    """

    def __init__(self, n_swa: int, *, exact: bool, invariant: bool = False, min_shared: int = MIN_SHARED) -> None:
        self.lower: LowerTier | None = None  # evicted entries are demoted there (the engine sets its store)
        self.n_swa = n_swa
        self.min_shared = min_shared
        self.min_suffix = MIN_SUFFIX if exact and not invariant else 0  # see MIN_SUFFIX
        self._roots: dict[Hashable, _Node] = {}  # one tree per namespace (see `insert`)
        self._where: dict[KvSequence, _Node] = {}
        self._spaces: dict[KvSequence, Hashable] = {}  # entry -> its namespace
        self._locks: dict[KvSequence, int] = {}
        self._lru: OrderedDict[KvSequence, None] = OrderedDict()  # unlocked entries, least recent first

    def __len__(self) -> int:
        """Unlocked idle entries: the prefixes the cache keeps on its own (and may evict)."""
        return sum(not in_flight(s) for s in self._lru)

    def __contains__(self, seq: object) -> bool:
        return seq in self._where

    def entries(self) -> list[KvSequence]:
        return list(self._where)

    # -- match ----------------------------------------------------------------------------------
    def match(self, tokens: Seq[int], *, namespace: Hashable = EXACT) -> PrefixHit | None:
        """The entry of `namespace` to fork for `tokens`, and where (an entry in flight: the fork waits
        for its chunks).

        A hit covers a whole entry, or at least `min_shared` tokens of a longer one (where the sliding
        window allows the cut); in exact mode it backs off to leave MIN_SUFFIX tokens rather than 2..15.
        """
        best: PrefixHit | None = None
        for hit in self._walk(tokens, self._roots.get(namespace)):
            if hit is None:
                continue
            n = self._back_off(hit.node, hit.n, len(tokens))
            if n is None:
                continue
            hit = PrefixHit(hit.node, n)
            if best is None or hit.n > best.n or (hit.n == best.n and in_flight(best.node) > in_flight(hit.node)):
                best = hit
        if best is not None and best.node in self._lru:
            self._lru.move_to_end(best.node)
        return best

    def _walk(self, tokens: Seq[int], root: _Node | None) -> Iterator[PrefixHit | None]:
        """Every entry that shares tokens with the prompt, with how many: those ending on its path share
        their whole length, those in a branch off the path share the branching node's depth, those below
        the point where it leaves the tree (inside an edge) share up to that point.

        NOTE: all of them, not just the deepest: on a sliding-window model a deep entry may not be cut
        where a shallower one can be.
        """
        if root is None:
            return
        node, depth = root, 0
        while True:
            for seq in node.entries:
                yield self._candidate(seq, depth)
            child = node.children.get(tokens[depth]) if depth < len(tokens) else None
            for below in node.children.values():
                if below is not child:
                    for seq in below.subtree_entries():
                        yield self._candidate(seq, depth)
            if child is None:
                return
            n = common_prefix(child.edge, tokens[depth: depth + len(child.edge)])
            if n < len(child.edge):
                for seq in child.subtree_entries():
                    yield self._candidate(seq, depth + n)
                return
            node, depth = child, depth + n

    def _candidate(self, seq: KvSequence, n: int) -> PrefixHit | None:
        if seq.released or n == 0:
            return None
        if in_flight(seq):
            return PrefixHit(seq, n) if n == len(seq.tokens) or n >= self.min_shared else None
        if seq.status is not SeqStatus.IDLE or seq.seq_id is None:
            return None
        whole = n == seq.n_in_kv
        if whole or (n >= self.min_shared and can_trim(self.n_swa, seq.n_in_kv, n)):
            return PrefixHit(seq, n)
        return None

    def _back_off(self, node: KvSequence, n: int, total: int) -> int | None:
        """Where to fork `node` for a prompt of `total` tokens sharing `n`; None: not at all.

        Exact mode forks earlier when the prompt would leave 2..MIN_SUFFIX-1 tokens to prefill (see
        MIN_SUFFIX). A prompt in flight stops its own chunks at the fork point (Scheduler.schedule), so
        its rows before and after that point must not make such a chunk either. Sliding-window models
        cut a prompt in flight only where its whole length could be cut (it goes on computing).
        """
        flying = in_flight(node)
        length = len(node.tokens) if flying else node.n_in_kv

        def cuttable(m: int) -> bool:
            return m >= 1 and ((flying and m >= node.n_in_kv) or can_trim(self.n_swa, length, m))

        m = n
        for end in (total, length) if flying else (total,):
            if 1 < end - m < self.min_suffix:
                m = end - self.min_suffix
        if m != n and not cuttable(m):
            m = n  # NOTE: no earlier point to fork at: fork here all the same (rounding only)
        if flying and 1 < m - node.n_in_kv < self.min_suffix:
            m = node.n_in_kv  # NOTE: the chunk up to the fork would be a tiny one: fork at what it holds
        if flying and (not cuttable(m) or m < min(n, self.min_shared)):
            return None  # NOTE: past what the window keeps, or too little left to share
        return m

    # -- insert, lock, remove, evict ------------------------------------------------------------
    def insert(self, seq: KvSequence, *, locked: bool = False, namespace: Hashable = EXACT) -> None:
        """Index `seq`'s cached tokens (all its tokens if it is a prompt in flight); locked=True keeps it
        until `unlock` or its release.

        `namespace`: only `match`es of the same namespace see it. EXACT holds cells computed as a
        from-scratch prefill computes them; an approximate (reuse-mode) prompt goes under a namespace
        of its own reuse settings, so only requests made with the same settings fork it.
        """
        if seq in self._where:
            raise KvforkError("this sequence is already in the prefix cache")
        idle = seq.status is SeqStatus.IDLE and seq.seq_id is not None and seq.n_in_kv > 0
        if not (idle or in_flight(seq)) or seq.released:
            raise KvforkError("only an idle sequence with cells in the cache, or a prompt in flight, can be a prefix")
        root = self._roots.setdefault(namespace, _Node((), None))
        tokens, node, depth = tuple(_indexed(seq)), root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                child = _Node(tokens[depth:], node)
                node.children[tokens[depth]] = child
                node = child
                break
            n = common_prefix(child.edge, tokens[depth: depth + len(child.edge)])
            if n < len(child.edge):
                child = self._split(child, n)
            node, depth = child, depth + n
        node.entries.append(seq)
        self._where[seq] = node
        self._spaces[seq] = namespace
        if locked:
            self._locks[seq] = 1
        else:
            self._lru[seq] = None

    def pin(self, seq: KvSequence) -> None:
        """Lock `seq`, inserting it first if it is not an entry yet (a Snapshot's, a pinned server snapshot's)."""
        if seq in self._where:
            self.lock(seq)
        else:
            self.insert(seq, locked=True)

    def lock(self, seq: KvSequence) -> None:
        """Keep `seq` until as many `unlock`s (a pinned snapshot); it cannot be evicted meanwhile."""
        self._require(seq)
        self._lru.pop(seq, None)
        self._locks[seq] = self._locks.get(seq, 0) + 1

    def unlock(self, seq: KvSequence) -> None:
        """Undo one `lock`; the last makes it the cache's own again (most recently used)."""
        self._require(seq)
        if seq not in self._locks:
            raise KvforkError("this prefix is not locked")
        self._locks[seq] -= 1
        if not self._locks[seq]:
            del self._locks[seq]
            self._lru[seq] = None

    def remove(self, seq: KvSequence) -> None:
        """Forget `seq` (it is being released); a no-op for sequences not in the cache."""
        node = self._where.pop(seq, None)
        if node is None:
            return
        self._lru.pop(seq, None)
        self._locks.pop(seq, None)
        self._spaces.pop(seq, None)
        node.entries.remove(seq)
        self._prune(node)

    def evict(self, *, frees_cells: bool = False, demotable: bool = False) -> KvSequence | None:
        """Take the least recently used unlocked entry out (the caller releases it); None if there is none.

        frees_cells=True takes only an entry no fork shares, whose release frees its cells at once;
        otherwise those are preferred. demotable=True takes only an EXACT entry and only with a lower
        tier (what `idle_cells` counts). With a lower tier, an EXACT entry is demoted to it first: an
        approximate (reuse-mode) one never is, since the tier serves exact prompts by their tokens.
        """
        idle = [s for s in self._idle() if not demotable or (self.lower is not None and self._spaces[s] == EXACT)]
        seq = next((s for s in idle if s.n_children == 0), None)
        if seq is None:
            if frees_cells or not idle:
                return None
            seq = idle[0]
        space = self._spaces[seq]
        self.remove(seq)
        if self.lower is not None and space == EXACT:
            self.lower.demote(seq)
        return seq

    def idle_cells(self) -> int:
        """Cells held only by idle EXACT entries that no fork shares: what `evict(frees_cells=True,
        demotable=True)` can move to the lower tier (0 without one)."""
        if self.lower is None:
            return 0
        return sum(s.n_own_tokens for s in self._idle() if s.n_children == 0 and self._spaces[s] == EXACT)

    def _idle(self) -> list[KvSequence]:
        """Unlocked entries, least recently used first. NOTE: a prompt in flight is not the cache's to give."""
        return [s for s in self._lru if not in_flight(s)]

    def demote_all(self) -> None:
        """Copy every unlocked EXACT entry to the lower tier (they stay here too): before the context goes away."""
        if self.lower is not None:
            for seq in self._idle():
                if self._spaces[seq] == EXACT:
                    self.lower.demote(seq)

    def check_integrity(self) -> None:
        """Raise KvforkError if an entry's path is not its cached tokens, or the tree is not compressed."""
        for seq, node in self._where.items():
            path: list[int] = []
            at: _Node | None = node
            while at is not None:
                path[:0] = at.edge
                at = at.parent
            if path != _indexed(seq) or seq.released or (seq.seq_id is None and not in_flight(seq)):
                raise KvforkError("a prefix cache entry no longer holds the tokens it was indexed by")
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            if node.parent is not None and not node.entries and len(node.children) < 2:
                raise KvforkError("a prefix cache node without entries has fewer than two children")
            stack.extend(node.children.values())
        if set(self._lru) | set(self._locks) != set(self._where) or set(self._lru) & set(self._locks) \
                or set(self._spaces) != set(self._where):
            raise KvforkError("the prefix cache's lock and LRU books disagree with its entries")

    # -- the tree -------------------------------------------------------------------------------
    @staticmethod
    def _split(child: _Node, n: int) -> _Node:
        """Cut `child`'s edge after n tokens; return the new node in between."""
        parent = child.parent
        assert parent is not None
        mid = _Node(child.edge[:n], parent)
        parent.children[child.edge[0]] = mid
        child.edge, child.parent = child.edge[n:], mid
        mid.children[child.edge[0]] = child
        return mid

    def _prune(self, node: _Node) -> None:
        """Drop empty leaves and merge a node without entries into its only child (path compression)."""
        while node.parent is not None and not node.entries and len(node.children) <= 1:
            parent = node.parent
            assert parent is not None
            if node.children:
                (child,) = node.children.values()
                child.edge, child.parent = node.edge + child.edge, parent
                parent.children[node.edge[0]] = child
            else:
                del parent.children[node.edge[0]]
            node = parent

    def _require(self, seq: KvSequence) -> None:
        if seq not in self._where:
            raise KvforkError("this sequence is not in the prefix cache")
