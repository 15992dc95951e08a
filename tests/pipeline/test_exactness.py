"""With greedy sampling, every pipeline shape gives the tokens of the same pipeline run without sharing."""

from __future__ import annotations

from kvfork import Agent, Pipeline, PipelineResult
from kvfork.pipeline import chain, debate, map_reduce, review_board, split_document
from tests.support.text import long_text

DOC = long_text(12)
FEW = {"max_tokens": 8}


def _identical(shared: PipelineResult, ref: PipelineResult) -> None:
    assert shared.ok, shared.summary()
    assert ref.ok, ref.summary()
    for agent in shared:
        assert agent.tokens == ref[agent.name].tokens, agent.name
        assert len(agent.completions) == len(ref[agent.name].completions)
    # NOTE: same tokens either way, so what sharing did not compute is exactly what the reference did.
    assert shared.unshared_tokens == ref.computed_tokens == ref.unshared_tokens
    assert ref.saved_tokens == 0


def test_review_board(engines):
    gemma, gemma_ref = engines
    reviewers = {"facts": "List two facts.", "risks": "Name one risk.", "gaps": "What is missing?"}
    p = review_board(DOC, reviewers=reviewers, chair="Merge the reviews in one line.", sampling=FEW)
    shared, ref = p.run(gemma), p.run(gemma_ref, share=False)
    _identical(shared, ref)
    snapshot = shared["facts"].shared_tokens
    assert snapshot > 100 and all(a.shared_tokens == snapshot for a in shared)
    assert shared.shared_prefill_tokens == snapshot and shared.saved_tokens == 3 * snapshot  # 4 readers, 1 prefill
    chair = shared["chair"]
    assert chair.prompt_tokens == chair.reused_tokens + chair.computed_tokens and chair.reused_tokens == snapshot
    assert chair.computed_tokens > sum(len(shared[r].tokens) for r in reviewers)  # the reviews are its own part
    assert all(a.shared_tokens == 0 and a.reused_tokens == 0 for a in ref)


def test_chain(engines):
    gemma, gemma_ref = engines
    p = chain(DOC, writer="Summarize it in one line.", critic="Criticize it.", reviser="Fix it.", sampling=FEW)
    _identical(p.run(gemma), p.run(gemma_ref, share=False))


def test_debate_keeps_each_branch_over_its_rounds(engines):
    gemma, gemma_ref = engines
    p = debate(DOC, question="Who is to blame?", rounds=3, judge="Who won?", sampling={"max_tokens": 6})
    shared, ref = p.run(gemma), p.run(gemma_ref, share=False)
    _identical(shared, ref)
    people = shared["people"]
    assert len(people.completions) == 3
    first, later = people.completions[0], people.completions[1]
    # NOTE: round 2 reuses the snapshot and its own round 1 (kept KV); it computes only the new turn.
    # A reply cut by max_tokens ends in a sampled token that was never decoded, so it is computed now.
    assert later.reused_tokens in (first.prompt_tokens + first.completion_tokens - 1,
                                   first.prompt_tokens + first.completion_tokens)
    assert shared["judge"].computed_tokens > len(people.tokens) + len(shared["design"].tokens)  # all 6 turns


def test_map_reduce_over_chunks(engines):
    gemma, gemma_ref = engines
    chunks = split_document(long_text(24).replace(". ", ".\n"), 150, lambda s: len(gemma.tokenize(s)))
    assert len(chunks) >= 2 and all(len(gemma.tokenize(c)) <= 150 for c in chunks)
    p = map_reduce(chunks, mapper="Summarize.", reducer="Combine.", sampling=FEW)
    shared, ref = p.run(gemma), p.run(gemma_ref, share=False)
    _identical(shared, ref)
    assert shared.saved_tokens == 0  # NOTE: every chunk has one reader: nothing to share, and none claimed


def test_own_roles_get_own_prefill_unless_shared_first(engines):
    gemma, gemma_ref = engines
    agents = [Agent("plain", "List the times."), Agent("critic", "List the faults.", role="You are harsh.")]
    exact = Pipeline.of(DOC, agents, system="You are brief.", sampling=FEW)
    result = exact.run(gemma)
    _identical(result, exact.run(gemma_ref, share=False))
    assert result["critic"].shared_tokens == 0 and result["plain"].shared_tokens == 0  # two snapshots, one reader each
    assert result["critic"].computed_tokens == result["critic"].prompt_tokens
    shared_first = exact.with_layout("shared-first")
    result = shared_first.run(gemma)
    _identical(result, shared_first.run(gemma_ref, share=False))
    assert result["critic"].shared_tokens == result["plain"].shared_tokens > 100
    assert result.saved_tokens == result["critic"].shared_tokens
