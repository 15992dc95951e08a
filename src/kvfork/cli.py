"""`kvfork` command line: pull models, run agents over a shared document, the bundled demo."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from importlib import resources
from pathlib import Path

from kvfork.config import EXACT_HELP
from kvfork.errors import KvforkError
from kvfork.models import CATALOG, DEFAULT_MODEL, cache_dir, pull

__all__ = ["main", "build_parser"]

DEMO_SYSTEM = "You are a careful analyst. Answer from the report only, briefly and precisely."
DEMO_AGENTS = (
    ("summarizer", "Summarize the incident in three bullet points with the key numbers."),
    ("risk-analyst", "List the three biggest risks that remain open after this incident, one line each."),
    ("reviewer", "Ask three sharp questions a reviewer should put to the authors of this report."),
    ("fact-checker", "Check the summary figures against the appendix tables and name any inconsistency."),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvfork", description="Prefill shared context once, fan it out to agents.")
    parser.add_argument("--verbose", action="store_true", help="show llama.cpp's own log")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download and verify a catalog model")
    p.add_argument("name", choices=sorted(CATALOG))
    sub.add_parser("models", help="list the catalog and what is pulled")
    p = sub.add_parser("doctor", help="check that the installed llama.cpp build runs on this CPU")
    p.add_argument("--fix", action="store_true", help="rebuild llama-cpp-python for this CPU when it does not")

    for name, help_text in (("run", "agents over a shared document"), ("demo", "4 agents over the bundled report")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or GGUF path")
        p.add_argument("--max-tokens", type=int, default=128 if name == "demo" else 256)
        p.add_argument("--temperature", type=float, default=0.0)
        p.add_argument("--n-ctx", type=int, default=8192)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--compare", action="store_true", help="also run each agent from scratch and time it")
        p.add_argument("--exact", action="store_true", help=EXACT_HELP)
        if name == "run":
            p.add_argument("--doc", type=Path, required=True, help="the shared document (text file)")
            p.add_argument("--agent", action="append", required=True, metavar="NAME: INSTRUCTION")
            p.add_argument("--system", default=None, help="shared system prompt")
            p.add_argument("--plain", action="store_true", help="plain completion, no chat template")
    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: argparse._SubParsersAction) -> None:
    """Commands of the other wings; each module registers its own (and sets `func`)."""
    from kvfork.runtime.snapshot_cli import add_snapshot_commands

    add_snapshot_commands(sub)
    wings = (("kvfork.pipeline.cli", "add_pipeline_commands"), ("kvfork.server.cli", "add_server_commands"),
             ("kvfork.train.cli", "add_train_commands"), ("kvfork.engine.kernelbuild", "add_build_command"))
    for module, name in wings:
        try:
            register = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as exc:
            # NOTE: the server's web stack is an optional extra; without it `kvfork serve` is simply absent.
            missing = exc.name or ""
            if missing.startswith("kvfork") and not module.startswith(missing):
                raise
            continue
        register(sub)


def _doctor(*, fix: bool) -> int:
    from kvfork.engine.buildcheck import probe, rebuild

    report = probe()
    if report.ok:
        print(f"llama.cpp build runs on this CPU: {report.system_info.strip()}")
        return 0
    if report.crashed:
        why = f"does not load here ({report.crashed})"
    elif report.missing:
        why = f"was built for {', '.join(report.missing)}, which this CPU lacks"
    else:
        why = (f"was built with {', '.join(report.crashing)}, whose kernels crash at the first decode with "
               "repacked weights (llama.cpp #20824)")
    print(f"the installed llama.cpp {why}", file=sys.stderr)
    if not fix:
        print("`kvfork doctor --fix` rebuilds it for this machine (6-10 minutes on 2 cores)", file=sys.stderr)
        return 1
    print("rebuilding llama-cpp-python for this CPU's instruction sets, AMX left out ...", file=sys.stderr,
          flush=True)
    if rebuild() != 0:
        print("error: the rebuild failed (pip's output above says why)", file=sys.stderr)
        return 2
    return _doctor(fix=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pull":
            print(pull(args.name))
        elif args.command == "models":
            for spec in CATALOG.values():
                here = "pulled" if (cache_dir() / spec.filename).exists() else "not pulled"
                default = " (default)" if spec.name == DEFAULT_MODEL else ""
                print(f"{spec.name:22s} {spec.size / 1e6:7.1f} MB  {here:10s} {spec.description}{default}")
        elif args.command == "doctor":
            return _doctor(fix=args.fix)
        elif args.command in ("run", "demo"):
            return _run_agents(args)
        elif getattr(args, "replicas", None) is not None or getattr(args, "cluster", None) is not None:
            return _on_cluster(args)
        elif hasattr(args, "func"):
            return int(args.func(args) or 0)
    except KvforkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _on_cluster(args: argparse.Namespace) -> int:
    """`serve` and `pipeline run` with --replicas / --cluster: on Ray (the `cluster` extra)."""
    try:
        if args.command == "serve":
            from kvfork.cluster.app import serve_cluster as command
        else:
            from kvfork.cluster.pipelines import run_command as command
    except ImportError as exc:
        raise KvforkError(f"--replicas and --cluster need Ray Serve: pip install 'kvfork[cluster]' ({exc})") from exc
    return int(command(args) or 0)


def _run_agents(args: argparse.Namespace) -> int:
    from kvfork.runtime import Engine  # NOTE: imported late so `kvfork pull` does not load llama.cpp

    if args.command == "demo":
        document = resources.files("kvfork").joinpath("data/sample_report.txt").read_text(encoding="utf-8")
        agents, system, chat = list(DEMO_AGENTS), DEMO_SYSTEM, True
    else:
        try:
            document = args.doc.read_text(encoding="utf-8")
        except OSError as exc:
            raise KvforkError(f"cannot read --doc {args.doc}: {exc}") from exc
        agents = [_parse_agent(spec, i) for i, spec in enumerate(args.agent)]
        system, chat = args.system, not args.plain
    overrides = {"n_ctx": args.n_ctx, "verbose": args.verbose, "exact": args.exact}
    if args.threads:
        overrides["n_threads"] = args.threads
    engine = Engine(args.model, **overrides)
    print(f"model {engine.model_path.name} | {engine.config.n_threads} threads | {len(agents)} agents"
          f" | {'exact' if args.exact else 'fast'} mode", file=sys.stderr)
    t0 = time.perf_counter()
    shared = engine.prefill(document, system=system, chat=chat)
    outs = shared.fan_out([text for _, text in agents], max_tokens=args.max_tokens, temperature=args.temperature)
    wall = time.perf_counter() - t0
    for (name, _), out in zip(agents, outs, strict=False):
        print(f"\n=== {name} ({out.completion_tokens} tokens, {out.finish_reason}) ===\n{out.text.strip()}")
    rate = shared.n_tokens / shared.prefill_s if shared.prefill_s > 0 else 0.0
    reused = sum(o.reused_tokens for o in outs)
    computed = shared.n_tokens + sum(o.computed_tokens for o in outs)
    print("\n--- what sharing saved ---")
    print(f"shared prefix: {shared.n_tokens:,} tokens prefilled once in {shared.prefill_s:.1f} s ({rate:.0f} tok/s)")
    print(f"prefill tokens computed: {computed:,}; reused from the snapshot: {reused:,}")
    if rate:
        print(f"prefill time saved: {(len(outs) - 1) * shared.n_tokens / rate:.1f} s"
              f" ({len(outs) - 1} prefills of {shared.n_tokens:,} tokens at the measured rate)")
    print(f"end to end: {wall:.1f} s for {len(outs)} agents")
    if args.compare:
        _compare(engine, document, agents, system, chat, args, wall, outs)
    shared.close()
    engine.close()
    return 0


def _compare(engine, document, agents, system, chat, args, wall, outs) -> None:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    same = 0
    for (_, text), out in zip(agents, outs, strict=False):
        tokens = engine.prompt_tokens(document, text, system=system, chat=chat)
        ref = engine.generate(tokens, max_tokens=args.max_tokens, temperature=args.temperature)
        same += ref.tokens == out.tokens
    scratch = time.perf_counter() - t0
    # NOTE: fast mode promises the same model up to rounding, so a near-tie can part two greedy runs
    print(f"from scratch, one after another: {scratch:.1f} s -> fan-out {scratch / wall:.2f}x faster;"
          f" identical outputs: {same}/{len(agents)}{'' if args.exact else ' (fast mode: equal up to rounding)'}")


def _parse_agent(spec: str, index: int) -> tuple[str, str]:
    name, sep, text = spec.partition(":")
    if not sep:
        return f"agent{index + 1}", spec.strip()
    if not text.strip():
        raise KvforkError(f"--agent {spec!r} has no instruction after the colon")
    return name.strip() or f"agent{index + 1}", text.strip()
