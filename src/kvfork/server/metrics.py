"""ServerMetrics: the Prometheus series of one server (its own registry, so several apps can live in a process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from kvfork.store.store import SnapshotStore

__all__ = ["ServerMetrics"]

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """Counters the loop thread updates and /metrics renders."""

    def __init__(self, store: SnapshotStore | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prefill_computed = Counter(
            "kvfork_prefill_tokens_computed", "Prompt tokens prefilled (computed) for requests", registry=r)
        self.prefill_reused = Counter(
            "kvfork_prefill_tokens_reused", "Prompt tokens taken from a live shared prefix instead", registry=r)
        self.prefill_placed = Counter(
            "kvfork_prefill_tokens_placed", "Of the reused: placed from segments at another offset (reuse modes)",
            registry=r)
        self.reuse_segments = Counter(
            "kvfork_reuse_segments", "Message segments under reuse modes, by what happened", ["action"], registry=r)
        self.completion_tokens = Counter("kvfork_completion_tokens", "Tokens generated", registry=r)
        self.requests = Counter("kvfork_requests", "Requests finished, by outcome", ["outcome"], registry=r)
        self.ttft = Histogram(
            "kvfork_time_to_first_token_seconds", "Arrival to first generated token", buckets=_TTFT_BUCKETS,
            registry=r)
        self.active_branches = Gauge("kvfork_active_branches", "Branches (choices) generating now", registry=r)
        self.queue_length = Gauge("kvfork_queue_length", "Requests accepted that have no token yet", registry=r)
        self.live_prefixes = Gauge("kvfork_live_prefixes", "Prefilled prefixes kept in the KV cache", registry=r)
        self.parked_prefixes = Counter("kvfork_parked_prefixes", "Idle prefixes moved out of the KV cache to the"
                                       " store's host RAM while other requests ran (Scheduler.park_idle)", registry=r)
        self.kv_cells = Gauge("kvfork_kv_cells", "KV cells: the context's budget, and those held now by live"
                              " sequences (prompt + max_tokens, shared cells once)", ["state"], registry=r)
        self._store = store
        if store is not None:
            self.store_bytes = Gauge("kvfork_store_bytes", "Snapshot bytes held per store tier", ["tier"],
                                     registry=r)
            self.store_budget = Gauge("kvfork_store_budget_bytes", "Configured byte budget per store tier",
                                      ["tier"], registry=r)
            self.store_budget.labels("ram").set(store.config.ram_bytes)
            self.store_budget.labels("disk").set(store.config.disk_bytes)
            self.snapshot_hits = Gauge("kvfork_snapshot_hits", "Snapshot store lookups that restored a prefix",
                                       registry=r)
            self.snapshot_misses = Gauge("kvfork_snapshot_misses", "Snapshot store lookups that found nothing",
                                         registry=r)

    def render(self) -> bytes:
        """The text exposition format, with the store's statistics read now."""
        if self._store is not None:
            stats = self._store.stats()
            self.snapshot_hits.set(stats.hits_ram + stats.hits_disk + stats.hits_shared)
            self.snapshot_misses.set(stats.misses)
            self.store_bytes.labels("ram").set(stats.bytes_ram)
            self.store_bytes.labels("disk").set(stats.bytes_disk)
            self.store_bytes.labels("shared").set(stats.bytes_shared)
        return generate_latest(self.registry)
