"""StubReplica: a replica without a model, for measuring routing (bench/cluster.py) and testing it.

NOT a serving engine: it answers every generation with placeholder text. It stands in for an engine
replica where only time matters: it sleeps as long as kvfork would compute (prompt tokens it does not hold
x prefill_s, one decode step per generated token, steps shared by everything decoding at once), holds the
route keys of what it computed in an LRU of `capacity_blocks`, joins a prefill of the same prefix already
under way (as kvfork's prefix cache does), and restores from a shared folder at `restore_ratio` of the
prefill time when one is given. So 4-8 replicas fit on 2 cores and routing policies can be compared.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kvfork.cluster.bridge import Forwarded, ResponseStart
from kvfork.cluster.routekeys import ROUTE_BLOCK

__all__ = ["StubReplica"]


class StubReplica:
    def __init__(self, prefill_s: float = 2e-4, decode_s: float = 0.02, capacity_blocks: int = 4096,
                 shared_dir: str | None = None, restore_ratio: float = 0.02, block_size: int = ROUTE_BLOCK) -> None:
        self.prefill_s = prefill_s
        self.decode_s = decode_s
        self.capacity = capacity_blocks
        self.shared = Path(shared_dir) if shared_dir else None
        self.restore_ratio = restore_ratio
        self.block = block_size
        self._cache: OrderedDict[str, None] = OrderedDict()
        self._pending: dict[str, asyncio.Event] = {}
        self._published: set[str] = set()
        self._engine = asyncio.Lock()  # one prefill at a time, as one llama context computes
        self._working = 0
        self._busy_since = 0.0
        self.name = _replica_name()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stub-shared-writer")
        self.counters = {"prefill_computed": 0.0, "prefill_reused": 0.0, "restores_shared": 0.0, "requests": 0.0,
                         "busy_s": 0.0}

    async def forward(self, request: Forwarded, route: dict | None = None) -> AsyncIterator[ResponseStart | bytes]:
        body = json.loads(request.body or b"{}")
        keys: list[str] = list((route or {}).get("keys") or ())
        n_tokens = int((route or {}).get("n_tokens") or 0)
        max_tokens = int((route or {}).get("max_tokens") or 1)
        stream = bool(body.get("stream"))
        # NOTE: the status and headers go first, naming this replica, so a client (bench/cluster.py --kill-at)
        # knows where a request was in flight; the first chunk still waits for the prefill (TTFT)
        yield ResponseStart(200, (("content-type", "text/event-stream" if stream else "application/json"),
                                  ("x-kvfork-replica", self.name)))
        await self._prefill(keys, n_tokens)
        if stream:
            yield _sse({"choices": [{"index": 0, "text": "x", "finish_reason": None}]})
        self._work_start()
        try:
            await asyncio.sleep(self.decode_s * max_tokens)
        finally:
            self._work_end()
        self.counters["requests"] += 1
        usage = {"prompt_tokens": n_tokens, "completion_tokens": max_tokens, "total_tokens": n_tokens + max_tokens}
        if stream:
            yield _sse({"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": usage})
            yield b"data: [DONE]\n\n"
        else:
            yield json.dumps({"object": "text_completion", "choices": [{"index": 0, "text": "x" * max_tokens,
                              "finish_reason": "length"}], "usage": usage}).encode()

    async def record_routing_stats(self) -> dict[str, Any]:
        return {"keys": list(self._cache), **self.counters}

    # -- what a prompt costs -----------------------------------------------------------------------------
    async def _prefill(self, keys: list[str], n_tokens: int) -> None:
        held = self._held(keys)
        while held < len(keys) and keys[held] in self._pending:  # NOTE: join the prefill under way
            await self._pending[keys[held]].wait()
            held = self._held(keys)
        todo = keys[held:]
        done = asyncio.Event()
        for key in todo:
            self._pending.setdefault(key, done)
        try:
            async with self._engine:
                self._work_start()
                try:
                    restored = self._restorable(keys, held)
                    if restored > held:
                        self.counters["restores_shared"] += 1
                        await asyncio.sleep((restored - held) * self.block * self.prefill_s * self.restore_ratio)
                    computed = max(0, n_tokens - restored * self.block)
                    await asyncio.sleep(computed * self.prefill_s)
                finally:
                    self._work_end()
            self.counters["prefill_computed"] += computed
            self.counters["prefill_reused"] += n_tokens - computed
            for key in keys:
                self._cache[key] = None
                self._cache.move_to_end(key)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            if self.shared is not None:
                # NOTE: write-behind on one writer thread, as the store's shared writer: not on this request's
                # first token, and never two writes of one key at once
                asyncio.get_running_loop().run_in_executor(self._writer, self._publish, keys)
        finally:
            for key in todo:
                if self._pending.get(key) is done:
                    del self._pending[key]
            done.set()

    def _held(self, keys: list[str]) -> int:
        n = 0
        for key in keys:
            if key not in self._cache:
                break
            n += 1
        return n

    def _restorable(self, keys: list[str], held: int) -> int:
        """Blocks of the longest prefix some replica published to the shared folder."""
        if self.shared is None:
            return held
        for i in range(len(keys), held, -1):
            if (self.shared / keys[i - 1]).exists():
                return i
        return held

    def _publish(self, keys: list[str]) -> None:
        """Every prefix of the prompt becomes restorable elsewhere (as the store writes its prefix nodes)."""
        assert self.shared is not None
        self.shared.mkdir(parents=True, exist_ok=True)
        for key in keys:
            if key in self._published:
                continue
            tmp = self.shared / f".{key}.tmp"
            tmp.write_bytes(b"")
            tmp.replace(self.shared / key)
            self._published.add(key)

    def _work_start(self) -> None:
        """busy_s counts wall time while anything (a prefill, or any decode) runs: overlaps once."""
        if self._working == 0:
            self._busy_since = time.monotonic()
        self._working += 1

    def _work_end(self) -> None:
        self._working -= 1
        if self._working == 0:
            self.counters["busy_s"] += time.monotonic() - self._busy_since


def _replica_name() -> str:
    """Serve's id of this replica (what the router and /metrics call it), or "local" outside Serve."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not in a Serve replica (bench/stub_http.py, tests)
        return "local"


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()
