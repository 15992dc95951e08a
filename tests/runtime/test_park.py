"""Idle snapshots wait in host RAM while other work runs (EngineConfig.park_idle), on the fake backend (no
weights); the real model's outputs after a round trip are in tests/engine/test_fast.py."""

from __future__ import annotations

import pytest

from kvfork.config import EngineConfig
from kvfork.errors import ContextOverflow, InvalidParameter
from kvfork.store.store import SnapshotStore

DOC = "The pump reported a pressure drop at 08:13 on day 1. " * 8
OTHER = "An unrelated log: the fan of rack 4 stopped at noon and restarted. " * 8


def test_an_idle_snapshot_is_parked_while_another_prompt_runs_and_returns_for_its_next_fork(fake_engine):
    engine, ref = fake_engine(), fake_engine()
    a = engine.prefill(DOC)
    before = a.fan_out(["When?"], max_tokens=32)[0]
    b = engine.prefill(OTHER)
    assert a.parked and not b.parked
    assert engine.scheduler.table.cells_reserved() == b.n_tokens  # only b's cells are in the context
    after = a.fan_out(["When?"], max_tokens=32)[0]
    assert not a.parked and b.parked  # the fan-out needed a; b waits in host RAM in its turn
    assert after.tokens == before.tokens == ref.generate(ref.prompt_tokens(DOC, "When?"), max_tokens=32).tokens
    assert after.reused_tokens == a.n_tokens  # forked from the restored cells, not prefilled again


def test_a_document_whose_template_head_a_later_prompt_forked_is_parked_all_the_same(fake_engine):
    engine, ref = fake_engine(), fake_engine()
    decoded = engine.ctx.decodes  # the fake backend's record of every batch
    system = "You are a careful analyst. Answer from the report only, briefly and precisely."
    a = engine.prefill(DOC, system=system)
    n = sum(len(b) for b in decoded)
    b = engine.prefill(OTHER, system=system)
    # a was parked first: forked for its system prompt, it would have stayed in the context for their sake
    assert a.parked and sum(len(x) for x in decoded) - n == b.n_tokens
    assert engine.scheduler.table.cells_reserved() == b.n_tokens
    out = a.fan_out(["When?"], max_tokens=32)[0]
    assert out.tokens == ref.generate(ref.prompt_tokens(DOC, "When?", system=system), max_tokens=32).tokens
    engine.prefill(OTHER + " Appendix: the fan was replaced.", system=system)  # extends b: b comes back
    assert not b.parked


def test_a_short_run_parks_nothing(fake_engine):
    engine = fake_engine()
    a = engine.prefill(DOC)
    with engine.prefill(OTHER) as b:
        a.unpark()
        b.fork().send("Go").generate(max_tokens=1)  # a few tokens: a round trip would cost more than a's cells
        assert not a.parked


def test_a_snapshot_a_branch_shares_stays(fake_engine):
    engine = fake_engine()
    a = engine.prefill(DOC)
    branch = a.fork()
    engine.prefill(OTHER)
    assert not a.parked and not a.park()
    branch.close()
    assert a.park() and a.parked


def test_a_prefill_of_a_parked_prefix_forks_it_instead_of_computing_it(fake_engine):
    engine = fake_engine()
    decoded = engine.ctx.decodes  # the fake backend's record of every batch
    a = engine.prefill(DOC, chat=False)
    engine.prefill(OTHER, chat=False)
    assert a.parked
    n = sum(len(b) for b in decoded)
    longer = engine.prefill(DOC + " More text follows here.", chat=False)
    assert sum(len(b) for b in decoded) - n == longer.n_tokens - a.n_tokens  # only the extension
    assert not a.parked


def test_a_parked_snapshot_that_finds_no_room_stays_parked_and_loses_nothing(fake_engine):
    engine, ref = fake_engine(n_ctx=800), fake_engine()
    a = engine.prefill(DOC, chat=False)
    b = engine.prefill(OTHER, chat=False)
    held = b.fork()  # b cannot be parked while a branch shares it
    assert a.parked
    with pytest.raises(ContextOverflow):
        a.fork()
    assert a.parked
    held.close()
    assert b.park()
    out = a.fork().send(" next").generate(max_tokens=4)
    assert out.tokens == ref.generate(ref.tokenize(DOC, add_bos=True) + ref.tokenize(" next"), max_tokens=4).tokens


def test_a_parked_snapshot_copies_out_and_closes_without_coming_back(fake_engine):
    engine = fake_engine()
    a = engine.prefill(DOC)
    engine.prefill(OTHER)
    host = a.to_host()
    assert a.parked and host.n_tokens == a.n_tokens
    a.close()
    assert engine.restore(host).n_tokens == a.n_tokens


def test_park_idle_is_off_in_exact_mode_and_can_be_turned_off(fake_engine):
    assert EngineConfig().park_idle and not EngineConfig(exact=True).park_idle
    with pytest.raises(InvalidParameter, match="park_idle"):
        EngineConfig(exact=True, park_idle=True)
    engine = fake_engine(park_idle=False)
    a = engine.prefill(DOC)
    engine.prefill(OTHER)
    assert not a.parked


@pytest.mark.parametrize("with_store", [True, False])
def test_a_composed_heads_idle_entry_waits_in_the_store_while_other_work_runs(fake_engine, with_store):
    engine = fake_engine(store=SnapshotStore() if with_store else None)
    decoded = engine.ctx.decodes  # the fake backend's record of every batch
    head = engine.tokenize(DOC, add_bos=True)
    engine.compose([head, engine.tokenize(" When?")], agent="a").close()
    held = engine.scheduler.table.cells_reserved()
    assert held == len(head)  # the head stays as the prefix cache's own entry for the next prompt
    engine.generate(OTHER, max_tokens=8)  # other work: with a store, the idle head waits there
    assert (engine.scheduler.table.cells_reserved() == 0) is with_store
    n = sum(len(b) for b in decoded)
    again = engine.compose([head, engine.tokenize(" Why?")], agent="a")
    assert again.reuse is not None and again.reuse.prefix_tokens == len(head)  # restored or forked, not computed
    assert sum(len(b) for b in decoded) - n == len(engine.tokenize(" Why?"))
