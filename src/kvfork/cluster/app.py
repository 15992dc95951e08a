"""The cluster on Ray Serve: an ingress deployment (vocabulary only) in front of N engine replicas.

`kvfork serve --replicas N [--cluster ADDRESS]` runs it (serve_cluster); `run_cluster` is the Python entry
point; `build_app` assembles the application for any replica class and router (bench/cluster.py compares
routers over stub replicas with it).
"""

# NOTE: no `from __future__ import annotations`: Serve's ingress wrapper hides the module from FastAPI, which
# must see `Request` itself to inject it.
import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.responses import Response, StreamingResponse

from kvfork.cluster.bridge import Forwarded
from kvfork.cluster.ingress import Gateway, error_reply
from kvfork.cluster.metrics import cluster_metrics
from kvfork.cluster.policy import Route, RouterConfig
from kvfork.cluster.replica import EngineReplica
from kvfork.cluster.routekeys import ROUTE_BLOCK, route_root
from kvfork.errors import InvalidParameter
from kvfork.models import DEFAULT_MODEL, resolve_model
from kvfork.store.fingerprint import model_fingerprint

__all__ = ["APP_NAME", "ROUTERS", "build_app", "cluster_options", "replica_options", "run_cluster", "serve_cluster"]

APP_NAME = "kvfork"
# NOTE: kvfork's router, and Serve's own policies it is measured against (pow2 is Serve's default).
ROUTERS: dict[str, str | None] = {
    "kvfork": "kvfork.cluster.router:KvforkRouter",
    "pow2": None,
    "round_robin": "ray.serve.experimental.round_robin_router:RoundRobinRouter",
    # NOTE: the module itself: ray.serve.llm's public path imports vLLM/SGLang (it needs pyarrow either way)
    "ray_prefix": "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter",
}
STATS_PERIOD_S = 0.5  # how often Serve polls each replica's routing stats (its default is 10 s)
# NOTE: how often a stopping replica checks whether its requests are done. Serve's default, 2 s, is a
# sleep before the first check, so every shutdown or redeploy took >= 2 s even when idle.
DRAIN_POLL_S = 0.1

api = FastAPI(title="kvfork cluster", docs_url=None, redoc_url=None)


@serve.deployment(name="kvfork-ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096,
                  graceful_shutdown_wait_loop_s=DRAIN_POLL_S)
@serve.ingress(api)
class Ingress:
    """HTTP in; route keys from the prompt (vocabulary and chat template only); forwarded to a replica."""

    def __init__(self, engine: DeploymentHandle, model: str, chat_template: str | None = None,
                 block_size: int = ROUTE_BLOCK, max_body_bytes: int = 16 << 20) -> None:
        from kvfork.engine.llama import LlamaModel

        path = resolve_model(model)
        self.model = LlamaModel(Path(path), vocab_only=True, chat_template=chat_template)
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.gateway = Gateway(self.model, self._send, block_size=block_size, root=route_root(model_fingerprint(path)),
                               metrics=cluster_metrics())

    def _send(self, request: Forwarded, route: Route | None) -> Any:
        kwargs = {"route": route.to_dict()} if route is not None else {}
        return self.engine.options(stream=True).forward.remote(request, **kwargs)

    @api.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
    async def proxy(self, path: str, request: Request) -> Response:
        if request.url.path == "/metrics":
            return Response(cluster_metrics().render(), media_type=CONTENT_TYPE_LATEST)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            reply = error_reply(413, f"request body over {self.max_body_bytes} bytes", "body_too_large")
            return Response(reply.body, status_code=reply.status, headers=dict(reply.headers))
        forwarded = Forwarded(request.method, request.url.path, request.url.query.encode(),
                              tuple(request.headers.items()), await request.body())
        reply = await self.gateway.handle(forwarded)
        if reply.stream is not None:
            return StreamingResponse(reply.stream, status_code=reply.status, headers=dict(reply.headers))
        return Response(reply.body, status_code=reply.status, headers=dict(reply.headers))


