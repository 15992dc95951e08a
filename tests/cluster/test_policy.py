"""PrefixPolicy: the router's decisions on fake replicas and a fake clock (no Ray, no model)."""

from __future__ import annotations

import random

import pytest

from kvfork.cluster.policy import PrefixPolicy, Route, RouterConfig
from kvfork.cluster.routekeys import route_keys, route_root
from kvfork.errors import InvalidParameter

ROOT = route_root("fingerprint-of-a-model")
DOC_A = list(range(1000, 1000 + 640))  # 20 blocks
DOC_B = list(range(5000, 5000 + 640))


def route(tokens: list[int], *, max_tokens: int = 32, session: str | None = None) -> Route:
    return Route(tuple(route_keys(ROOT, tokens)), len(tokens), max_tokens, session)


def policy(**knobs: object) -> PrefixPolicy:
    return PrefixPolicy(RouterConfig(**knobs), rng=random.Random(0))


def test_route_keys_are_chained_and_seeded():
    a = route_keys(ROOT, DOC_A + [1, 2, 3] * 20)
    b = route_keys(ROOT, DOC_A + [7, 8, 9] * 20)
    assert len(a) == (640 + 60) // 32
    assert a[:20] == b[:20] and a[20] != b[20]  # same document, then the agents part
    assert route_keys(route_root("another model"), DOC_A)[0] != a[0]
    assert route_keys(ROOT, DOC_A[:31]) == []  # no full block: nothing to match on


def test_a_reported_prefix_wins_and_says_so():
    p = policy()
    p.report("r1", route_keys(ROOT, DOC_B))
    p.report("r2", route_keys(ROOT, DOC_A))
    d = p.choose("q1", route(DOC_A + [1] * 40), ["r1", "r2"], now=0.0)
    assert (d.replica, d.reason, d.matched_tokens) == ("r2", "prefix", 640)


def test_agents_arriving_together_coalesce_on_one_replica():
    p = policy()
    first = p.choose("q0", route(DOC_A + [0] * 40), ["r1", "r2", "r3"], now=0.0)
    assert first.reason == "fallback"
    for i in range(1, 8):  # nothing reported yet: the router's own placement of q0 is what they match
        d = p.choose(f"q{i}", route(DOC_A + [i] * 40), ["r1", "r2", "r3"], now=0.01 * i)
        assert (d.replica, d.reason) == (first.replica, "coalesced")
    other = p.choose("b0", route(DOC_B + [0] * 40), ["r1", "r2", "r3"], now=0.2)
    assert other.reason == "fallback" and other.replica != first.replica  # the least loaded, not the busy one


def test_spills_past_the_load_margin_and_not_before():
    p = policy(spill_tokens=1000)
    p.report("r1", route_keys(ROOT, DOC_A))
    p.report("r2", [])
    assert p.choose("q0", route(DOC_A + [0] * 40, max_tokens=500), ["r1", "r2"], now=0).reason == "prefix"
    assert p.choose("q1", route(DOC_A + [1] * 40, max_tokens=500), ["r1", "r2"], now=0).reason == "prefix"
    d = p.choose("q2", route(DOC_A + [2] * 40, max_tokens=500), ["r1", "r2"], now=0)  # r1 holds ~1,080 more
    assert (d.replica, d.reason, d.matched_tokens) == ("r2", "spilled", 0)
    p.completed("q0")
    p.completed("q1")
    assert p.work("r1") == 0
    assert p.choose("q3", route(DOC_A + [3] * 40), ["r1", "r2"], now=0).replica == "r1"


def test_sessions_stick_even_past_the_margin_until_their_replica_goes():
    p = policy(spill_tokens=0)
    first = p.choose("q0", route(DOC_A, session="pipe-1"), ["r1", "r2"], now=0)
    again = p.choose("q1", route(DOC_B, session="pipe-1"), ["r1", "r2"], now=1)  # another document, same session
    assert (again.replica, again.reason) == (first.replica, "session")
    p.forget(first.replica)  # it died; Serve starts "r3" in its place
    live = [r for r in ("r1", "r2", "r3") if r != first.replica]
    moved = p.choose("q2", route(DOC_A, session="pipe-1"), live, now=2)
    assert moved.reason == "fallback"
    assert p.choose("q3", route(DOC_B, session="pipe-1"), live, now=3) == (moved.replica, "session", 0)


def test_forgetting_a_replica_drops_its_prefixes_and_work():
    p = policy()
    p.report("r1", route_keys(ROOT, DOC_A))
    p.choose("q0", route(DOC_A), ["r1", "r2"], now=0)
    p.forget("r1")
    assert p.work("r1") == 0 and p.matched_blocks("r1", tuple(route_keys(ROOT, DOC_A))) == 0
    assert p.choose("q1", route(DOC_A), ["r2"], now=0).replica == "r2"
    p.keep_only(["r3"])
    assert p.work("r2") == 0


