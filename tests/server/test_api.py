"""The OpenAI surface through the official client: chat and completions, streamed and not, n > 1, snapshots."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from kvfork.scheduler.prefix_cache import MIN_SUFFIX
from kvfork.server.protocol import ChatRequest
from tests.support.serving import chat_prompt

MSGS = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name three colors."}]


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == ["gemma"]
    assert httpx.get(f"{server.base_url}/health").json()["status"] == "ok"


def test_chat_matches_from_scratch(server, ref):
    out = server.client().chat.completions.create(model="gemma", messages=MSGS, max_tokens=12, temperature=0)
    want = ref.generate(chat_prompt(ref, MSGS), max_tokens=12)
    assert out.choices[0].message.content == want.text
    assert out.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert out.usage.prompt_tokens == len(chat_prompt(ref, MSGS))
    assert out.usage.completion_tokens == len(want.tokens)
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_streaming_equals_whole(server):
    client = server.client()
    whole = client.completions.create(model="gemma", prompt="The water pump", max_tokens=10, temperature=0)
    parts = list(client.completions.create(model="gemma", prompt="The water pump", max_tokens=10, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason in ("length", "stop")
    chunks = list(client.chat.completions.create(model="gemma", messages=MSGS, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model="gemma", messages=MSGS, max_tokens=8, temperature=0)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    # the same prompt again is served from the live prefix
    assert full.usage.prompt_tokens_details.cached_tokens == full.usage.prompt_tokens


def test_n_choices_are_forks_of_one_prefill(server, ref):
    client = server.client()
    greedy = client.chat.completions.create(model="gemma", messages=MSGS, n=3, max_tokens=8, temperature=0)
    want = ref.generate(chat_prompt(ref, MSGS), max_tokens=8).text
    assert [c.message.content for c in greedy.choices] == [want] * 3
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    sampled = client.completions.create(model="gemma", prompt="Once upon a time", n=3, max_tokens=8,
                                        temperature=1.0, seed=7)
    again = client.completions.create(model="gemma", prompt="Once upon a time", n=3, max_tokens=8,
                                      temperature=1.0, seed=7)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in sampled.choices}) > 1  # each choice its own seed


def test_stop_strings(server):
    out = server.client().completions.create(model="gemma", prompt="1, 2, 3, 4, 5,", max_tokens=16, temperature=0,
                                             stop=[" 8"])
    assert " 8" not in out.choices[0].text and out.choices[0].finish_reason == "stop"


def test_snapshot_endpoints(server, ref):
    headers = {"Authorization": "Bearer test-key"}
    base = server.base_url
    doc = [{"role": "system", "content": "You review pump logs."}, {"role": "user", "content": "Log: pump 4 ran hot."},
           {"role": "assistant", "content": "Noted."}]
    made = httpx.post(f"{base}/v1/snapshots", json={"model": "gemma", "messages": doc}, headers=headers, timeout=60)
    assert made.status_code == 201, made.text
    snap = made.json()
    assert snap["n_tokens"] > 10
    assert snap["id"] in [s["id"] for s in httpx.get(f"{base}/v1/snapshots", headers=headers).json()["data"]]
    question = [{"role": "user", "content": "What ran hot?"}]
    out = server.client().chat.completions.create(model="gemma", messages=question, max_tokens=8, temperature=0,
                                                  extra_body={"snapshot_id": snap["id"]})
    # reused: the snapshot, less what a short continuation recomputes (prefix_cache.MIN_SUFFIX)
    assert out.usage.prompt_tokens_details.cached_tokens >= min(snap["n_tokens"], out.usage.prompt_tokens - MIN_SUFFIX)
    assert out.choices[0].message.content == ref.generate(chat_prompt(ref, doc + question), max_tokens=8).text
    assert httpx.delete(f"{base}/v1/snapshots/{snap['id']}", headers=headers).status_code == 200
    gone = httpx.delete(f"{base}/v1/snapshots/{snap['id']}", headers=headers)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "snapshot_not_found"


def test_ignore_eos_generates_max_tokens(server, ref):
    # NOTE: this small model rarely ends a turn on its own, so the parse is checked directly as well
    assert ChatRequest(model="gemma", messages=MSGS, ignore_eos=True).sampling(8).ignore_eos
    assert not ChatRequest(model="gemma", messages=MSGS).sampling(8).ignore_eos
    full = server.client().chat.completions.create(model="gemma", messages=MSGS, max_tokens=24, temperature=0,
                                                   extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 24 and full.choices[0].finish_reason == "length"
    assert full.choices[0].message.content == ref.generate(chat_prompt(ref, MSGS), max_tokens=24, ignore_eos=True).text


def test_kv_cells_gauge(server):
    server.client().completions.create(model="gemma", prompt="Count: 1, 2, 3,", max_tokens=4, temperature=0)
    total = server.metric('kvfork_kv_cells{state="total"}')
    reserved = server.metric('kvfork_kv_cells{state="reserved"}')
    assert total == 2048 and 0 <= reserved <= total


def test_logprobs_chat_and_completions(server, ref):
    client = server.client()
    chat = client.chat.completions.create(model="gemma", messages=MSGS, max_tokens=8, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 8
    assert b"".join(bytes(c.bytes) for c in content).decode() == chat.choices[0].message.content
    want = ref.generate(chat_prompt(ref, MSGS), max_tokens=8, logprobs=2).logprobs
    assert [c.logprob for c in content] == [lp.logprob for lp in want]
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob for c in content)
    text = client.completions.create(model="gemma", prompt="The water pump", max_tokens=6, temperature=0, logprobs=1)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text and len(lp.token_logprobs) == 6
    assert lp.text_offset[0] == 0 and all(len(t) == 1 for t in lp.top_logprobs)
    assert text.choices[0].logprobs is not None
    plain = client.completions.create(model="gemma", prompt="The water pump", max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_logprobs_refused_where_not_served(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="non-streamed"):
        client.chat.completions.create(model="gemma", messages=MSGS, max_tokens=4, logprobs=True, stream=True)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="gemma", messages=MSGS, max_tokens=4, top_logprobs=2)


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("field, value", [
    ("functions", [TOOL["function"]]), ("function_call", "auto"),
    ("logit_bias", {"5": 10}), ("frobnicate", 1),
])
def test_fields_it_does_not_implement_are_refused_by_name(server, field, value):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gemma", messages=MSGS, max_tokens=2, extra_body={field: value})
    assert e.value.body["param"] == field and f"'{field}'" in e.value.body["message"]  # type: ignore[index]
    assert e.value.body["code"] == "unsupported_parameter"  # type: ignore[index]


def test_tools_on_a_model_whose_template_has_no_place_for_them_are_refused(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gemma", messages=MSGS, max_tokens=2, tools=[TOOL])
    assert e.value.body["param"] == "tools" and e.value.body["code"] == "unsupported_parameter"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
        client.chat.completions.create(model="gemma", messages=MSGS, max_tokens=2, tool_choice="required")


def test_default_values_and_documented_ignores_are_accepted(server):
    client = server.client()
    out = client.chat.completions.create(model="gemma", messages=MSGS, max_tokens=2, user="agent-7", tools=[],
                                         tool_choice="none", response_format={"type": "text"}, store=False)
    assert out.choices[0].finish_reason in ("stop", "length")
    named = [{**MSGS[0], "name": "planner"}, MSGS[1]]  # a participant name: no place for it in the template
    assert client.chat.completions.create(model="gemma", messages=named, max_tokens=2).choices
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    calls = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [call]}]
    with pytest.raises(openai.BadRequestError, match="no place for tools"):
        client.chat.completions.create(model="gemma", messages=calls, max_tokens=2)


def test_response_format_json_object_and_json_schema(server):
    client = server.client()
    ask = [{"role": "user", "content": "Give the pump's status as JSON with fields ok (boolean) and valve (integer)."}]
    out = client.chat.completions.create(model="gemma", messages=ask, max_tokens=48, temperature=0,
                                         response_format={"type": "json_object"})
    free = client.chat.completions.create(model="gemma", messages=ask, max_tokens=48, temperature=0)
    # NOTE: gemma3-270m (a base model) fills any object with keys until max_tokens: the grammar decides
    # the shape, not the length (the schema below ends the reply)
    text = out.choices[0].message.content
    assert text.startswith("{") and not free.choices[0].message.content.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "valve": {"type": "integer"}},
              "required": ["ok", "valve"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "status", "schema": schema, "strict": True}}
    stream = client.chat.completions.create(model="gemma", messages=ask, max_tokens=48, temperature=0,
                                            response_format=fmt, stream=True)  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    value = json.loads(text)
    assert isinstance(value["ok"], bool) and isinstance(value["valve"], int) and set(value) == {"ok", "valve"}
    for bad in ({"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}, {"type": "yaml"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="gemma", messages=ask, max_tokens=4, response_format=bad)
        assert e.value.body["param"] == "response_format"  # type: ignore[index]
