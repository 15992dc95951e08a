"""PrefixCache: the radix tree's matches against a plain scan of every entry, and its rules (no model)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvfork.config import EngineConfig
from kvfork.engine.sampling import SamplingParams
from kvfork.errors import KvforkError
from kvfork.scheduler.kv_sequence import KvSequence
from kvfork.scheduler.prefix_cache import MIN_SHARED, MIN_SUFFIX, PrefixCache, can_trim, common_prefix
from kvfork.scheduler.scheduler import Scheduler

_ids = iter(range(10**6))


def _entry(tokens: list[int]) -> KvSequence:
    """An idle sequence whose tokens are all in the cache (the cache itself never touches cells)."""
    return KvSequence(tokens=list(tokens), n_in_kv=len(tokens), seq_id=next(_ids))


def _scan(entries: list[KvSequence], tokens: list[int], n_swa: int, min_shared: int, min_suffix: int) -> int:
    """The longest usable shared length by looking at every entry (what the tree must find)."""
    best = 0
    for seq in entries:
        n = common_prefix(seq.tokens, tokens)
        if n == 0 or not (n == seq.n_in_kv or (n >= min_shared and can_trim(n_swa, seq.n_in_kv, n))):
            continue
        if 1 < len(tokens) - n < min_suffix and len(tokens) - min_suffix >= 1 \
                and can_trim(n_swa, seq.n_in_kv, len(tokens) - min_suffix):
            n = len(tokens) - min_suffix
        best = max(best, n)
    return best


@pytest.mark.parametrize("n_swa, exact", [(0, False), (0, True), (40, False), (40, True)])
def test_matches_agree_with_a_scan_of_every_entry_through_inserts_and_removes(n_swa, exact):
    rng = random.Random(n_swa * 2 + exact)
    cache = PrefixCache(n_swa, exact=exact, min_shared=8)
    stems = [[rng.randrange(4) for _ in range(rng.randrange(1, 60))] for _ in range(6)]  # few symbols: deep sharing
    live: list[KvSequence] = []
    for _ in range(400):
        if live and rng.random() < 0.35:
            cache.remove(live.pop(rng.randrange(len(live))))
        else:
            stem = rng.choice(stems)
            seq = _entry(stem[: rng.randrange(1, len(stem) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(5))])
            cache.insert(seq, locked=rng.random() < 0.3)
            live.append(seq)
        cache.check_integrity()
        stem = rng.choice(stems)
        prompt = stem[: rng.randrange(1, len(stem) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(20))]
        hit = cache.match(prompt)
        want = _scan(live, prompt, n_swa, 8, MIN_SUFFIX if exact else 0)
        assert (hit.n if hit else 0) == want
        if hit is not None:
            assert hit.node in live and hit.node.tokens[: hit.n] == prompt[: hit.n]
            assert can_trim(n_swa, hit.node.n_in_kv, hit.n)
    for seq in live:
        cache.remove(seq)
    cache.check_integrity()
    assert cache.entries() == []  # NOTE: check_integrity fails on a node left without entries and children


def test_a_prompt_that_ends_at_a_split_point_forks_an_entry_below_it():
    cache = PrefixCache(0, exact=False, min_shared=4)
    a, b = _entry(list(range(20)) + [1, 1]), _entry(list(range(20)) + [2, 2])
    cache.insert(a)
    cache.insert(b)  # the tree splits after 20 tokens; no entry ends there
    hit = cache.match(list(range(20)))
    assert hit is not None and hit.n == 20 and hit.node in (a, b)
    assert cache.match(list(range(3))) is None  # shorter than min_shared and no whole entry


def test_a_sliding_window_allows_cuts_only_of_short_entries():
    cache = PrefixCache(64, exact=False, min_shared=4)
    long_ = _entry(list(range(200)))
    cache.insert(long_)
    assert cache.match(list(range(150)) + [7]) is None  # its window no longer holds positions 86..149
    assert cache.match(list(range(200)) + [7]) == (long_, 200)  # the whole entry is fine
    short = _entry(list(range(50)))
    cache.insert(short)
    assert cache.match(list(range(30)) + [7]) == (short, 30)  # 50 cells fit the window: cut at 30


def test_exact_mode_backs_off_to_leave_min_suffix_tokens():
    # NOTE: only on kernels that round a few-row chunk otherwise (invariant=False): the patched ones do not
    for exact, invariant, want in ((True, False, 103 - MIN_SUFFIX), (False, False, 100), (True, True, 100)):
        cache = PrefixCache(0, exact=exact, invariant=invariant)
        node = _entry(list(range(100)))
        cache.insert(node)
        assert cache.match(list(range(103))) == (node, want)


def test_eviction_is_least_recently_used_and_prefers_entries_no_fork_shares():
    cache = PrefixCache(0, exact=False)
    a, b, c = _entry([1] * 20), _entry([2] * 20), _entry([3] * 20)
    for seq in (a, b, c):
        cache.insert(seq)
    cache.match([1] * 20 + [9])  # a is used: b is the least recently used now
    b.children.append(_entry([2] * 21))  # a fork shares b's cells: evicting b frees nothing
    assert len(cache) == 3
    assert cache.evict(frees_cells=True) is c
    assert cache.evict(frees_cells=True) is a
    assert cache.evict(frees_cells=True) is None  # only b is left, and a fork shares it
    assert cache.evict() is b and len(cache) == 0 and cache.evict() is None


def test_locked_entries_are_matched_but_never_evicted():
    cache = PrefixCache(0, exact=False)
    pinned, plain = _entry([5] * 30), _entry([6] * 30)
    cache.insert(pinned, locked=True)
    cache.insert(plain)
    cache.lock(plain)
    assert len(cache) == 0 and cache.evict() is None
    assert cache.match([5] * 30 + [1]) == (pinned, 30)
    cache.unlock(plain)
    with pytest.raises(KvforkError, match="not locked"):
        cache.unlock(plain)
    assert cache.evict() is plain
    with pytest.raises(KvforkError, match="already"):
        cache.insert(pinned)


def test_namespaces_keep_approximate_prompts_apart_from_exact_prefixes():
    cache = PrefixCache(0, exact=False)
    exact, composed, other = _entry([4] * 30), _entry([4] * 40), _entry([4] * 50)
    cache.insert(exact)
    cache.insert(composed, namespace=("reuse", "shift"))
    cache.insert(other, namespace=("reuse", "blend"))
    cache.check_integrity()
    prompt = [4] * 60
    assert cache.match(prompt) == (exact, 30)  # never an approximate prompt's cells
    assert cache.match(prompt, namespace=("reuse", "shift")) == (composed, 40)
    assert cache.match(prompt, namespace=("reuse", "blend")) == (other, 50)
    assert cache.match(prompt, namespace=("reuse", "kvcomm")) is None
    assert len(cache) == 3 and cache.evict() is exact  # one LRU over every namespace
    cache.remove(composed)
    cache.check_integrity()
    assert cache.match(prompt, namespace=("reuse", "shift")) is None


def test_an_entry_must_be_idle_in_the_cache_and_keep_its_tokens():
    cache = PrefixCache(0, exact=False)
    with pytest.raises(KvforkError, match="idle"):
        cache.insert(KvSequence(tokens=[1, 2, 3]))  # nothing in the cache yet
    seq = _entry([1, 2, 3])
    cache.insert(seq)
    seq.tokens[1] = 9  # nobody may edit an indexed sequence's cached tokens
    with pytest.raises(KvforkError, match="no longer holds"):
        cache.check_integrity()


def test_the_scheduler_forgets_a_released_prefix(fake_backend):
    be = fake_backend()
    sched = Scheduler(be, EngineConfig(n_ctx=be.n_ctx))
    seq = KvSequence(tokens=list(range(1, 40)))
    sched.submit(seq, SamplingParams(max_tokens=0))
    while sched.has_work:
        sched.step()
    sched.prefixes.insert(seq)
    hit = sched.prefixes.match(list(range(1, 40)) + [3])
    assert hit == (seq, 39)
    child = sched.fork(*hit)
    sched.release(seq)
    assert seq not in sched.prefixes and sched.prefixes.match(list(range(1, 40))) is None
    child.tokens.append(3)
    sched.submit(child, SamplingParams(max_tokens=2, ignore_eos=True))
    while sched.has_work:
        sched.step()
    assert child.generated == be.greedy(list(range(1, 40)) + [3], 2)
    assert seq.seq_id is None and be.positions(child.seq_id) == list(range(41))  # the fork took the cells over


class _Shelf:
    """A lower tier in host memory: what was demoted, by tokens; restores make fresh sequences."""

    def __init__(self, sched: Scheduler | None = None) -> None:
        self.sched = sched
        self.held: list[tuple[int, ...]] = []
        self.placed: list[int] = []

    def demote(self, seq: KvSequence) -> None:
        self.held.append(tuple(seq.tokens[: seq.n_in_kv]))

    def longest(self, tokens) -> int:
        return max((len(h) for h in self.held if tuple(tokens[: len(h)]) == h), default=0)

    def restore(self, tokens) -> KvSequence | None:
        n = self.longest(tokens)
        if not n or self.sched is None:
            return None
        seq = KvSequence(tokens=list(tokens))
        seq.n_in_kv = n  # NOTE: a real tier writes the cells here (Scheduler.adopt); the test looks at the choice
        return seq

    def place_after(self, seq: KvSequence, tokens) -> int:
        n0, k = len(seq.tokens), max((common_prefix(h, tokens) for h in self.held), default=0)
        if self.sched is None or k < n0 + MIN_SHARED:
            return 0
        cells = np.array([(pos, tokens[pos]) for pos in range(n0, k)], dtype=np.int32).tobytes()  # the fake's blob
        self.sched.place(seq, tokens[n0:k], cells)
        self.placed.append(k - n0)
        return k - n0


def test_evicted_entries_go_to_the_lower_tier_and_demote_all_copies_the_rest():
    cache = PrefixCache(0, exact=False)
    cache.lower = shelf = _Shelf()
    a, b, pinned = _entry([1] * 20), _entry([2] * 20), _entry([3] * 20)
    cache.insert(a)
    cache.insert(b)
    cache.insert(pinned, locked=True)
    assert cache.evict() is a and shelf.held == [tuple(a.tokens)]
    cache.demote_all()  # b stays in the cache too; the locked entry is its owner's business
    assert shelf.held == [tuple(a.tokens), tuple(b.tokens)] and b in cache


def test_a_prompt_comes_from_the_tier_that_covers_it_best(fake_backend):
    be = fake_backend()
    sched = Scheduler(be, EngineConfig(n_ctx=be.n_ctx))
    sched.prefixes.lower = shelf = _Shelf(sched)
    live = KvSequence(tokens=list(range(1, 41)))
    sched.submit(live, SamplingParams(max_tokens=0))
    while sched.has_work:
        sched.step()
    sched.prefixes.insert(live)
    prompt = list(range(1, 101))
    shelf.held = [tuple(range(1, 50))]  # 9 more than the live 40: not worth copying cells in
    seq = sched.sequence_for(prompt)
    assert seq.parent is live and seq.n_in_kv == 40 and seq.tokens == prompt
    shelf.held = [tuple(range(1, 81))]  # 40 more: restored
    seq = sched.sequence_for(prompt)
    assert seq.parent is None and seq.n_in_kv == 80 and seq.tokens == prompt
    shelf.sched = None  # a restore that fails falls back to the fork
    assert sched.sequence_for(prompt).parent is live
    assert sched.sequence_for([7, 7, 7]).n_in_kv == 0  # nothing anywhere: a fresh prefill


def test_approximate_entries_are_never_demoted_to_the_lower_tier():
    # the tier serves exact prompts by their tokens: a reuse-mode entry's cells are not what they compute
    cache = PrefixCache(0, exact=False)
    cache.lower = shelf = _Shelf()
    approx, exact = _entry([1] * 20), _entry([2] * 30)
    cache.insert(approx, namespace=("reuse", "shift"))
    cache.insert(exact)
    assert cache.idle_cells() == 30  # only what could be demoted
    assert cache.evict(frees_cells=True, demotable=True) is exact and shelf.held == [tuple(exact.tokens)]
    assert cache.evict(demotable=True) is None and approx in cache
    cache.demote_all()
    assert shelf.held == [tuple(exact.tokens)]
    assert cache.evict() is approx and shelf.held == [tuple(exact.tokens)]
    cache.check_integrity()
    cache.lower = None
    cache.insert(exact_again := _entry([3] * 10))
    assert cache.idle_cells() == 0 and cache.evict(demotable=True) is None and exact_again in cache


def _idle_entry(sched: Scheduler, tokens: list[int]) -> KvSequence:
    seq = KvSequence(tokens=list(tokens))
    sched.submit(seq, SamplingParams(max_tokens=0))
    while sched.has_work:
        sched.step()
    sched.prefixes.insert(seq)
    return seq


def test_park_idle_moves_idle_exact_entries_to_the_lower_tier_only_while_work_runs(fake_backend):
    be = fake_backend()
    sched = Scheduler(be, EngineConfig(n_ctx=be.n_ctx))
    idle = _idle_entry(sched, list(range(1, 41)))
    shared = _idle_entry(sched, list(range(100, 140)))
    pinned = _idle_entry(sched, list(range(200, 230)))
    sched.prefixes.lock(pinned)
    new = KvSequence(tokens=[7] * 12)
    sched.submit(new, SamplingParams(max_tokens=4))
    assert sched.park_idle() == 0 and idle in sched.prefixes  # no lower tier: nothing moves
    sched.prefixes.lower = shelf = _Shelf(sched)
    fork = sched.fork(shared, 40)
    sched.submit(fork, SamplingParams(max_tokens=2), append=[5, 6])
    assert sched.prefixes.idle_cells() == 40  # the idle one's own cells; the forked and the locked are not idle
    assert sched.park_idle() == 1 and shelf.held == [tuple(idle.tokens)]
    assert idle not in sched.prefixes and idle.released and idle.seq_id is None  # its cells are freed
    assert shared in sched.prefixes and pinned in sched.prefixes
    while sched.has_work:
        sched.step()
    assert sched.park_idle() == 0  # nothing runs: idle prefixes cost nobody anything
    sched.prefixes.check_integrity()


@pytest.mark.parametrize("exact", [False, True])
def test_a_stored_part_after_a_live_prefix_is_placed_on_a_fork_of_it(fake_backend, exact):
    # a session's own part after a system prompt every session forks: less than twice the live match, so
    # not restored whole (that would hold the system prompt twice), but its stored cells are placed
    be = fake_backend()
    sched = Scheduler(be, EngineConfig(n_ctx=be.n_ctx, exact=exact))
    live = _idle_entry(sched, list(range(1, 41)))
    sched.prefixes.lower = shelf = _Shelf(sched)
    prompt = list(range(1, 91))
    shelf.held = [tuple(range(1, 71))]
    seq = sched.sequence_for(prompt)
    assert seq.parent is live and seq.n_shared == 40 and seq.tokens == prompt
    assert shelf.placed == [30] and seq.n_in_kv == 70 and be.positions(seq.seq_id) == list(range(70))
    sched.submit(seq, SamplingParams(max_tokens=3))
    while sched.has_work:
        sched.step()
    assert seq.generated == be.greedy(prompt, 3) and seq.n_prompt_computed == 20
    shelf.held = [tuple(range(1, 79))]  # exact mode leaves a fork MIN_SUFFIX tokens to compute, as match does
    again = sched.sequence_for(prompt)
    assert again.n_in_kv == (74 if exact else 78) and again.parent is live
    shelf.held = [tuple(range(1, 50))]  # 9 more than the live 40: computed, not placed
    assert sched.sequence_for(prompt).n_in_kv == 40 and shelf.placed == [30, 34 if exact else 38]
    sched.prefixes.check_integrity()
