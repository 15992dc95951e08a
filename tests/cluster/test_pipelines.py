"""Pipelines over replicas: placement (pure) and `kvfork pipeline run ... --replicas 2` on gemma."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvfork.cluster.pipelines import place
from kvfork.pipeline.loader import load_pipeline

PIPE = """
[pipeline]
name = "{name}"
system = "Answer in one short sentence."

[documents]
report = "{doc}"

[sampling]
max_tokens = 8

[[agents]]
name = "who"
instruction = "Who is named in the report?"
inputs = ["report"]

[[agents]]
name = "what"
instruction = "What happened?"
inputs = ["report"]
"""
DOC_A = "Ana Lima restarted pump 3 at 04:10 after a pressure alarm. " * 20
DOC_B = "The night shift logged a leak near valve 12 and closed the line. " * 20


def files(tmp_path: Path) -> list[Path]:
    out = []
    for name, doc in (("a1", DOC_A), ("b1", DOC_B), ("a2", DOC_A)):
        path = tmp_path / f"{name}.toml"
        path.write_text(PIPE.format(name=name, doc=doc))
        out.append(path)
    return out


def test_pipelines_on_one_document_go_together_and_the_rest_spread(tmp_path):
    specs = [load_pipeline(p) for p in files(tmp_path)]
    where = place(specs, 2)
    assert where[0] == where[2] != where[1]
    assert place(specs, 1) == [0, 0, 0]
    assert len(set(place(specs * 2, 4))) == 2  # two distinct documents: two replicas used, not four


@pytest.mark.timeout(300)
def test_pipeline_run_on_two_replicas(ray_serve, gemma_path, tmp_path, capsys):
    from kvfork.cli import main

    paths = [str(p) for p in files(tmp_path)]
    code = main(["pipeline", "run", *paths, "--replicas", "2", "--model", str(gemma_path),
                 "--chat-template", "gemma", "--n-ctx", "2048"])
    out = capsys.readouterr().out
    assert code == 0, out
    placed = {line.split(":")[0].split()[-1]: line.rsplit(" ", 1)[-1] for line in out.splitlines()
              if line.startswith("##### ")}
    assert placed["a1.toml"] == placed["a2.toml"] != placed["b1.toml"]
    assert out.count("=== who (ok") == 3 and out.count("=== what (ok") == 3
