"""The pipeline definition and its DAG checks: every mistake is a PipelineError before anything runs."""

from __future__ import annotations

import pytest

from kvfork import Agent, Pipeline, PipelineError, load_pipeline
from kvfork.pipeline import chain, debate, map_reduce, review_board, split_document

DOC = "A short document."


def test_duplicate_names_missing_inputs_and_cycles_are_clear_errors():
    with pytest.raises(PipelineError, match="duplicate agent name 'a'"):
        Pipeline.of(DOC, [Agent("a", "x"), Agent("a", "y")])
    with pytest.raises(PipelineError, match="reads 'ghost', which is neither a document nor an agent"):
        Pipeline.of(DOC, [Agent("a", "x", inputs=("document", "ghost"))])
    with pytest.raises(PipelineError, match="cycle: a -> b -> a|cycle: b -> a -> b"):
        Pipeline.of(DOC, [Agent("a", "x", inputs=("b",)), Agent("b", "y", inputs=("a",))])
    with pytest.raises(PipelineError, match="cycle"):
        three = [Agent("a", "x", inputs=("c",)), Agent("b", "y", inputs=("a",)), Agent("c", "z", inputs=("b",))]
        Pipeline.of(DOC, three)
    with pytest.raises(PipelineError, match="lists itself"):
        Pipeline.of(DOC, [Agent("a", "x", inputs=("a",))])


def test_other_definition_errors():
    with pytest.raises(PipelineError, match="reads 2 documents"):
        Pipeline([Agent("a", "x", inputs=("d1", "d2"))], {"d1": "one", "d2": "two"})
    with pytest.raises(PipelineError, match="need equal turns"):
        Pipeline.of(DOC, [Agent("a", "x", turns=2, peers=("b",)), Agent("b", "y", turns=3)])
    with pytest.raises(PipelineError, match="peer 'zz'"):
        Pipeline.of(DOC, [Agent("a", "x", turns=2, peers=("zz",))])
    with pytest.raises(PipelineError, match="layout must be one of"):
        Pipeline.of(DOC, [Agent("a", "x")], layout="whatever")  # type: ignore[arg-type]
    with pytest.raises(PipelineError, match="non-empty instruction"):
        Agent("a", " ")
    with pytest.raises(PipelineError, match="at least one agent"):
        Pipeline.of(DOC, [])


def test_levels_of_the_example_shapes():
    assert review_board(DOC).graph.levels == (("timeline", "root-cause", "actions", "numbers"), ("chair",))
    assert chain(DOC).graph.levels == (("writer",), ("critic",), ("reviser",))
    assert debate(DOC, rounds=3).graph.levels == (("people", "design"), ("judge",))
    assert map_reduce(["a", "b"]).graph.levels == (("map-1", "map-2"), ("reduce",))
    graph = review_board(DOC).graph
    assert graph.downstream["timeline"] == ("chair",) and graph.inputs["chair"][0] == "timeline"


def test_split_document_respects_the_budget():
    text = "\n\n".join(f"Paragraph {i}: " + "word " * (5 + i % 7) for i in range(20))
    chunks = split_document(text, 30, lambda s: len(s.split()))
    assert len(chunks) > 2 and all(len(c.split()) <= 30 for c in chunks)
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())


def test_loader_reads_toml_and_reports_mistakes(tmp_path):
    (tmp_path / "doc.txt").write_text("Hello document.")
    good = tmp_path / "p.toml"
    good.write_text(
        '[pipeline]\nname = "t"\nsystem = "S"\nlayout = "shared-first"\nmodel = "gemma3-270m"\n'
        '[documents]\nreport = { file = "doc.txt" }\nnote = "inline"\n[sampling]\nmax_tokens = 7\n'
        '[[agents]]\nname = "a"\ninstruction = "Do a."\ninputs = ["report"]\nrole = "R"\n'
        '[[agents]]\nname = "b"\ninstruction = "Do b."\ninputs = ["note", "a"]\nsampling = { temperature = 0.5 }\n'
    )
    spec = load_pipeline(good)
    p = spec.pipeline
    assert spec.model == "gemma3-270m" and p.name == "t" and p.layout == "shared-first" and p.system == "S"
    assert p.documents == {"report": "Hello document.", "note": "inline"}
    assert p.sampling.max_tokens == 7 and p.agent("b").params(p.sampling).temperature == 0.5
    bad = tmp_path / "bad.toml"
    bad.write_text('[[agents]]\nname = "a"\ninstruction = "x"\ninputs = ["b"]\n[[agents]]\nname = "b"\n'
                   'instruction = "y"\ninputs = ["a"]\n')
    with pytest.raises(PipelineError, match="bad.toml: the agents form a cycle"):
        load_pipeline(bad)
    bad.write_text('[[agents]]\nname = "a"\ninstruction = "x"\ncolour = "red"\n')
    with pytest.raises(PipelineError, match="unknown key"):
        load_pipeline(bad)
    bad.write_text("[[agents]\n")
    with pytest.raises(PipelineError, match="not valid TOML"):
        load_pipeline(bad)
    with pytest.raises(PipelineError, match="cannot read"):
        load_pipeline(tmp_path / "missing.toml")
