"""Pipeline agents with tools: the runner calls the Python functions, sends the results back on the same branch
(only the new tokens are computed) and lets the agent go on. On a scripted fake (the loop's logic, no weights)
and on qwen2.5-coder-0.5b, whose GGUF template lays tools out."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from kvfork import Agent, Engine, Pipeline, Tool, ToolError
from kvfork.config import EngineConfig
from tests.support.fakes import FakeBackend, FakeModel

DOC = "Paris is the capital of France. Lyon is its third city."
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ANSWER = "It is sunny in Paris."


class ToolModel(FakeModel):
    """The fake vocabulary with a Hermes-style template (Qwen2.5's layout of tools, calls and results)."""

    chat_template, knows_tools = "{% tools %} <tool_call>", True

    def show_special(self, texts) -> None:
        pass

    def render_chat(self, messages: list[dict], *, tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> str:
        first = messages[0]["content"] if messages and messages[0]["role"] == "system" else "You are helpful."
        rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
        if tools:
            first += "\n\n# Tools\n<tools>\n" + "\n".join(json.dumps(t) for t in tools) + "\n</tools>"
        out = f"<|im_start|>system\n{first}<|im_end|>\n"
        for i, m in enumerate(rest):
            if m["role"] == "tool":
                out += "<|im_start|>user" if i == 0 or rest[i - 1]["role"] != "tool" else ""
                out += f"\n<tool_response>\n{m['content']}\n</tool_response>"
                out += "<|im_end|>\n" if i == len(rest) - 1 or rest[i + 1]["role"] != "tool" else ""
            elif m.get("tool_calls"):
                out += "<|im_start|>assistant" + (f"\n{m['content']}" if m["content"] else "")
                for c in m["tool_calls"]:
                    args = json.dumps(c["function"]["arguments"], sort_keys=True)
                    out += f'\n<tool_call>\n{{"name": "{c["function"]["name"]}", "arguments": {args}}}\n</tool_call>'
                out += "<|im_end|>\n"
            else:
                out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def apply_chat_template(self, messages, *, add_generation_prompt):
        return self.render_chat([{"role": r, "content": c} for r, c in messages],
                                add_generation_prompt=add_generation_prompt)


class ScriptedBackend(FakeBackend):
    """Greedy decoding writes `script(conversation so far)` in each assistant turn, then ends the turn."""

    def __init__(self, model: ToolModel, script: Callable[[str], str]) -> None:
        super().__init__(4096, 512, model=model)
        self.script = script
        self.prompts: list[str] = []  # the text before each assistant turn, as the model saw it

    def next_logits(self, tokens: list[int]) -> np.ndarray:
        text = self.model.detokenize(tokens)  # type: ignore[union-attr]
        head = "<|im_start|>assistant\n"
        before, _, written = text.rpartition(head)
        if not written:
            self.prompts.append(text)
        reply = self.script(before + head).encode()
        out = np.full(self.n_vocab, -10.0, dtype=np.float32)
        done = len(written.encode())
        out[reply[done] if done < len(reply) else FakeModel.END] = 10.0
        return out


def _engine(script: Callable[[str], str]) -> tuple[Engine, ScriptedBackend]:
    cfg = EngineConfig(n_ctx=4096, n_seq_max=8)
    model = ToolModel()
    backend = ScriptedBackend(model, script)
    return Engine.on(Path("fake.gguf"), model, backend, cfg), backend


def _weather_once(prompt: str, call: str = CALL) -> str:
    return ANSWER if "<tool_response>" in prompt else call


GREEDY = {"temperature": 0.0, "max_tokens": 120}


def test_a_call_runs_the_function_and_the_branch_goes_on_with_only_the_new_tokens():
    seen: list[str] = []

    def get_weather(city: str) -> str:
        """The current weather of a city."""
        seen.append(city)
        return "Sunny, 21 degrees Celsius."

    engine, backend = _engine(_weather_once)
    with engine:
        p = Pipeline.of(DOC, [Agent("w", "What is the weather in Paris?", tools=[get_weather], sampling=GREEDY)])
        result = p.run(engine)
    agent = result["w"]
    assert agent.ok, result.summary()
    assert seen == ["Paris"] and agent.text == ANSWER
    (round1,) = agent.tool_rounds
    assert round1.reply.text == CALL and round1.recomputed_tokens == 0
    (use,) = round1.calls
    assert (use.name, json.loads(use.arguments), use.result, use.ok) == ("get_weather", {"city": "Paris"},
                                                                           "Sunny, 21 degrees Celsius.", True)
    # only the reply's turn end, the tool message and the next header were computed for round 2
    assert round1.appended_text.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\nSunny, 21")
    assert round1.appended_text.endswith("<|im_start|>assistant\n")
    final = agent.completions[-1]
    appended = ToolModel().tokenize(round1.appended_text, add_special=False, parse_special=True)
    assert final.computed_tokens == round1.appended_tokens == len(appended) == 80
    assert final.reused_tokens == round1.reply.prompt_tokens + len(round1.reply.tokens)
    # the model saw exactly what the template renders for the whole conversation
    assert backend.prompts[-1] == engine.model.render_chat(
        [{"role": "user", "content": f"{DOC}\n\nWhat is the weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": use.id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
         {"role": "tool", "tool_call_id": use.id, "content": "Sunny, 21 degrees Celsius."}],
        tools=[Tool.of(get_weather).definition()])
    assert agent.prompt_tokens == agent.reused_tokens + agent.computed_tokens
    assert agent.completion_tokens == len(round1.reply.tokens) + len(final.tokens)


def test_a_call_the_template_writes_otherwise_is_computed_again_from_the_snapshot():
    compact = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'
    engine, backend = _engine(lambda prompt: _weather_once(prompt, compact))
    with engine:
        with pytest.raises(ToolError, match="'<lambda>'"):  # a lambda needs a name the model can write
            Agent("w", "Weather?", tools=[lambda city: "Rain."])
        p = Pipeline.of(DOC, [Agent("w", "Weather?", tools=[Tool.of(lambda city: "Rain.", name="get_weather")],
                                    sampling=GREEDY)])
        agent = p.run(engine)["w"]
    assert agent.ok and agent.text == ANSWER
    (round1,) = agent.tool_rounds
    assert round1.recomputed_tokens > len(compact) and CALL in round1.appended_text
    final = agent.completions[-1]
    assert final.computed_tokens == round1.appended_tokens
    assert CALL in backend.prompts[-1] and compact not in backend.prompts[-1]
    # without sharing the agent's own snapshot is kept for that, and closed with it
    engine, _ = _engine(lambda prompt: _weather_once(prompt, compact))
    with engine:
        alone = p.run(engine, share=False)["w"]
        assert engine.scheduler.table.n_free_ids == engine.config.n_seq_max
    assert alone.ok and alone.tokens == agent.tokens and alone.tool_rounds[0].recomputed_tokens > 0


def test_every_turn_of_a_multi_turn_agent_can_call_tools():
    def script(prompt: str) -> str:  # a call after each user message, an answer after each tool result
        return ANSWER if prompt.rpartition("<|im_start|>user\n")[2].startswith("<tool_response>") else CALL

    engine, _ = _engine(script)
    with engine:
        agent = Pipeline.of(DOC, [Agent("w", "Weather?", turns=2, followup="And now?", sampling=GREEDY,
                                        tools=[Tool.of(lambda city: f"Sunny in {city}.", name="get_weather")])]
                            ).run(engine)["w"]
    assert agent.ok and agent.replies == (ANSWER, ANSWER)
    assert [r.recomputed_tokens for r in agent.tool_rounds] == [0, 0]  # the template renders what the branch holds
    assert all(u.result == "Sunny in Paris." for u in agent.tool_calls)


def test_tool_problems_go_back_to_the_agent_and_are_counted():
    calls = ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
             '<tool_call>\n{"name": "get_weather", "arguments": {"town": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "boom", "arguments": {}}\n</tool_call>\n'
             '<tool_call>\n{"name": oops}\n</tool_call>')

    def boom() -> str:
        raise ValueError("the sensor is down")

    engine, _ = _engine(lambda prompt: _weather_once(prompt, calls))
    with engine:
        agent = Pipeline.of(DOC, [Agent("w", "Weather?", tools=[Tool.of(lambda city: "x", name="get_weather"), boom],
                                        sampling={**GREEDY, "max_tokens": 400})]).run(engine)["w"]
    assert agent.ok and agent.text == ANSWER
    assert agent.tool_problems == {"unknown_tool": 1, "bad_arguments": 1, "raised": 1, "malformed": 1}
    results = [u.result for u in agent.tool_calls]
    assert "no tool named 'get_time'" in results[0] and "missing a required argument: 'city'" in results[1]
    assert results[2] == "Error: ValueError: the sensor is down" and "could not be read" in results[3]
    assert all(r in agent.tool_rounds[0].appended_text for r in results)


def test_more_rounds_than_allowed_fail_the_agent_not_the_pipeline():
    engine, _ = _engine(lambda prompt: CALL)  # it never stops calling
    with engine:
        result = Pipeline.of(DOC, [
            Agent("loop", "Weather?", tools=[Tool.of(lambda city: "Sunny.", name="get_weather")], max_tool_rounds=2,
                  sampling=GREEDY),
            Agent("plain", "Summarize.", sampling={"temperature": 0.0, "max_tokens": 4}),
        ]).run(engine)
    assert result["plain"].ok
    loop = result["loop"]
    assert loop.status == "failed" and "ToolRoundsExceeded" in loop.error and "max_tool_rounds=2" in loop.error
    assert len(loop.tool_rounds) == 2


def test_agents_with_the_same_tools_share_one_snapshot():
    engine, _ = _engine(_weather_once)
    weather = Tool.of(lambda city: "Sunny.", name="get_weather")
    with engine:
        result = Pipeline.of(DOC, [Agent(n, "Weather?", tools=[weather], sampling=GREEDY) for n in ("a", "b")]
                             + [Agent("c", "Summarize.", sampling={"temperature": 0.0, "max_tokens": 4})]).run(engine)
    assert result.ok
    assert result["a"].shared_tokens == result["b"].shared_tokens > 0 and result["c"].shared_tokens == 0
    assert result["a"].tool_rounds and result["b"].tool_rounds and not result["c"].tool_rounds


def test_bad_tools_are_refused_when_the_pipeline_is_built(fake_engine):
    def f(x: int) -> int:
        return x

    for kw, what in [({"tools": [f, f]}, "two tools are named 'f'"), ({"tools": [42]}, "callables or Tools"),
                     ({"tools": [f], "tool_choice": "g"}, "tool_choice"), ({"tool_choice": "required"}, "needs tools"),
                     ({"tools": [f], "max_tool_rounds": 0}, "max_tool_rounds")]:
        with pytest.raises(ToolError, match=what):
            Agent("a", "go", **kw)
    with pytest.raises(ToolError, match="chat=True"):
        Pipeline.of(DOC, [Agent("a", "go", tools=[f])], chat=False)
    with pytest.raises(ToolError, match="no place for tools"):  # FakeModel's template knows no tools
        Pipeline.of(DOC, [Agent("a", "go", tools=[f])]).run(fake_engine())


def test_a_schema_from_a_signature():
    from typing import Literal

    def search(query: str, limit: int = 5, tags: list[str] | None = None, mode: Literal["a", "b"] = "a") -> str:
        """Search the notes.

        Args:
            query: what to look for.
            limit: at most this many hits.
        """
        return query

    tool = Tool.of(search)
    assert tool.description == "Search the notes."
    assert tool.parameters == {"type": "object", "required": ["query"], "properties": {
        "query": {"type": "string", "description": "what to look for."},
        "limit": {"type": "integer", "description": "at most this many hits."},
        "tags": {"type": "array", "items": {"type": "string"}}, "mode": {"enum": ["a", "b"]}}}
    assert tool(query="x") == "x"


@pytest.fixture(scope="module")
def qwen(qwen_path):
    with Engine(qwen_path, n_ctx=2048, n_seq_max=4, progress=False) as engine:
        yield engine


def test_qwen_calls_a_python_tool_and_answers_on_the_same_branch(qwen):
    cities: list[object] = []

    def get_weather(city: str) -> str:
        """The current weather of a city.

        Args:
            city: the city's name.
        """
        cities.append(city)
        return "Sunny, 21 degrees Celsius."

    agent = Agent("weather", "Use the get_weather tool once to find the weather in Paris, then tell me what it said.",
                  tools=[get_weather], tool_choice="required", max_tool_rounds=2,
                  sampling={"temperature": 0.0, "max_tokens": 30})
    system = "You are a helpful assistant. When a tool has answered, reply to the user in plain text."
    result = Pipeline.of(DOC, [agent], system=system).run(qwen)
    a = result["weather"]
    assert a.ok, result.summary()
    (first,) = a.tool_rounds  # required for the first round only (reset_tool_choice), then it answered
    assert cities == ["Paris"] and first.calls[0].name == "get_weather" and first.calls[0].ok
    assert "Sunny, 21 degrees Celsius." in first.appended_text  # the result went back in
    assert first.recomputed_tokens == 0  # the template renders the call as the model wrote it
    # the answer's prompt: only the appended tokens were computed, the rest was the branch's KV
    answer = a.completions[-1]
    assert answer.computed_tokens == first.appended_tokens < answer.prompt_tokens // 4
    assert answer.reused_tokens == first.reply.prompt_tokens + len(first.reply.tokens)
    assert "21" in a.text
