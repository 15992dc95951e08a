"""ClusterMetrics: what the ingress's /metrics shows: routing decisions, and each replica's reported counters.

The request router runs in the ingress process (it lives where the deployment handle is), so both write
to the one registry of that process (`CLUSTER`). Replica figures come from their routing stats (polled
by Serve every `stats_period_s`), labelled by replica, plus cluster totals.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CLUSTER", "ClusterMetrics", "REPLICA_COUNTERS", "cluster_metrics"]

# NOTE: what each replica reports in its routing stats (cluster/replica.py), summed for the cluster.
REPLICA_COUNTERS = {
    "prefill_computed": "Prompt tokens the replica prefilled (computed)",
    "prefill_reused": "Prompt tokens the replica took from a prefix it held, or restored",
    "restores_shared": "Prefixes the replica restored from the shared snapshot tier",
    "requests": "Requests the replica finished",
    "busy_s": "Seconds the replica's engine was computing (reported by the benchmark's stub replicas)",
}


class ClusterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.decisions = Counter("kvfork_route_decisions", "Requests routed, by reason", ["reason"], registry=r)
        self.route_seconds = Histogram("kvfork_route_decision_seconds", "Time to choose a replica", registry=r,
                                       buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1))
        self.requests = Counter("kvfork_ingress_requests", "Requests through the ingress, by outcome", ["outcome"],
                                registry=r)
        self.replicas = Gauge("kvfork_cluster_replicas", "Engine replicas the router can send to", registry=r)
        self.replica = Gauge("kvfork_replica", "A replica's counter as it last reported it", ["replica", "counter"],
                             registry=r)
        self.total = Gauge("kvfork_cluster", "Sum of a counter over the live replicas", ["counter"], registry=r)
        self.work = Gauge("kvfork_replica_work_tokens", "Tokens routed to a replica and not finished yet",
                          ["replica"], registry=r)
        self._lock = threading.Lock()
        self._reported: dict[str, dict[str, float]] = {}

    def report(self, replica: str, stats: Mapping[str, Any]) -> None:
        """Take a replica's routing stats; the cluster totals are recomputed over the live replicas."""
        values = {name: float(stats[name]) for name in REPLICA_COUNTERS if name in stats}
        with self._lock:
            if self._reported.get(replica) == values:
                return
            self._reported[replica] = values
            for name, value in values.items():
                self.replica.labels(replica, name).set(value)
            self._totals()

    def keep_only(self, replicas: set[str]) -> None:
        with self._lock:
            for gone in set(self._reported) - replicas:
                del self._reported[gone]
                for name in REPLICA_COUNTERS:
                    try:
                        self.replica.remove(gone, name)
                    except KeyError:
                        pass
                try:
                    self.work.remove(gone)
                except KeyError:
                    pass
            self.replicas.set(len(replicas))
            self._totals()

    def _totals(self) -> None:
        for name in REPLICA_COUNTERS:
            self.total.labels(name).set(sum(v.get(name, 0.0) for v in self._reported.values()))

    def render(self) -> bytes:
        return generate_latest(self.registry)


CLUSTER = ClusterMetrics()


def cluster_metrics() -> ClusterMetrics:
    """This process's ClusterMetrics.

    NOTE: Serve pickles a router's module (and a deployment's) by value into the processes that use it, so a
    global seen through those modules may be a private copy; this looks the one registry up by module name.
    """
    return sys.modules[__name__].CLUSTER  # type: ignore[no-any-return]
