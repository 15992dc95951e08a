"""Function calling through the server on the default model (Qwen2.5-Coder-0.5B, whose GGUF carries a
Jinja template with tools): the template lays tools out, calls come back in OpenAI's shape, streamed and
not, a required call is well-formed by construction, and bad tool input gets OpenAI 400s."""

from __future__ import annotations

import json

import openai
import pytest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def _ask(client, messages, **kw):
    return client.chat.completions.create(model="qwen", messages=messages, temperature=0, max_tokens=64, **kw)


def test_a_tool_call_comes_back_in_openais_shape_and_the_result_goes_back_in(qwen_server):
    client = qwen_server.client()
    out = _ask(client, ASK, tools=[WEATHER, ADD])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # the next turn: the assistant's call and the tool's result, answered in text
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees Celsius."}]
    # NOTE: tool_choice "none": this 0.5B model would call the tool again rather than answer
    again = _ask(client, turn, tools=[WEATHER, ADD], tool_choice="none")
    assert again.choices[0].finish_reason == "stop" and not again.choices[0].message.tool_calls
    assert "21" in again.choices[0].message.content
    # another agent with the same tools forks the first prompt: the tool definitions are not prefilled again
    rome = _ask(client, [{"role": "user", "content": "What is the weather in Rome right now?"}], tools=[WEATHER, ADD])
    assert rome.usage.prompt_tokens_details.cached_tokens >= out.usage.prompt_tokens - 12


def test_required_and_named_calls_are_well_formed_by_construction(qwen_server):
    client = qwen_server.client()
    talk = [{"role": "user", "content": "Tell me a joke about numbers."}]
    # NOTE: how many calls the model makes is its choice (parallel calls are allowed); each must be well formed
    out = _ask(client, talk, tools=[WEATHER, ADD], tool_choice="required")
    assert out.choices[0].message.tool_calls
    for call in out.choices[0].message.tool_calls:
        args = json.loads(call.function.arguments)
        assert (call.function.name, set(args)) in (("get_weather", {"city"}), ("add", {"a", "b"}))
    named = _ask(client, talk, tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}})
    assert named.choices[0].message.tool_calls
    for call in named.choices[0].message.tool_calls:
        args = json.loads(call.function.arguments)
        assert call.function.name == "add" and isinstance(args["a"], int) and isinstance(args["b"], int)


def test_streamed_calls_arrive_as_tool_call_deltas(qwen_server):
    client = qwen_server.client()
    chunks = list(_ask(client, ASK, tools=[WEATHER], stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"] and calls[0].index == 0 and calls[0].id
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


@pytest.mark.parametrize("kw, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frob"}}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_tools_and_choices_are_400s(qwen_server, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        _ask(qwen_server.client(), ASK, **kw)
    assert e.value.body["param"] == param  # type: ignore[index]


def test_a_tool_message_without_a_matching_call_is_a_400(qwen_server):
    stray = [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "Sunny."}]
    with pytest.raises(openai.BadRequestError, match="no earlier assistant"):
        _ask(qwen_server.client(), stray, tools=[WEATHER])

