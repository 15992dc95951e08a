"""The agent-framework examples (examples/langgraph_react.py, openai_agents_handoff.py, autogen_team.py), run
unchanged against one real server on the default model (qwen2.5-coder-0.5b): their tools are really called with
the arguments the question asks for, an answer comes back, and the agents' later requests fork what the earlier
ones prefilled (cached tokens > 0)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from kvfork import Engine
from kvfork.config import ServerConfig
from tests.support.serving import API_KEY, serving

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(name: str) -> ModuleType:
    """Import examples/<name>.py (not a package) as a module; its helpers (examples/_server.py) beside it."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"kvfork_example_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def framework_server(qwen_path):
    """`kvfork serve` in-process on the default model, as the examples expect it (one model, an API key)."""
    # NOTE: one thread: on a CI machine whose cores other test workers use too, ggml's threads spin at their
    # barriers while a sibling waits for a core (minutes instead of seconds); one thread never waits for another
    engine = Engine(qwen_path, n_ctx=4096, n_seq_max=16, n_threads=1, progress=False)
    config = ServerConfig(api_key=API_KEY, model_name="qwen2.5-coder-0.5b", max_tokens=128)
    with serving(engine, config, model="qwen2.5-coder-0.5b") as running:
        yield running
    engine.close()


def _run(framework_server, name: str) -> dict:
    result = example(name).main(f"{framework_server.base_url}/v1", api_key=API_KEY)
    print(name, result)
    return result


def test_langgraph_react_agent_calls_both_tools_and_answers(framework_server):
    out = _run(framework_server, "langgraph_react")
    calls = {name: args["city"].strip().lower() for name, args in out["tool_calls"]}
    assert calls == {"get_temperature": "paris", "get_local_time": "tokyo"}, out["tool_calls"]
    assert len(out["tool_results"]) == 2 and all("Unknown" not in r for r in out["tool_results"])
    answer = out["answer"]  # the Answer schema, filled by the model after the tool results came back
    assert answer is not None and answer["paris_temperature"].strip() and answer["tokyo_time"].strip(), out
    first, *later = out["requests"]
    assert first["tool_calls"] == ["get_temperature", "get_local_time"] and later
    assert all(r["cached_tokens"] > 0 for r in later), out["requests"]
    # the second request forks the whole first prompt (the same tool definitions, the conversation so far)
    assert later[0]["cached_tokens"] >= first["prompt_tokens"], out["requests"]


def test_openai_agents_hand_off_and_call_the_function_tool(framework_server):
    out = _run(framework_server, "openai_agents_handoff")
    assert out["handoffs"] == ["Weather agent"] and out["last_agent"] == "Weather agent", out
    assert [(name, args["city"].strip().lower()) for name, args in out["tool_calls"]] == [("get_weather", "rome")]
    assert "24 degrees" in out["answer"], out["answer"]  # the tool's result is the weather agent's answer
    first, *later = out["requests"]
    assert first["calls"] == ["transfer_to_weather_agent"] and later and later[0]["calls"] == ["get_weather"]
    # the weather agent's request forks the triage agent's: both start with the SDK's handoff prompt
    assert all(r["cached_tokens"] > 0 for r in later), out["requests"]


def test_autogen_team_researches_with_its_tool_and_the_writer_answers(framework_server):
    out = _run(framework_server, "autogen_team")
    assert [(name, args["city"].strip().lower()) for name, args in out["tool_calls"]] == [("get_population", "lyon")]
    sources = [source for source, _ in out["transcript"]]
    assert sources == ["user", "researcher", "writer"], out["transcript"]
    assert "522,000" in out["transcript"][1][1] and out["answer"].strip(), out["transcript"]
    first, *later = out["requests"]
    assert first["agent"] == "researcher" and [r["agent"] for r in later] == ["writer"]
    # the writer's request forks the researcher's: the same team brief opens both system messages
    assert later[0]["cached_tokens"] > 0, out["requests"]