def test_recent_placements_expire_and_reports_replace_them():
    p = policy(recent_s=5.0)
    first = p.choose("q0", route(DOC_A), ["r1", "r2"], now=0)
    p.completed("q0")
    assert p.matched_blocks(first.replica, tuple(route_keys(ROOT, DOC_A))) == 20
    p.choose("x", route([1] * 10), ["r1", "r2"], now=10.0)  # a later call expires the old placement
    assert p.matched_blocks(first.replica, tuple(route_keys(ROOT, DOC_A))) == 0


def test_short_matches_and_retries():
    p = policy(min_match_blocks=4)
    p.report("r1", route_keys(ROOT, DOC_A[:96]))  # 3 blocks: below the minimum
    assert p.choose("q0", route(DOC_A), ["r1", "r2"], now=0).reason == "fallback"
    # NOTE: Serve asks again when every replica was full: the request is counted once
    p.choose("q0", route(DOC_A), ["r1", "r2"], now=0)
    assert p.work("r1") + p.work("r2") == len(DOC_A) + 32
    with pytest.raises(ValueError):
        p.choose("q1", route(DOC_A), [], now=0)


def test_with_a_shared_tier_agents_still_coalesce_while_their_document_prefills():
    p = policy(shared_tier=True)
    first = p.choose("q0", route(DOC_A + [0] * 40, session="pipe-0"), ["r1", "r2", "r3"], now=0.0)
    assert first.reason == "fallback"
    # another pipeline on the same document, before the first finished: nothing is in the tier yet, so any
    # other replica would compute the whole document again
    d = p.choose("q1", route(DOC_A + [1] * 40, session="pipe-1"), ["r1", "r2", "r3"], now=0.1)
    assert (d.replica, d.reason, d.matched_tokens) == (first.replica, "coalesced", 640)
    assert p.work(first.replica) == 640 + 40 + 32 + 40 + 32


def test_with_a_shared_tier_a_hot_document_spreads_over_replicas_by_restoring():
    p = policy(shared_tier=True, restore_ratio=0.02)
    p.report("r1", route_keys(ROOT, DOC_A))
    first = p.choose("q0", route(DOC_A + [0] * 40, session="pipe-0"), ["r1", "r2", "r3"], now=0.0)
    assert (first.replica, first.reason) == ("r1", "prefix")
    p.completed("q0")  # it finished: its prompt is in the tier
    placed = {"r1"}
    for i in range(1, 3):  # idle replicas, but r1 has had all the work lately: the others restore the document
        d = p.choose(f"q{i}", route(DOC_A + [i] * 40, session=f"pipe-{i}"), ["r1", "r2", "r3"], now=float(i))
        assert d.reason == "restored" and d.matched_tokens == 640 and d.replica not in placed
        assert p.work(d.replica) == pytest.approx(40 + 32 + 640 * 0.02)  # a restore, not a prefill
        placed.add(d.replica)
        p.completed(f"q{i}")
    # a request that never finished (it expired, or its replica died) put nothing in the tier
    q = policy(shared_tier=True, inflight_ttl_s=1.0)
    q.choose("x0", route(DOC_B, session="s"), ["r1", "r2"], now=0.0)
    q.choose("x1", route([1] * 10), ["r1", "r2"], now=5.0)
    assert q.choose("x2", route(DOC_B), ["r1", "r2"], now=6.0).reason != "restored"


def test_with_a_shared_tier_a_busy_replica_is_passed_over_past_the_balance_margin():
    p = policy(shared_tier=True, balance_tokens=100)
    p.report("r1", route_keys(ROOT, DOC_A))
    p.report("r2", route_keys(ROOT, DOC_A))
    p.choose("busy", route(DOC_B, max_tokens=1000), ["r1"], now=0.0)  # r1 has 1,640 tokens queued
    d = p.choose("q0", route(DOC_A + [0] * 40), ["r1", "r2"], now=0.0)
    assert (d.replica, d.reason) == ("r2", "prefix")


@pytest.mark.parametrize("knob", ["block_size", "min_match_blocks", "max_recent_keys"])
def test_bad_knobs_are_refused(knob):
    with pytest.raises(InvalidParameter, match=knob):
        RouterConfig(**{knob: 0})
    with pytest.raises(InvalidParameter, match="spill_tokens"):
        RouterConfig(spill_tokens=-1)
    with pytest.raises(InvalidParameter, match="restore_ratio"):
        RouterConfig(restore_ratio=1.5)
    with pytest.raises(InvalidParameter, match="balance_halflife_s"):
        RouterConfig(balance_halflife_s=0)
