"""EngineReplica: one Ray Serve replica: one Engine and kvfork's own server app around it, unchanged.

The ingress forwards each HTTP request here (cluster/bridge.py runs it through the app), so a replica
coalesces, forks, batches, reuses and serves adapters exactly as `kvfork serve` does. It tells the
router what it holds through Serve's routing stats: the route keys of every prefix in its prefix cache
(prefilled or in flight) and its counters.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from kvfork.cluster.bridge import Forwarded, ResponseStart, call_asgi
from kvfork.cluster.routekeys import ROUTE_BLOCK, route_keys, route_root
from kvfork.store.fingerprint import model_fingerprint

__all__ = ["EngineReplica"]

log = logging.getLogger(__name__)


class EngineReplica:
    """Serve deployment class: `forward` streams one request's response; `record_routing_stats` reports.

    `options` are `kvfork serve`'s parsed options as a dict (server/cli.py build_server reads them).
    """

    def __init__(self, options: dict[str, Any], block_size: int = ROUTE_BLOCK) -> None:
        from kvfork.server.app import create_app
        from kvfork.server.cli import build_server

        self.engine, self.store, config = build_server(argparse.Namespace(**options))
        self.app = create_app(self.engine, config)
        self.state = self.app.state.kv
        self.state.loop.start()  # NOTE: the app's lifespan is not run through the bridge: start it here
        self.block_size = block_size
        self.root = route_root(model_fingerprint(self.engine.model_path))
        self._keys: dict[tuple[int, int], list[str]] = {}  # (id(seq), n tokens) -> its keys, for the last report
        self._pending: Future[list[str]] | None = None  # the loop thread's answer to the last poll
        self._reported: list[str] = []

    async def forward(self, request: Forwarded, route: dict | None = None) -> AsyncIterator[ResponseStart | bytes]:
        """The response to `request`, streamed (`route` is the router's: unused here)."""
        async for part in call_asgi(self.app, request):
            yield part

    async def record_routing_stats(self) -> dict[str, Any]:
        # NOTE: the loop thread answers between steps, and one prefill chunk can take seconds on a busy CPU:
        # wait briefly, else report the last keys (the router's own recent placements cover the gap) and
        # pick up this answer on the next poll.
        if self._pending is None or self._pending.done():
            if self._pending is not None and self._pending.exception() is None:
                self._reported = self._pending.result()
            self._pending = self.state.loop.call(self._held_keys)
        try:
            self._reported = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._pending)), 0.5)
        except asyncio.TimeoutError:
            pass
        keys = self._reported
        metrics = self.state.metrics.registry
        stats = self.engine.store.stats() if self.engine.store is not None else None

        def sample(name: str) -> float:
            return float(metrics.get_sample_value(name) or 0.0)

        return {
            "keys": keys,
            "prefill_computed": sample("kvfork_prefill_tokens_computed_total"),
            "prefill_reused": sample("kvfork_prefill_tokens_reused_total"),
            "restores_shared": float(stats.hits_shared) if stats is not None else 0.0,
            "requests": _requests(metrics),
        }

    def check_health(self) -> None:
        if not self.state.loop.alive:
            raise RuntimeError("the engine loop has stopped")

    def __del__(self) -> None:
        state = getattr(self, "state", None)
        if state is None:
            return
        state.loop.stop()
        self.engine.close()
        if self.store is not None:
            self.store.close()

    # -- the loop thread ----------------------------------------------------------------------------
    def _held_keys(self) -> list[str]:
        """Route keys of every prefix-cache entry (the loop thread is the only one that reads the cache)."""
        held: dict[tuple[int, int], list[str]] = {}
        for seq in self.engine.scheduler.prefixes.entries():
            ident = (id(seq), len(seq.tokens))
            held[ident] = self._keys.get(ident) or route_keys(self.root, seq.tokens, self.block_size)
        self._keys = held
        out: dict[str, None] = {}
        for keys in held.values():
            out.update(dict.fromkeys(keys))
        return list(out)


def _requests(registry: Any) -> float:
    total = 0.0
    for metric in registry.collect():
        if metric.name == "kvfork_requests":
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total
