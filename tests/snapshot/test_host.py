"""HostSnapshot: copy out, restore into the same or another context, token-identical output."""

from __future__ import annotations

import pytest

from kvfork import Engine, SnapshotMismatch
from tests.support.snap import ENGINE_KW, MODEL

ASK = ["\n\nIn short,", "\n\nThe main point is"]


def _greedy(snapshot, n: int = 16) -> list[tuple[int, ...]]:
    return [c.tokens for c in snapshot.fan_out(ASK, max_tokens=n, temperature=0)]


def test_restore_into_another_engine_is_exact_and_leaves_others_alone(engine: Engine, long_doc: str) -> None:
    with engine.prefill(long_doc, chat=False) as live:
        expected = _greedy(live)
        host = live.to_host()
    assert host.n_tokens > 512  # beyond gemma's sliding window
    with Engine(MODEL, **ENGINE_KW) as other:
        bystander = other.prefill("A different document that must stay exactly as it was.", chat=False)
        before = [c.tokens for c in bystander.fan_out([" And"], max_tokens=8, temperature=0)]
        restored = other.restore(host)
        assert restored.tokens == list(host.tokens)
        assert _greedy(restored) == expected
        assert [c.tokens for c in bystander.fan_out([" And"], max_tokens=8, temperature=0)] == before
        branch = restored.fork().send("\n\nFinally,")
        assert branch.generate(max_tokens=4, temperature=0).completion_tokens > 0
        branch.close()
        restored.close()


def test_restore_twice_in_the_same_engine(engine: Engine, short_doc: str) -> None:
    with engine.prefill(short_doc, chat=False) as live:
        host = live.to_host()
        expected = _greedy(live, 8)
    a, b = engine.restore(host), engine.restore(host)
    assert _greedy(a, 8) == expected == _greedy(b, 8)
    a.close()
    b.close()


def test_trimmed_restore_matches_a_fresh_prefill(engine: Engine, short_doc: str) -> None:
    with engine.prefill(short_doc, chat=False) as live:
        host = live.to_host()
    keep = host.n_tokens - 40
    with engine.restore(host, keep=keep) as cut:
        assert cut.n_tokens == keep
        got = cut.fan_out(ASK[:1], max_tokens=8, temperature=0)[0].tokens
    fresh = engine.generate(list(host.tokens[:keep]) + engine.tokenize(ASK[0]), max_tokens=8, temperature=0)
    assert got == fresh.tokens


def test_trimming_into_the_window_past_is_refused(engine: Engine, long_doc: str) -> None:
    with engine.prefill(long_doc, chat=False) as live:
        host = live.to_host()
    with pytest.raises(SnapshotMismatch, match="sliding window"):
        engine.restore(host, keep=host.n_tokens - 40)
