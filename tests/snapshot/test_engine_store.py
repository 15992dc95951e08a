"""Engine + SnapshotStore: a prefill restores the longest stored prefix, in this process or another."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvfork import Engine
from kvfork.runtime.warm import StoreTier
from kvfork.scheduler.prefix_cache import MIN_SUFFIX, common_prefix
from kvfork.store.store import SnapshotStore
from tests.support.snap import ENGINE_KW, MODEL

ASK = "\n\nIn short,"


def _answer(engine: Engine, text: str) -> tuple[int, ...]:
    with engine.prefill(text, chat=False) as snap:
        return snap.fan_out([ASK], max_tokens=12, temperature=0)[0].tokens


@pytest.fixture
def stored(model_path: Path, tmp_path: Path) -> Iterator[Engine]:
    with Engine(MODEL, store=SnapshotStore(tmp_path / "store"), **ENGINE_KW) as eng:
        yield eng


def test_second_prefill_is_a_restore(engine: Engine, stored: Engine, short_doc: str) -> None:
    want = _answer(engine, short_doc)
    assert _answer(stored, short_doc) == want  # miss: prefilled and stored
    st = stored.store.stats()  # type: ignore[union-attr]
    assert st.misses == 1 and st.entries_ram == 1 and st.entries_disk == 1
    with stored.prefill(short_doc, chat=False) as again:
        assert again.prefill_s < 1.0
        assert again.fan_out([ASK], max_tokens=12, temperature=0)[0].tokens == want
    st = stored.store.stats()  # type: ignore[union-attr]
    assert st.hits_ram == 1 and st.tokens_saved == len(stored.tokenize(short_doc, add_bos=True))


def test_shared_prefix_restores_then_prefills_rest(engine: Engine, stored: Engine, short_doc: str) -> None:
    stored.prefill(short_doc, chat=False).close()
    shorter = short_doc[: len(short_doc) // 2]  # stored entry is longer: restored, then trimmed
    longer = short_doc + "\n\nAppendix: the same terms apply to every copy."
    for text in (shorter, longer):
        before = stored.store.stats().tokens_saved  # type: ignore[union-attr]
        assert _answer(stored, text) == _answer(engine, text)
        assert stored.store.stats().tokens_saved > before  # type: ignore[union-attr]


def test_a_stored_part_after_a_live_prefix_is_placed_on_a_fork_of_it(engine: Engine, stored: Engine,
                                                                      short_doc: str) -> None:
    """The live prefix is forked and only the stored cells after it are copied in (Scheduler.sequence_for:
    a stored entry under twice the live match is not restored whole, which would hold the head twice)."""
    more = short_doc + "\n\nAppendix: the same terms apply to every copy."
    with stored.prefill(short_doc[: len(short_doc) * 2 // 3], chat=False) as head:
        stored.prefill(short_doc, chat=False).close()
        stored.scheduler.evict_until(lambda: False)  # every unpinned entry leaves the context (it is stored)
        before = stored.store.stats()  # type: ignore[union-attr]
        n_head, n_doc = head.n_tokens, len(stored.tokenize(short_doc, add_bos=True))
        assert n_doc < 2 * n_head
        with stored.prefill(more, chat=False) as snap:
            assert snap.sequence.parent is head.sequence  # the head's cells are shared, not copied
            assert snap.fan_out([ASK], max_tokens=12, temperature=0)[0].tokens == _answer(engine, more)
        saved = stored.store.stats().tokens_saved - before.tokens_saved  # type: ignore[union-attr]
        # NOTE: the head's last token may tokenize otherwise inside the longer text (the fork then shares one
        # token less), and exact mode on llama.cpp's own kernels backs the placed part off by MIN_SUFFIX
        n_live = common_prefix(head.tokens, stored.tokenize(more, add_bos=True))
        assert n_live >= n_head - 1
        assert n_doc - n_live - MIN_SUFFIX <= saved <= n_doc - n_live


def test_demotion_skips_an_entry_the_store_holds_all_but_a_little_of(engine: Engine, short_doc: str) -> None:
    """Each blob costs the budget all of its cells: an entry whose new part is under MIN_SHARED tokens or
    an eighth of it is not stored again; one with a larger part of its own is (placed back later)."""
    store = SnapshotStore()
    tier = StoreTier(engine, store)
    tail = "\n\nAppendix: " + " ".join(f"clause {i} applies to copy {i + 1}." for i in range(12))
    with engine.prefill(short_doc, chat=False) as doc, \
            engine.prefill(short_doc + " Noted.", chat=False) as near, \
            engine.prefill(short_doc + tail, chat=False) as far:
        assert far.n_tokens - doc.n_tokens >= far.n_tokens // 8
        tier.demote(doc.sequence)
        tier.demote(near.sequence)
        assert store.stats().entries_ram == 1
        tier.demote(far.sequence)
        assert store.stats().entries_ram == 2
    store.close()


def test_sliding_window_falls_back_to_a_prefill(engine: Engine, stored: Engine, long_doc: str) -> None:
    stored.prefill(long_doc, chat=False).close()  # > 512 tokens: cannot be cut back
    text = long_doc[: len(long_doc) * 3 // 4] + " Something else entirely."
    assert _answer(stored, text) == _answer(engine, text)
    st = stored.store.stats()  # type: ignore[union-attr]
    assert st.swa_skips >= 1 and st.misses == 2 and st.tokens_saved == 0


_CHILD = textwrap.dedent(
    """
    import json, sys
    from kvfork import Engine
    from kvfork.store.store import SnapshotStore
    store = SnapshotStore(sys.argv[1])
    with Engine({model!r}, store=store, **{kw!r}) as eng, eng.prefill(sys.argv[2], chat=False) as snap:
        tokens = snap.fan_out([{ask!r}], max_tokens=12, temperature=0)[0].tokens
        print(json.dumps({{"tokens": tokens, "stats": store.stats().as_dict(), "prefill_s": snap.prefill_s}}))
    """
)


def test_restore_in_a_second_process(engine: Engine, stored: Engine, long_doc: str, tmp_path: Path) -> None:
    want = _answer(stored, long_doc)
    script = _CHILD.format(model=MODEL, kw=ENGINE_KW, ask=ASK)
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "store"), long_doc],
        capture_output=True,
        text=True,
        check=True,
    )
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert tuple(child["tokens"]) == want == _answer(engine, long_doc)
    assert child["stats"]["hits_disk"] == 1 and child["stats"]["misses"] == 0
