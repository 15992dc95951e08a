"""One agent failing keeps every other result; its downstream agents are skipped with the reason."""

from __future__ import annotations

from kvfork import Agent, Pipeline
from tests.support.text import long_text

DOC = long_text(10)


def test_failing_agents_next_to_successful_ones(engines):
    gemma, gemma_ref = engines
    agents = [
        Agent("good", "List the times.", sampling={"max_tokens": 8}),
        Agent("bad-sampling", "List the faults.", sampling={"temperature": -1.0}),
        Agent("too-long", "Write everything.", sampling={"max_tokens": 100_000}),
        Agent("good-too", "Name the crews.", sampling={"max_tokens": 8}),
        Agent("after-bad", "Merge.", inputs=("document", "bad-sampling", "good")),
        Agent("after-good", "Merge.", inputs=("document", "good", "good-too"), sampling={"max_tokens": 8}),
        Agent("huge-doc", "Summarize.", inputs=("big",)),
    ]
    p = Pipeline(tuple(agents), {"document": DOC, "big": long_text(600)})
    result = p.run(gemma)
    assert [a.status for a in result] == ["ok", "failed", "failed", "ok", "skipped", "ok", "failed"]
    assert "InvalidParameter" in result["bad-sampling"].error and "temperature" in result["bad-sampling"].error
    assert "ContextOverflow" in result["too-long"].error
    assert "ContextOverflow" in result["huge-doc"].error
    assert "skipped: input 'bad-sampling'" in result["after-bad"].error
    # the survivors are what they would have been in a pipeline without the failing agents
    alone = Pipeline.of(DOC, [agents[0], agents[3], agents[5]]).run(gemma_ref, share=False)
    for name in ("good", "good-too", "after-good"):
        assert result[name].tokens == alone[name].tokens and result[name].completion_tokens > 0
    # and the engine is still usable
    assert Pipeline.of(DOC, [agents[0]]).run(gemma)["good"].tokens == result["good"].tokens
