"""kvfork past one machine (issue 20): engine replicas on Ray Serve, routed by shared prefix.

Ray is imported only by cluster/app.py and cluster/router.py (the `cluster` extra); the routing policy,
route keys and the ingress's gateway are plain Python.
"""

from kvfork.cluster.policy import REASONS, Decision, PrefixPolicy, Route, RouterConfig
from kvfork.cluster.routekeys import ROUTE_BLOCK, route_keys, route_root

__all__ = ["REASONS", "ROUTE_BLOCK", "Decision", "PrefixPolicy", "Route", "RouterConfig", "route_keys",
           "route_root", "run_cluster"]


def run_cluster(*args, **kwargs):  # type: ignore[no-untyped-def]
    """`kvfork serve --replicas N` from Python (see cluster/app.py run_cluster)."""
    from kvfork.cluster.app import run_cluster as run

    return run(*args, **kwargs)
