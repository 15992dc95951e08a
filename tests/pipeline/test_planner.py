"""The layout planner's prefix figures, on token lists and on real chat-templated prompts."""

from __future__ import annotations

import argparse

from kvfork import Agent, Pipeline
from kvfork.pipeline import common_prefix, shareable_fraction
from kvfork.pipeline.cli import add_pipeline_commands
from tests.support.text import long_text

DOC = long_text(12)


def test_common_prefix_of_token_lists():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 7]]) == 2
    assert common_prefix([[1, 2], [1, 2, 3]]) == 2
    assert common_prefix([[5], [6]]) == 0 and common_prefix([]) == 0
    assert shareable_fraction([[1, 2, 3, 4], [1, 2, 5, 6]]) == 0.5
    assert shareable_fraction([[1, 2, 3]]) == 1.0


def test_plan_of_agents_sharing_a_document(gemma):
    agents = [Agent("a", "Summarize it."), Agent("b", "List the risks."), Agent("c", "Name the crews.")]
    p = Pipeline.of(DOC, agents, system="You are brief.", sampling={"max_tokens": 4})
    prefix = len(gemma.tokenize(gemma.layout(DOC, "You are brief.").prefix, add_bos=True, special=True))
    plan = p.plan(gemma)
    assert plan.common_prefix == prefix  # the instructions start with different tokens
    assert plan.snapshots[0].n_tokens == prefix and plan.snapshots[0].agents == ("a", "b", "c")
    assert abs(plan.shareable_fraction - 3 * prefix / plan.unshared_tokens) < 1e-9
    assert not plan.role_ahead and plan.alternative is None
    result = p.run(gemma)  # the plan's bill is the run's bill
    assert (plan.prefill_tokens, plan.unshared_tokens) == (result.computed_tokens, result.unshared_tokens)


def test_plan_reports_roles_ahead_of_the_document_and_offers_shared_first(gemma):
    agents = [Agent("a", "Summarize it."), Agent("b", "List the risks.", role="You are a risk officer.")]
    p = Pipeline.of(DOC, agents, system="You are brief.")
    plan = p.plan(gemma)
    assert plan.role_ahead == ("b",) and len(plan.snapshots) == 2
    system_only = len(gemma.tokenize(gemma.layout("", "You are brief.").prefix, add_bos=True, special=True))
    assert plan.common_prefix < system_only  # the system messages differ: sharing stops there
    alt = plan.alternative
    assert alt is not None and alt.layout == "shared-first" and len(alt.snapshots) == 1
    assert alt.common_prefix == alt.snapshots[0].n_tokens > plan.common_prefix + 100
    assert alt.prefill_tokens < plan.prefill_tokens
    report = plan.report()
    assert "ahead of the document: b" in report and "shared-first" in report


def test_plan_and_run_commands(tmp_path, capsys, gemma_path):
    f = tmp_path / "p.toml"
    f.write_text(
        '[pipeline]\nsystem = "You are brief."\nchat_template = "gemma"\nn_ctx = 2048\n'
        f'[documents]\ndocument = "{DOC}"\n[sampling]\nmax_tokens = 4\n'
        '[[agents]]\nname = "a"\ninstruction = "Summarize it."\n'
        '[[agents]]\nname = "b"\ninstruction = "Merge."\ninputs = ["document", "a"]\nrole = "You merge."\n'
    )
    parser = argparse.ArgumentParser()
    add_pipeline_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", str(f), "--model", str(gemma_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "longest common token prefix" in out and "opt-in layout 'shared-first'" in out
    args = parser.parse_args(["pipeline", "run", str(f), "--model", str(gemma_path), "--layout", "shared-first"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "=== a (ok" in out and "=== b (ok" in out and "saved:" in out
