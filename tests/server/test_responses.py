"""The Responses API (POST /v1/responses) through the official openai client on Qwen2.5-Coder-0.5B: input
items, tools, structured output and refusals; `stream: true` as OpenAI's typed events, in the order the
client accumulates, equal to the unstreamed response; a client that leaves cancels its generation."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from kvfork.server.responses_stream import response_events
from tests.support.serving import API_KEY

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
FLAT = {"type": "function", "name": "get_weather", "description": "The current weather of a city.",
        "parameters": PARAMS}
ADD = {"type": "function", "name": "add", "description": "Add two integers.",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "required": ["a", "b"]}}
HELLO = {"model": "qwen", "input": "Say hello to Ada in one short sentence.", "temperature": 0,
         "max_output_tokens": 24}


def test_the_responses_api_calls_a_tool_and_takes_its_output_back(qwen_server):
    client = qwen_server.client()
    first = client.responses.create(model="qwen", input="What is the weather in Paris right now?", tools=[FLAT],
                                    temperature=0, max_output_tokens=64)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert first.status == "completed" and first.usage.input_tokens > 0
    follow = [{"role": "user", "content": "What is the weather in Paris right now?"},
              {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees Celsius."}]
    second = client.responses.create(model="qwen", input=follow, tools=[FLAT], tool_choice="none", temperature=0,
                                     max_output_tokens=64, instructions="Answer in one sentence.")
    assert "21" in second.output_text


def test_the_responses_api_structured_output_and_refusals(qwen_server):
    client = qwen_server.client()
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    out = client.responses.create(model="qwen", input="Name a city in France as JSON.", temperature=0,
                                  max_output_tokens=48,
                                  text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
    assert set(json.loads(out.output_text)) == {"city"}
    for kw, param in (({"previous_response_id": "resp_x"}, "previous_response_id"),
                      ({"reasoning": {"effort": "high"}}, "reasoning")):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model="qwen", input="hi", **kw)
        assert e.value.body["param"] == param  # type: ignore[index]


def _check_order(events: list) -> None:
    """Sequence numbers count up from 0; lifecycle first and last; each item opens, streams, then closes."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete") and types.count(types[-1]) == 1
    assert len({e.response.id for e in (events[0], events[1], events[-1])}) == 1
    state: dict[int, str] = {}  # output_index -> "open" | "done"
    for e in events[2:-1]:
        if e.type == "response.output_item.added":
            assert e.output_index not in state and e.output_index == len(state)
            state[e.output_index] = "open"
        elif e.type == "response.output_item.done":
            assert state.get(e.output_index) == "open"
            state[e.output_index] = "done"
        else:
            assert state.get(e.output_index) == "open", e.type
    assert all(s == "done" for s in state.values())


def test_a_streamed_text_response_arrives_as_typed_events(qwen_server):
    events = list(qwen_server.client().responses.create(**HELLO, stream=True))
    _check_order(events)
    types = [e.type for e in events]
    assert types[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == final.output_text
    assert [e.text for e in events if e.type == "response.output_text.done"] == [text]
    usage = final.usage
    assert usage.output_tokens > 0 and usage.total_tokens == usage.input_tokens + usage.output_tokens
    # the same request unstreamed: the same text (temperature 0)
    whole = qwen_server.client().responses.create(**HELLO)
    assert whole.output_text == text and whole.status == final.status


def test_a_streamed_required_call_arrives_as_argument_deltas(qwen_server):
    with qwen_server.client().responses.stream(model="qwen", input="Tell me a joke about numbers.", tools=[FLAT, ADD],
                                               tool_choice="required", temperature=0, max_output_tokens=64) as stream:
        events = list(stream)
        final = stream.get_final_response()
    _check_order(events)
    (call,) = [item for item in final.output if item.type == "function_call"]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == call.arguments and call.name in ("get_weather", "add")
    assert set(json.loads(deltas)) == set(PARAMS["properties"] if call.name == "get_weather" else ("a", "b"))
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == call.arguments and done.item_id == call.id


@pytest.mark.parametrize("kw, param", [({"extra_body": {"frobnicate": 1}}, "frobnicate"),
                                       ({"previous_response_id": "resp_x"}, "previous_response_id"),
                                       ({"max_output_tokens": 10_000}, "max_output_tokens")])
def test_a_bad_streamed_request_is_a_400_before_any_event(qwen_server, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        qwen_server.client().responses.create(model="qwen", input="hi", stream=True, **kw)
    assert e.value.body["param"] == param  # type: ignore[index]


def test_a_stream_cut_at_max_output_tokens_ends_incomplete(qwen_server):
    events = list(qwen_server.client().responses.create(**{**HELLO, "max_output_tokens": 3}, stream=True))
    _check_order(events)
    final = events[-1]
    assert final.type == "response.incomplete" and final.response.incomplete_details.reason == "max_output_tokens"
    assert final.response.output[0].status == "incomplete" and final.response.usage.output_tokens == 3


def test_a_client_that_leaves_mid_stream_cancels_its_generation(qwen_server):
    cancelled = 'kvfork_requests_total{outcome="cancelled"}'
    before = qwen_server.metric(cancelled, 0.0)
    body = {"model": "qwen", "input": "Count from one to a hundred in words.", "temperature": 0,
            "max_output_tokens": 96, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{qwen_server.base_url}/v1/responses", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if "response.output_text.delta" in line:
                break  # one delta, then hang up
    deadline = time.time() + 20
    while qwen_server.metric("kvfork_active_branches") != 0 or qwen_server.metric(cancelled, 0.0) == before:
        assert time.time() < deadline, "the generation of a client that left was not cancelled"
        time.sleep(0.1)
    assert qwen_server.client().responses.create(**{**HELLO, "max_output_tokens": 2}).usage.output_tokens > 0


def _shape(output, *, status, incomplete=None, usage=None, error=None):
    return {"id": "resp_1", "object": "response", "status": status, "output": list(output), "error": error}


async def _collect(chunks: list[bytes]) -> list[dict]:
    async def chat():
        for c in chunks:
            yield c

    out = []
    async for raw in response_events(chat(), _shape):
        out.append(json.loads(raw.decode().split("data: ", 1)[1]))
    return out


def test_an_error_mid_stream_ends_it_with_response_failed():
    error = {"error": {"message": "the engine loop stopped", "type": "server_error", "param": None, "code": None}}
    chunks = [f"data: {json.dumps(c)}\n\n".encode() for c in (
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]}, error)]
    events = asyncio.run(_collect(chunks))
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                           "response.content_part.added", "response.output_text.delta",
                                           "response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"] == "the engine loop stopped"
    assert failed["output"][0]["content"][0]["text"] == "Hel"
