"""Errors come back as OpenAI error objects with the right status; a client that leaves frees its branch."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from kvfork.config import ServerConfig
from kvfork.server.errors import APIError
from kvfork.server.job import Job, Sink
from kvfork.server.loop import EngineLoop
from kvfork.server.metrics import ServerMetrics
from tests.support.text import long_text

AUTH = {"Authorization": "Bearer test-key"}


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_bad_requests(server):
    url = f"{server.base_url}/v1/chat/completions"
    bad_json = httpx.post(url, content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert _error(bad_json, 400)["code"] == "invalid_json"
    huge = httpx.post(url, content=b"x" * 300_000, headers={**AUTH, "Content-Type": "application/json"})
    assert _error(huge, 413)["code"] == "request_too_large"
    nokey = httpx.post(url, json={"model": "gemma", "messages": [{"role": "user", "content": "hi"}]})
    assert _error(nokey, 401)["code"] == "invalid_api_key"
    missing = httpx.post(url, json={"model": "gemma"}, headers=AUTH)
    assert _error(missing, 400)["param"] == "messages"

    client = server.client()
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=msgs, max_tokens=4)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gemma", messages=msgs, max_tokens=4, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gemma", messages=msgs, max_tokens=4, n=9)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gemma", prompt=long_text(200), max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    # and the server still serves
    assert client.completions.create(model="gemma", prompt="Hello", max_tokens=2).choices[0].text is not None


def test_disconnect_mid_stream_frees_the_branch(server):
    body = {"model": "gemma", "prompt": "Count slowly: one, two,", "max_tokens": 64, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    deadline = time.time() + 20
    while server.metric("kvfork_active_branches") != 0:
        assert time.time() < deadline, "the branch of a client that left is still generating"
        time.sleep(0.1)
    assert server.metric('kvfork_requests_total{outcome="cancelled"}', 0.0) >= 1
    out = server.client().completions.create(model="gemma", prompt="Hello", max_tokens=2)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_queue_cap_is_429(gemma):
    loop = EngineLoop(gemma, ServerConfig(max_queued=1), ServerMetrics())  # never started: nothing runs
    loop.submit(Job(tokens=[1, 2], params=[], sink=Sink.__new__(Sink)))
    with pytest.raises(APIError) as e:
        loop.submit(Job(tokens=[1, 2], params=[], sink=Sink.__new__(Sink)))
    assert e.value.status == 429 and e.value.body()["error"]["type"] == "rate_limit_error"


def test_disconnect_while_waiting_for_a_whole_answer(server):
    cancelled0 = server.metric('kvfork_requests_total{outcome="cancelled"}', 0.0)
    body = {"model": "gemma", "prompt": "List the numbers from one to a hundred:", "max_tokens": 64, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.base_url}/v1/completions", json=body, headers=AUTH, timeout=0.3)
    deadline = time.time() + 20
    while server.metric('kvfork_requests_total{outcome="cancelled"}', 0.0) == cancelled0:
        assert time.time() < deadline, "the request of a client that left was not cancelled"
        time.sleep(0.1)
    assert server.metric("kvfork_active_branches") == 0
