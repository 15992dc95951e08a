"""Shared by the example scripts: command-line options, the bundled report, printing a result."""

from __future__ import annotations

import argparse
import time
from importlib import resources

from kvfork import DEFAULT_MODEL, Engine, Pipeline, PipelineResult


def options(description: str, *, reuse: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or GGUF path")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--n-ctx", type=int, default=16384 if reuse else 8192,
                        help="KV cells (reuse modes place a copy of the document per role)")
    parser.add_argument("--compare", action="store_true", help="also run without sharing (slow: one prefill per agent)")
    if reuse:
        parser.add_argument("--reuse", choices=["shift", "kvcomm", "blend"], default="shift",
                            help="how the document and the reviews are reused (approximate; see docs/reuse.md)")
    return parser.parse_args()


def report() -> str:
    """The bundled ~3,500-token incident report."""
    return resources.files("kvfork").joinpath("data/sample_report.txt").read_text(encoding="utf-8")


def engine(args: argparse.Namespace) -> Engine:
    t0 = time.perf_counter()
    e = Engine(args.model, n_ctx=args.n_ctx)
    print(f"model {e.model_path.name} loaded in {time.perf_counter() - t0:.1f} s, {e.config.n_threads} threads")
    return e


def show(result: PipelineResult, max_chars: int = 500) -> None:
    for agent in result:
        print(f"\n=== {agent.name} ({agent.status}, {agent.completion_tokens} tokens) ===")
        if agent.error:
            print(agent.error)
        for i, text in enumerate(agent.replies, 1):
            body = " ".join(text.split())
            body = body if len(body) <= max_chars else body[:max_chars] + " [...]"
            print((f"[turn {i}] " if len(agent.replies) > 1 else "") + body)
    print("\n--- what sharing saved ---")
    print(result.summary())


def run(pipeline: Pipeline, args: argparse.Namespace, e: Engine | None = None) -> PipelineResult:
    """Print the plan, run with sharing, print answers and savings; --compare also runs without."""
    e = e or engine(args)
    print(pipeline.plan(e).report())
    result = pipeline.run(e)
    show(result)
    if args.compare:
        ref = pipeline.run(e, share=False)
        same = sum(ref[a.name].tokens == a.tokens for a in result if a.ok)
        print(f"\nwithout sharing: {ref.wall_s:.1f} s vs {result.wall_s:.1f} s ({ref.wall_s / result.wall_s:.2f}x);"
              f" identical outputs: {same}/{sum(a.ok for a in result)}")
    e.close()
    return result
