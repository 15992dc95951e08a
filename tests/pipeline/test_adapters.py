"""Per-agent LoRA decoders in a pipeline (issue 8): one shared prefill, each agent decoded by its adapter."""

from __future__ import annotations

import pytest

from kvfork import Agent, Pipeline
from kvfork.errors import PipelineError
from kvfork.pipeline.loader import load_pipeline
from tests.support.models import load_all
from tests.support.text import long_text


def test_agents_with_their_own_adapters_match_the_unshared_run(gemma, gemma_ref, adapter_files):
    load_all(gemma, adapter_files, "base")
    load_all(gemma_ref, adapter_files, "base")
    agents = (
        Agent("plan", "Plan the repair in one line.", adapter="planner"),
        Agent("code", "Write the check as one shell command.", adapter="coder"),
        Agent("base", "Name one station."),
        Agent("lost", "Say hi.", adapter="no-such-adapter"),
    )
    pipeline = Pipeline(agents, {"document": long_text(14)}, sampling={"max_tokens": 12})
    shared, ref = pipeline.run(gemma), pipeline.run(gemma_ref, share=False)
    for name in ("plan", "code", "base"):
        assert shared[name].ok and shared[name].tokens == ref[name].tokens, name
    assert shared["plan"].tokens != shared["code"].tokens
    assert not shared["lost"].ok and "unknown adapter 'no-such-adapter'" in shared["lost"].error
    assert shared.shared_prefill_tokens == shared["plan"].shared_tokens > 100  # one prefill for every reader


def test_pipeline_file_names_its_adapters(tmp_path, adapter_files):
    (tmp_path / "p.toml").write_text(
        f'[adapters]\nplanner = "{adapter_files["planner"]}"\n[documents]\ndocument = "x"\n'
        '[[agents]]\nname = "a"\ninstruction = "Go."\nadapter = "planner"\n'
    )
    spec = load_pipeline(tmp_path / "p.toml")
    assert spec.adapters == {"planner": adapter_files["planner"]}
    assert spec.pipeline.agents[0].adapter == "planner"
    (tmp_path / "q.toml").write_text('[documents]\ndocument = "x"\n[[agents]]\nname = "a"\ninstruction = "Go."\n'
                                     'adapter = "coder"\n')
    with pytest.raises(PipelineError, match="adapter 'coder' is not in \\[adapters\\]"):
        load_pipeline(tmp_path / "q.toml")
