"""Composing prompts from computed tokens and placed segments, on the real test model (gemma3-270m).

Exact mode must give a from-scratch run's tokens; placed segments must carry the document (the
next-token distributions stay close to exact's, far closer than without the document); a kvcomm
anchor of the same segment must correct the placed KV back to nearly exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvfork import Engine
from kvfork.errors import ContextOverflow, InvalidParameter
from kvfork.reuse import ReuseConfig
from tests.support.models import GEMMA
from tests.support.text import long_text

DOC = long_text(14)  # ~280 tokens
SYSTEMS = ["You are a plant engineer.", "You are a cautious safety inspector who writes short notes."]
QUESTION = "\n\nWhat did the night crew report, and when?"


@pytest.fixture(scope="module")
def engine(gemma_path):
    with Engine(gemma_path, n_ctx=4096, n_seq_max=16, **GEMMA) as e:
        yield e


def _prompt(e: Engine, system: str) -> tuple[list[int], list[int], list[int]]:
    head = e.tokenize(f"<start_of_turn>user\n{system}\n\nReport:\n", add_bos=True, special=True)
    tail = e.tokenize(f"{QUESTION}<end_of_turn>\n<start_of_turn>model\n", special=True)
    return head, e.tokenize(DOC), tail


def _logits(e: Engine, parts: list, reuse: ReuseConfig | str, agent: str, tokens: list[int]) -> np.ndarray:
    snap = e.compose(parts, agent=agent, reuse=reuse)
    try:
        return e.next_token_logits(snap, tokens)
    finally:
        snap.close()


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    def logsm(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    lp, lq = logsm(p), logsm(q)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def test_exact_compose_is_a_from_scratch_run(engine, gemma_ref):
    head, doc, tail = _prompt(engine, SYSTEMS[1])
    seg = engine.segment("doc", doc, head=_prompt(engine, SYSTEMS[0])[0])
    snap = engine.compose([head, seg, tail], agent="inspector", reuse="exact")
    try:
        r = snap.reuse
        assert r.reused_tokens == 0 and r.segments[0].action == "computed"
        assert r.prompt_tokens == len(head) + len(doc) + len(tail) == r.prefix_tokens + r.computed_tokens
        with snap.fork() as branch:
            got = branch.generate(max_tokens=12, temperature=0)
    finally:
        snap.close()
    want = gemma_ref.generate(head + doc + tail, max_tokens=12, temperature=0)
    assert got.tokens == want.tokens


def test_shift_at_the_same_offset_reproduces_the_computed_cells(engine, gemma_ref):
    # Placing a segment where it was computed, after the same head, moves nothing: exact tokens back.
    head, doc, tail = _prompt(engine, SYSTEMS[0])
    seg = engine.segment("doc", doc, head=head)
    snap = engine.compose([head, seg, tail], agent="engineer", reuse="shift")
    try:
        assert snap.reuse.reused_tokens == len(doc) and snap.reuse.segments[0].action == "placed"
        with snap.fork() as branch:
            got = branch.generate(max_tokens=12, temperature=0)
    finally:
        snap.close()
    assert got.tokens == gemma_ref.generate(head + doc + tail, max_tokens=12, temperature=0).tokens


def test_placed_document_after_another_prompt_stays_close_to_exact(engine):
    base_head = _prompt(engine, SYSTEMS[0])[0]
    head, doc, tail = _prompt(engine, SYSTEMS[1])  # a different, longer system prompt: a new offset
    assert len(head) != len(base_head)
    seg = engine.segment("doc", doc, head=base_head)
    exact_snap = engine.compose([head, doc, tail], agent="inspector", reuse="exact")
    with exact_snap.fork() as branch:
        answer = list(branch.generate(max_tokens=10, temperature=0).tokens)
    exact = engine.next_token_logits(exact_snap, answer)
    exact_snap.close()
    kl = {mode: _kl(exact, _logits(engine, [head, seg, tail], mode, "inspector", answer))
          for mode in ("shift", "blend")}
    no_doc = _kl(exact, _logits(engine, [head, tail], "exact", "inspector", answer))
    # NOTE: a broken placement (wrong positions, unrotated keys, garbage cells) loses the document
    assert kl["shift"] < no_doc / 10 and kl["blend"] < no_doc / 10, (kl, no_doc)


def test_kvcomm_anchor_corrects_placed_kv_and_gate_falls_back(engine):
    base_head = _prompt(engine, SYSTEMS[0])[0]
    head, doc, tail = _prompt(engine, SYSTEMS[1])
    seg = engine.segment("doc", doc, head=base_head)
    answer = list(engine.tokenize(" The night crew restarted a sensor fault at 10:26."))
    exact = _logits(engine, [head, doc, tail], "exact", "inspector", answer)
    cfg = ReuseConfig(mode="kvcomm", min_anchors=1, delta_tokens=1024)
    first = engine.compose([head, seg, tail], agent="inspector-k", reuse=cfg)  # empty pool: prefill, keep anchor
    assert [s.action for s in first.reuse.segments] == ["fallback"] and first.reuse.reused_tokens == 0
    first.close()
    assert engine.composer.anchors.n_anchors("doc", "inspector-k") == 1
    corrected = _logits(engine, [head, seg, tail], cfg, "inspector-k", answer)
    shifted = _logits(engine, [head, seg, tail], "shift", "inspector-k", answer)
    # the anchor is this very segment's deviation: adding it back makes the placed KV (nearly) exact
    assert _kl(exact, corrected) < _kl(exact, shifted) / 4, (_kl(exact, corrected), _kl(exact, shifted))
    # a pool smaller than min_anchors refuses: prefill, and the result becomes the second anchor
    other = engine.segment("doc", engine.tokenize(long_text(9)), head=base_head)
    snap = engine.compose([head, other, tail], agent="inspector-k", reuse=ReuseConfig(mode="kvcomm", min_anchors=2))
    assert snap.reuse.segments[0].action == "fallback" and snap.reuse.segments[0].n_anchors == 1
    snap.close()
    # gamma 0 and a flat softmax: the weights are uncertain, so it refuses again and adds a third
    strict = ReuseConfig(mode="kvcomm", gamma=0.0, temperature=10.0)
    third = engine.segment("doc", engine.tokenize(long_text(11)), head=base_head)
    snap = engine.compose([head, third, tail], agent="inspector-k", reuse=strict)
    seg0 = snap.reuse.segments[0]
    assert seg0.action == "fallback" and seg0.n_anchors == 2 and seg0.entropy > 0.9
    snap.close()
    assert engine.composer.anchors.n_anchors("doc", "inspector-k") == 3


def test_bad_input_is_refused_and_the_engine_stays_usable(gemma_path, gemma_ref):
    # NOTE: its own small context, so that a segment placed twice overflows it after ~600 computed tokens
    with Engine(gemma_path, n_ctx=1024, n_seq_max=8, progress=False, **GEMMA) as engine:
        head, doc, tail = _prompt(engine, SYSTEMS[0])
        seg = engine.segment("doc", doc, head=head)
        with pytest.raises(InvalidParameter, match="reuse mode"):
            engine.compose([head, seg, tail], agent="a", reuse="approximate")
        with pytest.raises(InvalidParameter, match="head"):
            engine.compose([seg, tail], agent="a", reuse="shift")
        plain = engine.compose([head, tail], agent="a")
        with pytest.raises(InvalidParameter, match="capture"):
            engine.capture_segment(plain, 0, 10_000, "x")
        plain.close()
        huge = engine.segment("log", engine.tokenize(long_text(30)), head=head)
        assert 2 * len(huge.tokens) + len(head) > engine.config.n_ctx > len(huge.tokens) + len(doc) + 2 * len(head)
        with pytest.raises(ContextOverflow):
            engine.compose([head, huge, huge], agent="a", reuse="shift")
        with engine.compose([head, seg, tail], agent="a", reuse="exact") as snap, snap.fork() as branch:
            got = branch.generate(max_tokens=6, temperature=0)
    assert got.tokens == gemma_ref.generate(head + doc + tail, max_tokens=6, temperature=0).tokens
