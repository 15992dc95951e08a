"""`kvfork plan FILE` and `kvfork pipeline run FILE`: the layout report, and running a pipeline file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kvfork.config import EXACT_HELP
from kvfork.models import DEFAULT_MODEL
from kvfork.pipeline.definition import LAYOUTS
from kvfork.pipeline.loader import PipelineFile, load_pipeline
from kvfork.reuse.config import REUSE_MODES

__all__ = ["add_pipeline_commands", "open_engine", "show_result"]


def add_pipeline_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `plan` and `pipeline run`; each sets func(args) -> exit code."""
    p = subparsers.add_parser("plan", help="report how much of a pipeline's prompts can be shared")
    _common(p)
    p.set_defaults(func=plan_command)
    group = subparsers.add_parser("pipeline", help="multi-agent pipelines over shared snapshots")
    sub = group.add_subparsers(dest="pipeline_command", required=True)
    p = sub.add_parser("run", help="run a pipeline file (TOML, or YAML with PyYAML)")
    _common(p)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-share", action="store_true", help="prefill every agent from scratch (the reference)")
    p.add_argument("--compare", action="store_true", help="also run without sharing; time it and check outputs match")
    p.add_argument("--max-chars", type=int, default=600, help="show at most this much of each answer (0: all)")
    p.add_argument("--reuse", choices=REUSE_MODES, default=None,
                   help="reuse documents under other roles and upstream replies (approximate unless exact)")
    p.add_argument("more", nargs="*", type=Path, metavar="FILE", help="more pipeline files, run after the first"
                   " (with --replicas: spread over the replicas)")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="run the pipelines on N engine replicas on Ray (the `cluster` extra): each pipeline on"
                        " one replica, pipelines with the same documents together")
    p.add_argument("--cluster", default=None, metavar="ADDRESS", help="join this Ray cluster (default: a local one)")
    p.set_defaults(func=run_command)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="the pipeline file")
    p.add_argument("--model", default=None, help=f"catalog name or GGUF path (default: the file's, or {DEFAULT_MODEL})")
    p.add_argument("--layout", choices=LAYOUTS, default=None, help="override the file's layout")
    p.add_argument("--n-ctx", type=int, default=None)
    p.add_argument("--chat-template", default=None, help="for models without one (e.g. gemma)")
    p.add_argument("--exact", action="store_true", default=None, help=EXACT_HELP + " (or exact = true in the file)")


def plan_command(args: argparse.Namespace) -> int:
    spec = load_pipeline(args.file)
    pipeline = spec.pipeline.with_layout(args.layout) if args.layout else spec.pipeline
    with open_engine(spec, args) as engine:
        print(f"pipeline {pipeline.name} on {engine.model_path.name}")
        print(pipeline.plan(engine).report())
    return 0


def run_command(args: argparse.Namespace) -> int:
    # NOTE: with --replicas or --cluster, kvfork/cli.py hands the files to kvfork.cluster instead
    specs = [load_pipeline(path) for path in [args.file, *args.more]]
    ok = True
    for spec in specs:
        pipeline = spec.pipeline.with_layout(args.layout) if args.layout else spec.pipeline
        with open_engine(spec, args) as engine:
            print(f"pipeline {pipeline.name}: {len(pipeline.agents)} agents on {engine.model_path.name}",
                  file=sys.stderr)
            result = pipeline.run(engine, share=not args.no_share, reuse=args.reuse or spec.reuse)
            show_result(result, args)
            if args.compare and not args.no_share:
                ref = pipeline.run(engine, share=False)
                same = sum(ref[a.name].tokens == a.tokens for a in result if a.ok)
                print(f"without sharing: {ref.wall_s:.1f} s -> {ref.wall_s / result.wall_s:.2f}x;"
                      f" identical outputs: {same}/{sum(a.ok for a in result)}")
        ok = ok and result.ok
    return 0 if ok else 1


def show_result(result: Any, args: argparse.Namespace) -> None:
    """Print a PipelineResult: each agent's replies (cut at --max-chars), then what sharing saved."""
    for agent in result:
        print(f"\n=== {agent.name} ({agent.status}, {agent.completion_tokens} tokens) ===")
        if agent.error:
            print(agent.error)
        for i, text in enumerate(agent.replies, 1):
            head = f"[turn {i}] " if len(agent.replies) > 1 else ""
            body = text.strip()
            if args.max_chars and len(body) > args.max_chars:
                body = body[: args.max_chars] + " [...]"
            print(head + body)
    print("\n--- what sharing saved ---")
    print(result.summary())


def open_engine(spec: PipelineFile, args: argparse.Namespace) -> Any:
    """The Engine a pipeline file asks for, with the command line's overrides."""
    from kvfork.runtime import Engine  # NOTE: imported late so parsing a file does not load llama.cpp

    overrides: dict[str, Any] = {"verbose": getattr(args, "verbose", False)}
    n_ctx = args.n_ctx or spec.n_ctx
    if n_ctx:
        overrides["n_ctx"] = n_ctx
    chat_template = args.chat_template or spec.chat_template
    if chat_template:
        overrides["chat_template"] = chat_template
    if getattr(args, "threads", None):
        overrides["n_threads"] = args.threads
    overrides["exact"] = bool(args.exact or spec.exact)
    engine = Engine(args.model or spec.model or DEFAULT_MODEL, **overrides)
    try:
        for name, path in spec.adapters.items():
            engine.load_adapter(name, path)
    except BaseException:
        engine.close()
        raise
    return engine
