"""Pipelines under reuse modes: a document read under agents' own roles, upstream replies placed downstream."""

from __future__ import annotations

import pytest

from kvfork import Agent, InvalidParameter, Pipeline, PipelineError, load_pipeline
from tests.support.text import long_text

DOC = long_text(16)
SAMPLING = {"max_tokens": 20, "ignore_eos": True}  # NOTE: replies long enough (> 16 tokens) to be segments


def _board() -> Pipeline:
    agents = [
        Agent("facts", "List two facts.", role="You are a plant engineer."),
        Agent("risks", "Name one risk.", role="You are a cautious safety inspector who writes formal notes."),
        Agent("chair", "Merge the two notes in one line.", role="You chair the review.",
              inputs=("document", "facts", "risks")),
    ]
    return Pipeline.of(DOC, agents, sampling=SAMPLING)


def test_roles_read_a_placed_document_and_the_chair_placed_replies(gemma):
    result = _board().run(gemma, reuse="shift")
    assert result.ok, result.summary()
    reports = result.reuse
    assert set(reports) == {"facts", "risks", "chair"}
    # the first reader computes the document (exact); the others get it placed
    assert [s.action for s in reports["facts"].segments] == []
    doc_tokens = len(gemma.tokenize(DOC))
    assert [(s.action, s.n_tokens) for s in reports["risks"].segments] == [("placed", doc_tokens)]
    chair = reports["chair"].segments
    assert [s.name for s in chair] == ["document:document", "reply:facts", "reply:risks"]
    assert all(s.action == "placed" and s.n_reused >= 16 for s in chair)
    assert all(r.prompt_tokens == r.prefix_tokens + r.reused_tokens + r.computed_tokens for r in reports.values())
    assert result.reuse_rate > 0.5 and "reuse (shift)" in result.summary()
    # the bill counts placed tokens as reused, not computed
    assert result["facts"].reused_tokens == 0 and result["risks"].reused_tokens == doc_tokens
    # (the chair's prompt ends in its snapshot: its last token is decoded again for the first logits)
    assert result["chair"].reused_tokens == sum(s.n_reused for s in chair) - 1
    assert all(a.prompt_tokens == a.reused_tokens + a.computed_tokens for a in result)
    # from scratch every prompt is computed (+1: the chair's token decoded again is computed either way)
    assert result.unshared_tokens == sum(a.prompt_tokens for a in result) + 1 > result.computed_tokens
    assert all(len(a.tokens) == 20 for a in result)


def test_kvcomm_run_falls_back_first_and_exact_reuse_changes_nothing(gemma, gemma_ref):
    result = _board().run(gemma, reuse="kvcomm")
    assert result.ok, result.summary()
    # no anchors for these agents yet: every segment is prefilled and becomes an anchor
    assert {s.action for r in result.reuse.values() for s in r.segments} == {"fallback"}
    exact = _board().run(gemma, reuse="exact")
    ref = _board().run(gemma_ref, share=False)
    assert not exact.reuse and all(a.tokens == ref[a.name].tokens for a in exact)
    with pytest.raises(InvalidParameter, match="reuse mode"):
        _board().run(gemma, reuse="approximate")


def test_pipeline_files_name_a_reuse_mode(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[pipeline]\nreuse = "blend"\n[documents]\ndocument = "a log"\n'
                    '[[agents]]\nname = "a"\ninstruction = "Summarize."\n')
    assert load_pipeline(path).reuse == "blend"
    path.write_text(path.read_text().replace('"blend"', '"fuzzy"'))
    with pytest.raises(PipelineError, match="reuse"):
        load_pipeline(path)
