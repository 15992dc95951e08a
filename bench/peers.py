"""Issues 5 and 6: N agents over one ~3,500-token document, each agent one thread with the official
openai client, against the servers a user would otherwise run, on the same model file and threads.

    python bench/build_llama_server.py                    # once: llama.cpp's server, same llama.cpp
    python bench/peers.py [--agents 8] [--repeats 3] [--tokens 32]

Systems, all started before the first repeat, order rotated per repeat:
  kvfork serve              its defaults (fast mode: llama.cpp's settings): sent at once (the server
                            forks the first prompt while it prefills: one prefill, N forks)
  kvfork-exact              `kvfork serve --exact` (q8_0 cache, batch-invariant kernels): the same
  llama-server -np N        llama.cpp's own server, its defaults (f16 cache, flash attention auto,
                            prompt cache, cache-ram): the baseline, sent at once
  llama-cpp-python server   its RAM prompt cache on (serves one request at a time); only with --only
  kvfork-NAME               `--variant NAME="--flash-attn off"`: kvfork serve with those options (repeatable;
                            e.g. `--store-ram-mb 0`: idle prefixes stay in the context, as before e99ab1e)
--staggered adds a run per system where the first agent goes alone and the rest together.
A system that is not installed is skipped with the reason printed. Each repeat uses a document
with a new first line, so nothing is cached from an earlier repeat; a short warm-up request goes to
every server first. Greedy, `ignore_eos`, `--tokens` tokens per agent.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
from servers import Server, kvfork_server, llama_cpp_python_server, llama_server
from workload import INSTRUCTIONS, SYSTEM, document, fmt, provenance, stats

from kvfork.models import resolve_model

Ask = Callable[[int], dict[str, Any]]


def asker(server: Server, doc: str, n_tokens: int) -> Ask:
    """ask(i): agent i's chat request, blocking; returns its latency and usage."""
    local = threading.local()

    def ask(i: int) -> dict[str, Any]:
        if not hasattr(local, "client"):  # NOTE: one client (connection pool) per thread, as separate agents
            local.client = openai.OpenAI(base_url=server.base_url, api_key="none", timeout=3600, max_retries=0)
        t0 = time.perf_counter()
        r = local.client.chat.completions.create(
            model="model", temperature=0, max_tokens=n_tokens, extra_body={"ignore_eos": True},
            messages=[{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": f"{doc}\n\n{INSTRUCTIONS[i % len(INSTRUCTIONS)]}"}])
        details = getattr(r.usage, "prompt_tokens_details", None)
        if not r.choices or r.choices[0].message.content is None:
            raise RuntimeError(f"agent {i}: empty answer from {server.name}")
        return {"latency_s": time.perf_counter() - t0, "prompt_tokens": r.usage.prompt_tokens,
                "completion_tokens": r.usage.completion_tokens,
                "cached_tokens": getattr(details, "cached_tokens", None) if details else None}

    return ask


def at_once(ask: Ask, n: int) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        rows = list(pool.map(ask, range(n)))
    return time.perf_counter() - t0, rows


def staggered(ask: Ask, n: int) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    first = ask(0)
    with ThreadPoolExecutor(max(1, n - 1)) as pool:
        rest = list(pool.map(ask, range(1, n)))
    return time.perf_counter() - t0, [first, *rest]


def _variant(text: str) -> tuple[str, str]:
    name, sep, options = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=\"OPTIONS\", got {text!r}")
    return name, options


def start_servers(args: argparse.Namespace, path: Path, logs: Path) -> dict[str, Server]:
    ctx = 4096 + 2 * args.tokens  # per agent: the document, its instruction and answer
    makers: dict[str, Callable[[], Server]] = {
        "kvfork": lambda: kvfork_server(str(path), args.threads, 2 * ctx + args.agents * 256,
                                        log=logs / "kvfork.log"),
        "kvfork-exact": lambda: kvfork_server(str(path), args.threads, 2 * ctx + args.agents * 256,
                                              extra=["--exact"], log=logs / "kvfork-exact.log"),
        "llama-server": lambda: llama_server(path, args.threads, args.agents, ctx, log=logs / "llama-server.log"),
        "llama-cpp-python": lambda: llama_cpp_python_server(path, args.threads, ctx,
                                                            log=logs / "llama-cpp-python.log"),
    }
    for name, options in args.variant:
        makers[f"kvfork-{name}"] = functools.partial(kvfork_server, str(path), args.threads,
                                                     2 * ctx + args.agents * 256, extra=shlex.split(options),
                                                     log=logs / f"kvfork-{name}.log")
    variants = {f"kvfork-{name}" for name, _ in args.variant}
    servers = {}
    for name, make in makers.items():
        if name not in variants and ((args.only and name not in args.only)
                                     or (not args.only and name == "llama-cpp-python")):
            continue
        try:
            servers[name] = make().__enter__()
            asker(servers[name], document("warm-up", 400), 4)(0)
        except Exception as e:  # noqa: BLE001 - a missing peer is skipped, with the reason
            print(f"skipping {name}: {type(e).__name__}: {e}")
    return servers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--doc-chars", type=int, default=None, help="cut the report (a quick smoke run)")
    ap.add_argument("--only", nargs="*", default=None, help="kvfork kvfork-exact llama-server llama-cpp-python")
    ap.add_argument("--variant", action="append", default=[], type=_variant, metavar='NAME="OPTIONS"',
                    help="also run `kvfork serve OPTIONS` as kvfork-NAME (repeatable)")
    ap.add_argument("--staggered", action="store_true", help="also send the first agent alone, then the rest")
    ap.add_argument("--out", type=Path, default=Path("bench/out/peers.json"))
    args = ap.parse_args()
    path = resolve_model(args.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    servers = start_servers(args, path, args.out.parent)
    runs: list[tuple[str, Callable[[Ask, int], tuple[float, list[dict]]], str]] = []
    for name in servers:
        runs.append((f"{name}, all at once", at_once, name))
        # NOTE: llama-cpp-python serves one request at a time: staggered is the same thing there
        if name != "llama-cpp-python" and args.staggered:
            runs.append((f"{name}, staggered", staggered, name))
    walls: dict[str, dict[int, float]] = {label: {} for label, _, _ in runs}  # label -> repeat -> seconds
    failed: dict[str, str] = {}
    details: dict[str, list] = {label: [] for label, _, _ in runs}
    try:
        for r in range(args.repeats):
            for k in range(len(runs)):
                label, how, name = runs[(k + r) % len(runs)]
                if name in failed:
                    continue
                doc = document(f"{uuid.uuid4().hex[:12]}", args.doc_chars)
                try:
                    wall, rows = how(asker(servers[name], doc, args.tokens), args.agents)
                except Exception as e:  # noqa: BLE001 - a peer that fails is reported and left out from then on
                    alive = servers[name].proc is not None and servers[name].proc.poll() is None
                    failed[name] = f"repeat {r + 1}, {label}: {type(e).__name__}: {e} (process alive: {alive})"
                    print(f"FAILED {failed[name]}", flush=True)
                    continue
                walls[label][r] = wall
                details[label].append(rows)
                cached = [row["cached_tokens"] for row in rows]
                print(f"repeat {r + 1} {label}: {wall:.1f} s; prompt {rows[0]['prompt_tokens']} tokens;"
                      f" completion {sum(row['completion_tokens'] for row in rows)} tokens; cached {cached}",
                      flush=True)
        memory = {name: s.memory() for name, s in servers.items() if name not in failed}
    finally:
        for s in servers.values():
            s.__exit__(None, None, None)
    result = {"provenance": provenance(), "model": path.name, "threads": args.threads, "agents": args.agents,
              "tokens": args.tokens, "failed": failed, "runs": details,
              "wall_s": {k: stats(list(v.values())) for k, v in walls.items() if v},
              "rss_bytes": {k: {"rss": m[0], "peak": m[1]} for k, m in memory.items()}}
    bases = [b for b in ("kvfork, all at once", "kvfork-exact, all at once") if walls.get(b)]
    lines = [f"| {args.agents} agents, {args.tokens} tokens each | wall time |"
             + "".join(f" time / {b} |" for b in bases), "|---|---|" + "---|" * len(bases)]
    for label, s in result["wall_s"].items():
        cells = []
        for base in bases:
            # NOTE: ratios within one repeat only: the two ran back to back on the same machine state
            ratio = [w / walls[base][r] for r, w in walls[label].items() if r in walls[base]]
            cells.append(fmt(stats(ratio), "x", digits=2) if ratio else "-")
        lines.append(f"| {label} | {fmt(s, ' s')} | " + " | ".join(cells) + " |")
    lines += [f"| {name} failed | {why} |" + " |" * len(bases) for name, why in failed.items()]
    result["table"] = "\n".join(lines)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(result["table"] + "\n")
    print("\n" + result["table"])


if __name__ == "__main__":
    main()
