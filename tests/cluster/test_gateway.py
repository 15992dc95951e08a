"""The ingress's Gateway and the ASGI bridge, with fake replicas (no Ray, no model)."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvfork.cluster.bridge import Forwarded, ResponseStart, call_asgi
from kvfork.cluster.ingress import Gateway
from kvfork.cluster.metrics import ClusterMetrics
from kvfork.cluster.routekeys import route_keys, route_root
from tests.support.fakes import FakeModel

ROOT = route_root("fake")


def post(path: str, body: dict, **headers: str) -> Forwarded:
    return Forwarded("POST", path, b"", tuple(headers.items()), json.dumps(body).encode())


class Replica:
    """Answers like a replica would, or fails where told to."""

    def __init__(self, *, fail_before: bool = False, fail_after: int | None = None, stream: bool = False) -> None:
        self.fail_before, self.fail_after, self.stream = fail_before, fail_after, stream
        self.routes: list = []

    async def send(self, request: Forwarded, route):  # the Gateway's `send`
        self.routes.append(route)
        if self.fail_before:
            raise ConnectionError("actor died")
        kind = "text/event-stream" if self.stream else "application/json"
        yield ResponseStart(200, (("content-type", kind), ("content-length", "99")))
        for i in range(3):
            if self.fail_after is not None and i == self.fail_after:
                raise ConnectionError("actor died")
            yield f"part{i};".encode()


def gateway(replica: Replica) -> Gateway:
    return Gateway(FakeModel(), replica.send, root=ROOT, metrics=ClusterMetrics())


def test_generations_carry_their_route_and_others_none():
    replica = Replica()
    gw = gateway(replica)
    tokens = list(range(100, 100 + 96))
    reply = asyncio.run(gw.handle(post("/v1/completions", {"model": "m", "prompt": tokens, "max_tokens": 8,
                                                                "n": 2}, **{"X-Session-Id": "pipe-7"})))
    assert reply.status == 200 and reply.body == b"part0;part1;part2;"
    assert ("content-length", "99") not in reply.headers  # NOTE: the body is re-framed by the ingress
    route = replica.routes[0]
    assert route.keys == tuple(route_keys(ROOT, tokens)) and len(route.keys) == 3
    assert (route.n_tokens, route.max_tokens, route.session) == (96, 16, "pipe-7")
    asyncio.run(gw.handle(Forwarded("GET", "/v1/models")))
    assert replica.routes[1] is None


def test_chat_prompts_are_rendered_with_the_template():
    replica = Replica()
    model = FakeModel()
    messages = [{"role": "system", "content": "be brief " * 30}, {"role": "user", "content": "hi"}]
    asyncio.run(gateway(replica).handle(post("/v1/chat/completions", {"model": "m", "messages": messages})))
    text = model.apply_chat_template([(m["role"], m["content"]) for m in messages], add_generation_prompt=True)
    tokens = model.tokenize(text, add_special=True, parse_special=True)
    assert replica.routes[0].keys == tuple(route_keys(ROOT, tokens)) and replica.routes[0].keys


def test_unreadable_requests_are_forwarded_without_keys():
    replica = Replica()
    reply = asyncio.run(gateway(replica).handle(Forwarded("POST", "/v1/chat/completions", body=b"{not json")))
    assert reply.status == 200 and replica.routes[0].keys == ()  # the replica answers its 400


def test_a_replica_that_dies_gives_a_retryable_503():
    for replica in (Replica(fail_before=True), Replica(fail_after=1)):
        reply = asyncio.run(gateway(replica).handle(post("/v1/completions", {"model": "m", "prompt": "x"})))
        assert reply.status == 503 and ("retry-after", "1") in reply.headers
        assert json.loads(reply.body)["error"]["code"] == "replica_unavailable"


def test_a_stream_that_breaks_ends_with_an_error_event():
    replica = Replica(stream=True, fail_after=2)

    async def run() -> list[bytes]:
        reply = await gateway(replica).handle(post("/v1/completions", {"model": "m", "prompt": "x",
                                                                         "stream": True}))
        assert reply.status == 200 and reply.stream is not None
        return [chunk async for chunk in reply.stream]

    chunks = asyncio.run(run())
    assert chunks[:2] == [b"part0;", b"part1;"]
    assert json.loads(chunks[-1].decode()[len("data: "):])["error"]["code"] == "replica_unavailable"


def test_snapshots_are_refused_at_the_ingress():
    replica = Replica()
    gw = gateway(replica)
    for request in (Forwarded("GET", "/v1/snapshots"),
                    post("/v1/completions", {"model": "m", "prompt": "x", "snapshot_id": "s1"})):
        reply = asyncio.run(gw.handle(request))
        assert reply.status == 400 and "snapshot" in json.loads(reply.body)["error"]["message"]
    assert replica.routes == []


# -- the bridge ------------------------------------------------------------------------------------------
app = FastAPI()
left = asyncio.Event()


@app.post("/echo")
async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"got": (await request.json())["x"], "q": request.url.query,
                         "h": request.headers.get("x-test")}, status_code=201)


@app.get("/slow")
async def slow(request: Request) -> StreamingResponse:
    async def gen():
        try:
            for i in range(1000):
                yield f"data: {i}\n\n"
                await asyncio.sleep(0.01)
        finally:
            left.set()  # NOTE: a client that leaves must stop the generation
    return StreamingResponse(gen(), media_type="text/event-stream")


def test_bridge_runs_a_request_through_the_app():
    async def run() -> list:
        request = Forwarded("POST", "/echo", b"a=1", (("X-Test", "yes"),), json.dumps({"x": 5}).encode())
        return [part async for part in call_asgi(app, request)]

    start, body = asyncio.run(run())
    assert start.status == 201 and json.loads(body) == {"got": 5, "q": "a=1", "h": "yes"}


@pytest.mark.timeout(20)
def test_closing_the_bridge_early_disconnects_the_client():
    async def run() -> None:
        parts = call_asgi(app, Forwarded("GET", "/slow"))
        assert isinstance(await anext(parts), ResponseStart)
        assert (await anext(parts)).startswith(b"data: 0")
        await parts.aclose()
        await asyncio.wait_for(left.wait(), 5)

    asyncio.run(run())
