"""`kvfork snapshot save|load|ls|rm|stats`: snapshot files and stores from the command line.

The main CLI calls `add_snapshot_commands(subparsers)`; each command sets `func` (args -> exit code).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from kvfork.config import EXACT_HELP
from kvfork.errors import KvforkError
from kvfork.store.fileformat import read_header, read_snapshot, write_snapshot
from kvfork.store.store import SnapshotStore

__all__ = ["add_snapshot_commands"]


def add_snapshot_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register `snapshot` and its subcommands on an argparse subparsers object; return its parser."""
    parser = subparsers.add_parser("snapshot", help="save, load and manage KV snapshots")
    sub = parser.add_subparsers(dest="snapshot_command", required=True)

    save = sub.add_parser("save", help="prefill a document and save its KV state to a file or a store")
    _engine_args(save)
    save.add_argument("document", type=Path, help="text file to prefill")
    where = save.add_mutually_exclusive_group()
    where.add_argument("-o", "--output", type=Path, help="snapshot file to write")
    where.add_argument("--store", type=Path, help="store folder to put it in")
    save.add_argument("--snapshot-url", metavar="URL", help="shared snapshot tier to put it in (file:///… or s3://…)")
    save.add_argument("--system", help="system prompt (chat mode)")
    save.set_defaults(func=_save)

    load = sub.add_parser("load", help="restore a snapshot file and ask it questions")
    _engine_args(load)
    load.add_argument("file", type=Path)
    load.add_argument("--ask", action="append", default=[], help="an instruction (repeatable)")
    load.add_argument("--max-tokens", type=int, default=128)
    load.set_defaults(func=_load)

    ls = sub.add_parser("ls", help="list the snapshots of a store folder or snapshot files")
    ls.add_argument("paths", type=Path, nargs="*")
    ls.add_argument("--snapshot-url", metavar="URL", help="also list a shared snapshot tier (file:///… or s3://…)")
    ls.set_defaults(func=_ls)

    rm = sub.add_parser("rm", help="delete snapshots from a store folder by key (or key prefix)")
    rm.add_argument("store", type=Path)
    rm.add_argument("keys", nargs="+")
    rm.set_defaults(func=_rm)

    stats = sub.add_parser("stats", help="entries and bytes of a store folder, per model")
    stats.add_argument("store", type=Path)
    stats.set_defaults(func=_stats)
    return parser


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="catalog name or GGUF path (default: the catalog default)")
    p.add_argument("--n-ctx", type=int, default=8192)
    p.add_argument("--plain", action="store_true", help="no chat template: the text as is")
    p.add_argument("--chat-template", default=None, help="llama.cpp template name overriding the model's")
    p.add_argument("--exact", action="store_true", help=EXACT_HELP)


def _engine(args: argparse.Namespace) -> Any:
    from kvfork.models import DEFAULT_MODEL
    from kvfork.runtime.engine import Engine

    return Engine(args.model or DEFAULT_MODEL, n_ctx=args.n_ctx, chat_template=args.chat_template, exact=args.exact)


def _save(args: argparse.Namespace) -> int:
    if args.output is None and args.store is None and args.snapshot_url is None:
        raise KvforkError("say where to save it: -o FILE, --store DIR or --snapshot-url URL")
    if args.output is not None and args.snapshot_url is not None:
        raise KvforkError("-o writes one file; use --store and/or --snapshot-url to put it in stores")
    text = args.document.read_text(encoding="utf-8")
    with _engine(args) as engine, engine.prefill(text, system=args.system, chat=not args.plain) as snap:
        host = snap.to_host()
        if args.output is not None:
            target = str(write_snapshot(args.output, host))
        else:
            # NOTE: a synchronous shared write: this process exits right after
            store = SnapshotStore(args.store, url=args.snapshot_url, shared_async=False)
            target = store.put(host)
    size = host.nbytes / 2**20
    print(f"saved {host.n_tokens:,} tokens ({size:.1f} MiB, prefill {host.prefill_s:.1f} s) -> {target}")
    return 0


def _load(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        t0 = time.perf_counter()
        host = read_snapshot(args.file, expect=engine.state_layout)
        with engine.restore(host) as snap:
            print(f"restored {snap.n_tokens:,} tokens in {time.perf_counter() - t0:.3f} s", file=sys.stderr)
            if args.ask:
                answers = snap.fan_out(args.ask, max_tokens=args.max_tokens)
                for ask, answer in zip(args.ask, answers, strict=True):
                    print(f"## {ask}\n{answer.text.strip()}\n")
    return 0


def _ls(args: argparse.Namespace) -> int:
    if not args.paths and args.snapshot_url is None:
        raise KvforkError("name store folders or snapshot files, or --snapshot-url URL")
    rows = []
    if args.snapshot_url is not None:
        for e in SnapshotStore(ram_bytes=0, url=args.snapshot_url).entries():
            rows.append((e.key[:16], e.model_desc, e.n_tokens, e.nbytes, e.created, args.snapshot_url))
    for path in args.paths:
        if path.is_dir():
            for e in SnapshotStore(path, ram_bytes=0).entries():
                rows.append((e.key[:16], e.model_desc, e.n_tokens, e.nbytes, e.created, str(path)))
        else:
            try:
                head, _ = read_header(path)
            except KvforkError as exc:
                print(f"{path}: {exc}", file=sys.stderr)
                continue
            layout = head.layout
            rows.append(("-", layout.model_desc, head.n_tokens, head.file_size, head.created, str(path)))
    print(f"{'key':16}  {'tokens':>8}  {'MiB':>8}  {'created':19}  model / where")
    for key, desc, n, size, created, where in sorted(rows, key=lambda r: -r[4]):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
        print(f"{key:16}  {n:>8,}  {size / 2**20:>8.1f}  {stamp}  {desc} / {where}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    store = SnapshotStore(args.store, ram_bytes=0)
    keys = [e.key for e in store.entries()]
    status = 0
    for prefix in args.keys:
        hits = [k for k in keys if k.startswith(prefix)]
        if len(hits) != 1:
            how_many = "more than one" if hits else "no"
            print(f"{prefix}: {how_many} snapshot with that key", file=sys.stderr)
            status = 1
            continue
        store.remove(hits[0])
        print(f"removed {hits[0]}")
    return status


def _stats(args: argparse.Namespace) -> int:
    store = SnapshotStore(args.store, ram_bytes=0)
    per_model: dict[str, dict[str, int]] = {}
    for e in store.entries():
        m = per_model.setdefault(e.model_desc, {"entries": 0, "bytes": 0, "tokens": 0})
        m["entries"] += 1
        m["bytes"] += e.nbytes
        m["tokens"] += e.n_tokens
    out = {"folder": str(args.store), "bytes_disk": store.stats().bytes_disk, "models": per_model}
    print(json.dumps(out, indent=2))
    return 0