def build_app(replica: type, replica_kwargs: dict[str, Any], *, replicas: int, model: str = DEFAULT_MODEL,
              router: str = "kvfork", router_kwargs: dict[str, Any] | None = None, replica_cpus: float = 1.0,
              max_ongoing_requests: int = 64, chat_template: str | None = None) -> Any:
    """The Serve application: Ingress -> `replicas` x `replica` (EngineReplica, or the bench's stub)."""
    if replicas < 1:
        raise InvalidParameter(f"--replicas must be >= 1, got {replicas}")
    if router not in ROUTERS:
        raise InvalidParameter(f"unknown router {router!r}; choose from {', '.join(ROUTERS)}")
    kwargs = dict(router_kwargs or {})
    if router == "kvfork":
        RouterConfig(**kwargs)  # NOTE: refuse bad knobs here, not in every router process
    fields: dict[str, Any] = {"request_router_kwargs": kwargs, "request_routing_stats_period_s": STATS_PERIOD_S,
                              "request_routing_stats_timeout_s": 5.0}
    if ROUTERS[router] is not None:
        fields["request_router_class"] = ROUTERS[router]
    router_config = RequestRouterConfig(**fields)
    engine = serve.deployment(
        replica, name="kvfork-engine", num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": replica_cpus}, request_router_config=router_config,
        # NOTE: a dead or stuck replica is noticed within seconds and replaced (issue 20, failure handling)
        health_check_period_s=2.0, health_check_timeout_s=30.0, graceful_shutdown_timeout_s=5.0,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
    ).bind(**replica_kwargs)  # type: ignore[attr-defined]  # NOTE: Ray's stubs miss Deployment.bind
    block = int(kwargs.get("block_size", ROUTE_BLOCK))
    return Ingress.bind(engine, model, chat_template, block)  # type: ignore[attr-defined]


def cluster_options(**overrides: Any) -> argparse.Namespace:
    """`kvfork serve`'s options (its defaults, then `overrides`), for run_cluster from Python."""
    from kvfork.server.cli import add_server_commands

    parser = argparse.ArgumentParser(prog="kvfork")
    parser.add_argument("--verbose", action="store_true")  # NOTE: kvfork's top-level option (kvfork/cli.py)
    add_server_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve"])
    for name, value in overrides.items():
        if not hasattr(args, name):
            raise InvalidParameter(f"kvfork serve has no option {name!r}")
        setattr(args, name, value)
    return args


def replica_options(args: argparse.Namespace) -> dict[str, Any]:
    """`kvfork serve`'s options as an EngineReplica takes them (the cluster's own are the ingress's business)."""
    cluster_only = ("func", "replicas", "cluster", "spill_tokens", "replica_cpus")
    return {k: v for k, v in vars(args).items() if k not in cluster_only}


def router_options(args: argparse.Namespace) -> dict[str, Any]:
    """The RouterConfig fields `kvfork serve`'s options set (build_app's router_kwargs)."""
    out: dict[str, Any] = {} if args.spill_tokens is None else {"spill_tokens": args.spill_tokens}
    if args.snapshot_url is not None:
        out["shared_tier"] = True  # NOTE: every replica restores what any wrote: place by load
    return out


def run_cluster(replicas: int, *, model: str = DEFAULT_MODEL, cluster: str | None = None, blocking: bool = True,
                **options: Any) -> DeploymentHandle | None:
    """Start the cluster from Python: `kvfork serve --replicas N` with `options` named as its flags
    (n_ctx=, snapshot_url=, spill_tokens=, ...). Non-blocking: returns the ingress handle (serve.shutdown()
    stops it)."""
    args = cluster_options(model=model, replicas=replicas, cluster=cluster, **options)
    return _start(args, blocking=blocking)


def serve_cluster(args: argparse.Namespace) -> int:
    _start(args, blocking=True)
    return 0


def _start(args: argparse.Namespace, *, blocking: bool) -> DeploymentHandle | None:
    replicas = args.replicas if args.replicas is not None else 1
    if args.store is not None:
        # NOTE: each replica needs its own disk tier; replicas share prefixes through --snapshot-url
        raise InvalidParameter("--store DIR is per process; with --replicas use --snapshot-url for a tier every"
                               " replica reads")
    cpus = os.cpu_count() or 1
    threads = args.threads or max(1, cpus // replicas)
    options = replica_options(args)
    options["threads"] = threads
    resolve_model(args.model)  # NOTE: pull once here, before every replica would
    router_kwargs = router_options(args)
    if not ray.is_initialized():
        ray.init(address=args.cluster, include_dashboard=False, log_to_driver=bool(args.verbose),
                 configure_logging=False, logging_level=logging.INFO if args.verbose else logging.ERROR)
    # NOTE: Serve logs every request at INFO; --verbose shows them
    serve.start(http_options={"host": args.host, "port": args.port},
                logging_config={"log_level": "INFO" if args.verbose else "WARNING"})
    app = build_app(EngineReplica, {"options": options}, replicas=replicas, model=args.model,
                    router="kvfork", router_kwargs=router_kwargs,
                    replica_cpus=args.replica_cpus or float(threads), max_ongoing_requests=args.max_queued,
                    chat_template=args.chat_template)
    handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it")
    print(f"kvfork serve: {replicas} replica(s) of {args.model} on Ray Serve at"
          f" http://{args.host}:{args.port}/v1 ({threads} thread(s) each)")
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return None
