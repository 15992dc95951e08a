"""Stub replicas as plain HTTP servers, for routers that sit in front of servers (SMG) in bench/cluster.py.

    python bench/stub_http.py --ports 8101 8102 8103 8104 [--shared-dir DIR] [--prefill-s ...]

One process, one StubReplica (kvfork/cluster/stub.py) per port, each behind its own uvicorn server:
POST /v1/completions takes the prompt as token ids, or as text of space-separated "t<id>" words (what
bench/cluster.py sends a router that routes on text: SMG's cache-aware tree matches characters), computes
the route keys a kvfork replica would, and answers as the Ray arms' stubs do (same sleeps, same LRU).
GET /health, /health_generate, /v1/models and /get_model_info answer what a gateway probes;
GET /stub/stats returns the replica's counters (bench/cluster.py sums them as it does the Ray arms').
"""

from __future__ import annotations

import argparse
import asyncio
import json

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvfork.cluster.bridge import Forwarded, ResponseStart
from kvfork.cluster.routekeys import route_keys, route_root
from kvfork.cluster.stub import StubReplica

ROOT = route_root("stub-http")  # NOTE: the keys only need to agree among these replicas


def tokens_of(prompt: object) -> list[int]:
    if isinstance(prompt, list):
        return [int(t) for t in prompt]
    if isinstance(prompt, str):
        return [int(w[1:]) for w in prompt.split()]
    raise ValueError("prompt must be token ids or 't<id>' words")


def make_app(stub: StubReplica) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        raw = await request.body()
        body = json.loads(raw or b"{}")
        tokens = tokens_of(body.get("prompt"))
        route = {"keys": route_keys(ROOT, tokens), "n_tokens": len(tokens),
                 "max_tokens": int(body.get("max_tokens") or 16)}
        parts = stub.forward(Forwarded("POST", "/v1/completions", body=raw), route)
        start = await anext(parts)
        assert isinstance(start, ResponseStart)
        return StreamingResponse((p async for p in parts if isinstance(p, bytes)), status_code=start.status,
                                 headers=dict(start.headers))

    @app.get("/health")
    @app.get("/health_generate")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "kvfork-bench"}]}

    @app.get("/get_model_info")
    async def model_info() -> dict:
        return {"model_path": "stub", "is_generation": True}

    @app.get("/get_server_info")
    async def server_info() -> dict:
        return {"model_path": "stub"}

    @app.get("/stub/stats")
    async def stats() -> JSONResponse:
        return JSONResponse(dict(stub.counters))

    return app


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ports", type=int, nargs="+", required=True)
    ap.add_argument("--prefill-s", type=float, default=2e-4)
    ap.add_argument("--decode-s", type=float, default=5e-3)
    ap.add_argument("--capacity-blocks", type=int, default=1024)
    ap.add_argument("--shared-dir", default=None)
    args = ap.parse_args()
    servers = []
    for port in args.ports:
        stub = StubReplica(prefill_s=args.prefill_s, decode_s=args.decode_s, capacity_blocks=args.capacity_blocks,
                           shared_dir=args.shared_dir)
        config = uvicorn.Config(make_app(stub), host="127.0.0.1", port=port, log_level="warning",
                                access_log=False)
        servers.append(uvicorn.Server(config))
    await asyncio.gather(*(s.serve() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())
