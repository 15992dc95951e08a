"""Pipelines over replicas: `kvfork pipeline run FILE... --replicas N`.

Each pipeline runs whole on one replica (its agents fork one prefill there); pipelines are spread over the
replicas, and pipelines that read the same documents are placed together so their documents are
prefilled once per cluster. A replica here is a Ray actor with its own Engine (a pipeline drives its
engine directly, which a serving replica's loop thread owns, so these are separate from `kvfork serve`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from kvfork.errors import InvalidParameter
from kvfork.pipeline.loader import PipelineFile

__all__ = ["place", "run_command", "run_on_replicas"]


def _group_key(spec: PipelineFile) -> str:
    """Pipelines with the same documents (text, any order) share a key."""
    digest = hashlib.sha256()
    for text in sorted(spec.pipeline.documents.values()):
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


def _weight(spec: PipelineFile) -> int:
    """A pipeline's cost, roughly: its documents once, plus each agent's own part and output."""
    docs = sum(len(t) for t in spec.pipeline.documents.values()) // 4  # ~4 characters a token
    return docs + 256 * len(spec.pipeline.agents)


def place(specs: Sequence[PipelineFile], replicas: int) -> list[int]:
    """The replica of each pipeline: groups with the same documents together, heaviest group first onto the
    least loaded replica (so the replicas' work is as even as whole groups allow)."""
    if replicas < 1:
        raise InvalidParameter(f"--replicas must be >= 1, got {replicas}")
    groups: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(_group_key(spec), []).append(i)

    def group_weight(members: list[int]) -> int:
        # NOTE: the documents are prefilled once per group; each further pipeline adds only its agents
        first = _weight(specs[members[0]])
        return first + sum(256 * len(specs[i].pipeline.agents) for i in members[1:])

    load = [0] * replicas
    where = [0] * len(specs)
    for members in sorted(groups.values(), key=group_weight, reverse=True):
        target = min(range(replicas), key=lambda r: (load[r], r))
        load[target] += group_weight(members)
        for i in members:
            where[i] = target
    return where


class _Replica:
    """A Ray actor holding one Engine; runs the pipelines it is given, one after another."""

    def __init__(self, spec: PipelineFile, args: argparse.Namespace) -> None:
        from kvfork.pipeline.cli import open_engine

        self.engine = open_engine(spec, args)

    def run(self, spec: PipelineFile, layout: str | None, share: bool, reuse: str | None) -> Any:
        pipeline = spec.pipeline.with_layout(layout) if layout else spec.pipeline  # type: ignore[arg-type]
        return pipeline.run(self.engine, share=share, reuse=reuse or spec.reuse)


def run_on_replicas(specs: Sequence[PipelineFile], args: argparse.Namespace, replicas: int,
                    cluster: str | None) -> list[tuple[int, Any]]:
    """(replica, PipelineResult) of each pipeline, in the order given."""
    import ray  # NOTE: the `cluster` extra

    settings = {(s.model, s.n_ctx, s.chat_template, tuple(sorted(s.adapters.items()))) for s in specs}
    if len(settings) > 1 and not args.model:
        raise InvalidParameter("pipelines run on replicas together must name the same model and engine settings"
                               " (or pass --model and --n-ctx)")
    where = place(specs, replicas)
    threads = args.threads or max(1, (os.cpu_count() or 1) // replicas)
    args.threads = threads
    if not ray.is_initialized():
        ray.init(address=cluster, include_dashboard=False, configure_logging=False, log_to_driver=False)
    actor: Any = ray.remote(num_cpus=threads)(_Replica)
    used = sorted(set(where))
    workers = {r: actor.remote(specs[where.index(r)], args) for r in used}
    futures = [workers[r].run.remote(spec, args.layout, not args.no_share, args.reuse)
               for spec, r in zip(specs, where, strict=True)]
    results = ray.get(futures)
    for worker in workers.values():
        ray.kill(worker)
    return list(zip(where, results, strict=True))


def run_command(args: argparse.Namespace) -> int:
    """`kvfork pipeline run FILE... --replicas N`: run, then print each pipeline's result and replica."""
    from kvfork.pipeline.cli import show_result
    from kvfork.pipeline.loader import load_pipeline

    if args.compare:
        raise InvalidParameter("--compare runs on one engine; leave out --replicas")
    specs = [load_pipeline(path) for path in [args.file, *args.more]]
    placed = run_on_replicas(specs, args, args.replicas or 1, args.cluster)
    for spec, (replica, result) in zip(specs, placed, strict=True):
        print(f"\n##### {spec.path.name}: pipeline {spec.pipeline.name} on replica {replica}")
        show_result(result, args)
    return 0 if all(result.ok for _, result in placed) else 1
