"""A released sequence pins nothing its forks do not use: the fork sharing most of it takes its cells over.

No model: the fake backend (tests/support/fakes.py) keeps llama.cpp's cell rule (a cell is free once no
sequence id holds it; seq_cp adds an id to cells, seq_rm removes one), which is all BranchTable relies on.
"""

from __future__ import annotations

from typing import Any

from kvfork.config import EngineConfig
from kvfork.engine.batch import Batch
from kvfork.scheduler.kv_sequence import KvSequence
from kvfork.scheduler.scheduler import Scheduler


def _scheduler(backend: Any, n_root: int, n_seq_max: int = 8) -> tuple[Scheduler, Any, KvSequence]:
    """A scheduler on the fake's 4,096 cells, with a root sequence of n_root tokens in the cache."""
    sched = Scheduler(backend, EngineConfig(n_ctx=backend.n_ctx, n_seq_max=n_seq_max))
    root = KvSequence(tokens=[])
    _grow(sched, root, n_root)
    return sched, backend, root


def _grow(sched: Scheduler, seq: KvSequence, n: int) -> None:
    """As a prefill or decode would: admit `seq` and put n more tokens of it in the cache."""
    if seq.seq_id is None:
        sched.table.allocate(seq)
    start = len(seq.tokens)
    seq.tokens += list(range(1000 + start, 1000 + start + n))
    batch = Batch()
    for pos in range(start, start + n):
        batch.add(seq.tokens[pos], pos, seq.seq_id)  # type: ignore[arg-type]
    sched.backend.decode(batch)
    seq.n_in_kv = len(seq.tokens)


def test_a_chain_of_forks_each_releasing_its_parent_holds_only_the_cells_in_use(fake_backend):
    sched, ctx, root = _scheduler(fake_backend(4096), 300, n_seq_max=4)
    seq = root
    for _ in range(20):
        # NOTE: each fork drops its parent's last 20 tokens (a retry of the turn) and adds 40 of its own
        child = sched.fork(seq, seq.n_in_kv - 20)
        _grow(sched, child, 40)
        sched.release(seq)
        seq = child
    assert len(ctx.cells) == len(seq.tokens) == 300 + 20 * 20  # nothing pinned: every cell is the last fork's
    assert ctx.positions(seq.seq_id) == list(range(len(seq.tokens)))  # type: ignore[arg-type]
    assert seq.parent is None and seq.n_shared == 0 and sched.table.n_live == 1
    assert sched.table.cells_reserved() == len(ctx.cells)  # counted once, on the one owner
    assert sched.table.n_free_ids == 3  # 20 forks through a pool of 4 ids
    sched.release(seq)
    assert ctx.cells == [] and sched.table.n_free_ids == 4


def test_siblings_keep_what_they_share_and_the_tail_nobody_shares_is_freed(fake_backend):
    sched, ctx, root = _scheduler(fake_backend(4096), 100)
    short, long_, whole = sched.fork(root, 40), sched.fork(root, 70), sched.fork(root)
    for seq, n in ((short, 5), (long_, 6), (whole, 7)):
        _grow(sched, seq, n)
    sched.release(root)
    # the heir is a whole fork; the others are its forks now, sharing what they shared
    assert whole.parent is None and whole.n_shared == 0 and {short.parent, long_.parent} == {whole}
    assert len(ctx.cells) == 100 + 5 + 6 + 7 and sched.table.cells_reserved() == len(ctx.cells)
    sched.release(whole)
    # the heir's tail beyond 70 cells goes; long_ takes the first 70 over, short shares its first 40
    assert long_.parent is None and short.parent is long_ and short.n_shared == 40
    assert len(ctx.cells) == 70 + 5 + 6 and sched.table.cells_reserved() == len(ctx.cells)
    assert ctx.positions(short.seq_id) == list(range(45))  # type: ignore[arg-type]
    sched.release(long_)
    sched.release(short)
    assert ctx.cells == [] and sched.table.n_live == 0


def test_an_inner_heir_joins_its_grandparent_sharing_what_its_parent_shared(fake_backend):
    sched, ctx, root = _scheduler(fake_backend(4096), 50)
    mid = sched.fork(root)
    _grow(sched, mid, 30)
    leaf = sched.fork(mid, 65)
    _grow(sched, leaf, 4)
    sched.release(mid)  # root still lives: leaf becomes root's fork at 50, owning mid's cells 50..64
    assert leaf.parent is root and leaf.n_shared == 50 and root.children == [leaf]
    assert len(ctx.cells) == 50 + 15 + 4 and sched.table.cells_reserved() == len(ctx.cells)


def test_a_parent_stays_until_its_waiting_fork_has_its_cells(fake_backend):
    sched, ctx, root = _scheduler(fake_backend(4096), 80)
    child = sched.fork(root)  # not admitted yet: its cells are tagged from root's at admission
    sched.release(root)
    assert root.seq_id is not None and len(ctx.cells) == 80
    _grow(sched, child, 3)  # admitted: it holds the 80 cells under its own id now
    sched.table.free_spent()  # root was waiting for that; it goes with the spent ones
    assert root.seq_id is None and child.parent is None and len(ctx.cells) == 83
    assert ctx.positions(child.seq_id) == list(range(83))  # type: ignore[arg-type]


def test_an_unadmitted_fork_released_first_unpins_its_parent(fake_backend):
    sched, ctx, root = _scheduler(fake_backend(4096), 10)
    child = sched.fork(root)
    sched.release(root)
    sched.release(child)  # never admitted: nothing to hand over, and root is free to go
    assert root.seq_id is None and ctx.cells == [] and sched.table.n_live == 0
