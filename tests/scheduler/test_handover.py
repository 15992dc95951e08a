"""A released sequence pins nothing its forks do not use: the fork sharing most of it takes its cells over.

No model: the context is a fake that keeps llama.cpp's cell rule (a cell is free once no sequence id
holds it; seq_cp adds an id to cells, seq_rm removes one), which is all BranchTable relies on.
"""

from __future__ import annotations

from kvfork.config import EngineConfig
from kvfork.scheduler.scheduler import Scheduler
from kvfork.scheduler.sequence import Sequence


class CellContext:
    """Cells as llama.cpp's unified cache keeps them: a position and a set of sequence ids each."""

    def __init__(self, n_ctx: int) -> None:
        self.n_ctx = n_ctx
        self.cells: list[tuple[int, set[int]]] = []

    def write(self, seq_id: int, positions: range) -> None:
        assert len(self.cells) + len(positions) <= self.n_ctx, "out of cells"
        self.cells += [(p, {seq_id}) for p in positions]

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        for pos, ids in self.cells:
            if src in ids and (p0 < 0 or pos >= p0) and (p1 < 0 or pos < p1):
                ids.add(dst)

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        for pos, ids in self.cells:
            if (p0 < 0 or pos >= p0) and (p1 < 0 or pos < p1):
                ids.discard(seq_id)
        self.cells = [(pos, ids) for pos, ids in self.cells if ids]
        return True

    def held_by(self, seq_id: int) -> list[int]:
        return sorted(pos for pos, ids in self.cells if seq_id in ids)


def _scheduler(n_root: int, n_seq_max: int = 8) -> tuple[Scheduler, CellContext, Sequence]:
    """A scheduler on a fake context of 4,096 cells, with a root sequence of n_root tokens in the cache."""
    ctx = CellContext(4096)
    sched = Scheduler(ctx, None, EngineConfig(n_ctx=4096, n_seq_max=n_seq_max))  # type: ignore[arg-type]
    root = Sequence(tokens=[])
    _grow(sched, ctx, root, n_root)
    return sched, ctx, root


def _grow(sched: Scheduler, ctx: CellContext, seq: Sequence, n: int) -> None:
    """As a prefill or decode would: admit `seq` and put n more tokens of it in the cache."""
    if seq.seq_id is None:
        sched.table.allocate(seq)
    start = len(seq.tokens)
    seq.tokens += list(range(1000 + start, 1000 + start + n))
    ctx.write(seq.seq_id, range(start, start + n))  # type: ignore[arg-type]
    seq.n_in_kv = len(seq.tokens)


def test_a_chain_of_forks_each_releasing_its_parent_holds_only_the_cells_in_use():
    sched, ctx, root = _scheduler(300, n_seq_max=4)
    seq = root
    for _ in range(20):
        # NOTE: each fork drops its parent's last 20 tokens (a retry of the turn) and adds 40 of its own
        child = sched.fork(seq, seq.n_in_kv - 20)
        _grow(sched, ctx, child, 40)
        sched.release(seq)
        seq = child
    assert len(ctx.cells) == len(seq.tokens) == 300 + 20 * 20  # nothing pinned: every cell is the last fork's
    assert ctx.held_by(seq.seq_id) == list(range(len(seq.tokens)))  # type: ignore[arg-type]
    assert seq.parent is None and seq.n_shared == 0 and sched.table.n_live == 1
    assert sched.table.cells_reserved() == len(ctx.cells)  # counted once, on the one owner
    assert sched.table.n_free_ids == 3  # 20 forks through a pool of 4 ids
    sched.release(seq)
    assert ctx.cells == [] and sched.table.n_free_ids == 4


def test_siblings_keep_what_they_share_and_the_tail_nobody_shares_is_freed():
    sched, ctx, root = _scheduler(100)
    short, long_, whole = sched.fork(root, 40), sched.fork(root, 70), sched.fork(root)
    for seq, n in ((short, 5), (long_, 6), (whole, 7)):
        _grow(sched, ctx, seq, n)
    sched.release(root)
    # the heir is a whole fork; the others are its forks now, sharing what they shared
    assert whole.parent is None and whole.n_shared == 0 and {short.parent, long_.parent} == {whole}
    assert len(ctx.cells) == 100 + 5 + 6 + 7 and sched.table.cells_reserved() == len(ctx.cells)
    sched.release(whole)
    # the heir's tail beyond 70 cells goes; long_ takes the first 70 over, short shares its first 40
    assert long_.parent is None and short.parent is long_ and short.n_shared == 40
    assert len(ctx.cells) == 70 + 5 + 6 and sched.table.cells_reserved() == len(ctx.cells)
    assert ctx.held_by(short.seq_id) == list(range(45))  # type: ignore[arg-type]
    sched.release(long_)
    sched.release(short)
    assert ctx.cells == [] and sched.table.n_live == 0


def test_an_inner_heir_joins_its_grandparent_sharing_what_its_parent_shared():
    sched, ctx, root = _scheduler(50)
    mid = sched.fork(root)
    _grow(sched, ctx, mid, 30)
    leaf = sched.fork(mid, 65)
    _grow(sched, ctx, leaf, 4)
    sched.release(mid)  # root still lives: leaf becomes root's fork at 50, owning mid's cells 50..64
    assert leaf.parent is root and leaf.n_shared == 50 and root.children == [leaf]
    assert len(ctx.cells) == 50 + 15 + 4 and sched.table.cells_reserved() == len(ctx.cells)


def test_a_parent_stays_until_its_waiting_fork_has_its_cells():
    sched, ctx, root = _scheduler(80)
    child = sched.fork(root)  # not admitted yet: its cells are tagged from root's at admission
    sched.release(root)
    assert root.seq_id is not None and len(ctx.cells) == 80
    _grow(sched, ctx, child, 3)  # admitted: it holds the 80 cells under its own id now
    sched.table.free_spent()  # root was waiting for that; it goes with the spent ones
    assert root.seq_id is None and child.parent is None and len(ctx.cells) == 83
    assert ctx.held_by(child.seq_id) == list(range(83))  # type: ignore[arg-type]


def test_an_unadmitted_fork_released_first_unpins_its_parent():
    sched, ctx, root = _scheduler(10)
    child = sched.fork(root)
    sched.release(root)
    sched.release(child)  # never admitted: nothing to hand over, and root is free to go
    assert root.seq_id is None and ctx.cells == [] and sched.table.n_live == 0
