"""`kvfork serve`: the OpenAI-compatible server on one model (needs the `server` extra)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from kvfork.config import EXACT_HELP, EngineConfig, ServerConfig
from kvfork.errors import InvalidParameter, KvforkError
from kvfork.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from kvfork.runtime import Engine
    from kvfork.store.store import SnapshotStore

__all__ = ["add_server_commands", "build_server", "load_adapters"]


def add_server_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `kvfork serve` (its func takes the parsed args and returns an exit code)."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible server that shares prefill across requests")
    p.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or GGUF path")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/*")
    p.add_argument("--n-ctx", type=int, default=8192, help="KV cells shared by every request")
    p.add_argument("--n-seq-max", type=int, default=64, help="sequence ids: live prefixes + prompts + choices")
    p.add_argument("--live-prefixes", type=int, default=ServerConfig.live_prefixes,
                   help="idle prefilled prefixes kept for later requests, LRU out (default: --n-seq-max less"
                   " --max-running, at least 48)")
    p.add_argument("--max-running", type=int, default=EngineConfig.max_running,
                   help="sequences running at once (choices and prompts); the rest wait (default %(default)s)")
    # NOTE: the batch is also the most prefill tokens per step: a long prompt is chunked so that the
    # branches already decoding wait at most one chunk per token.
    p.add_argument("--batch", type=int, default=512,
                   help="tokens per decode step (prefill chunk cap; llama.cpp's default ubatch)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--exact", action="store_true", help=EXACT_HELP)
    # NOTE: None takes the mode's own (see EngineConfig): fast = f16, exact = q8_0 (and flash attention "on")
    p.add_argument("--kv-type", choices=["q8_0", "f16", "f32"], default=None,
                   help="KV cache type (default: f16; --exact: q8_0)")
    # NOTE: a server's one pool holds other requests' live prefixes. Without flash attention every decode
    # row attends over all cells up to the highest in use, masked; ggml's CPU flash-attention kernel skips
    # a masked cell. Measured (bench/pool_attention.py, 8 branches over a 1,300-token prefix, 16 / 40 other
    # prefixes held): a decode step 0.80 / 1.81 s off against 0.27 / 0.38 s on, a new prompt's prefill
    # 26 / 11 against 108 / 55 tokens/s. So serve takes llama-server's default, "auto", in fast mode
    p.add_argument("--flash-attn", choices=["on", "off", "auto"], default=None,
                   help="default: auto (llama-server's; on for a CPU); --exact: on")
    p.add_argument("--chat-template", default=None, help="llama.cpp template name for models without one")
    p.add_argument("--store", default=None, metavar="DIR", help="snapshot store folder (restores long prefixes)")
    p.add_argument("--store-ram-mb", type=int, default=None,
                   help="host RAM for prefixes out of the context (default 1024; 0: none, idle prefixes stay live)")
    p.add_argument("--store-disk-mb", type=int, default=None, help="store's disk budget (default 16384)")
    p.add_argument("--snapshot-url", default=None, metavar="URL",
                   help="shared snapshot tier every replica reads: file:///shared/dir or s3://bucket/prefix"
                        " (S3 endpoint and keys from AWS_* or FSSPEC_S3 environment variables)")
    p.add_argument("--model-name", default=None, help="the id /v1/models lists (default: the file's stem)")
    p.add_argument("--max-queued", type=int, default=64, help="requests in flight before 429")
    p.add_argument("--max-n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=2048, help="cap on max_tokens per choice")
    # NOTE: opt-in and approximate: see docs/reuse.md for what each mode costs in quality
    p.add_argument("--reuse", choices=["exact", "shift", "kvcomm", "blend"], default="exact",
                   help="chat requests' default reuse of long messages seen before at another offset")
    p.add_argument("--reuse-min-tokens", type=int, default=64, help="shortest message kept as a segment")
    p.add_argument("--reuse-cache-mb", type=int, default=256, help="host memory for message segments")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA decoder served as model '<id>+NAME' over the shared base prefill (repeatable)")
    p.add_argument("--naive-adapters", action="store_true",
                   help="serve adapters not trained on base KV over it anyway (approximate; see docs/prefillshare.md)")
    c = p.add_argument_group("cluster (the `cluster` extra: Ray Serve)")
    c.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="serve through N engine replicas on Ray Serve, routed by shared prefix")
    c.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="join this Ray cluster (e.g. ray://head:10001 or auto); default: start a local one")
    c.add_argument("--spill-tokens", type=int, default=None,
                   help="work margin (tokens) past which a prefix hit goes to a less loaded replica")
    c.add_argument("--replica-cpus", type=float, default=None,
                   help="CPUs Ray reserves per engine replica (default: its --threads, else 1)")
    p.set_defaults(func=_serve)


def load_adapters(engine: Engine, specs: list[str], *, naive: bool) -> None:
    """Load `NAME=PATH` adapters. The server forks every prompt from base-model prefixes, so each adapter
    must read base KV: cache-conditioned decoders do; others only with `naive` (approximate)."""
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InvalidParameter(f"--adapter takes NAME=PATH; got {spec!r}")
        adapter = engine.load_adapter(name, path, prefill="base" if naive else None)
        if adapter.prefill != "base":
            raise InvalidParameter(
                f"adapter {name!r} was not trained on base-model KV (kvfork.decoder.prefill is not 'base'), and"
                " the server shares base prefills: train it with `kvfork train-decoder --mode cache`, or pass"
                " --naive-adapters to serve it over base KV anyway (approximate)"
            )


def build_server(args: argparse.Namespace) -> tuple[Engine, SnapshotStore | None, ServerConfig]:
    """The engine (adapters loaded), its store and the server settings that `kvfork serve`'s options name;
    a cluster replica builds its own from the same options."""
    from kvfork.runtime import Engine
    from kvfork.store.store import SnapshotStore

    config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
                          max_queued=args.max_queued, max_n=args.max_n, max_tokens=args.max_tokens,
                          reuse=args.reuse, reuse_min_tokens=args.reuse_min_tokens,
                          reuse_cache_mb=args.reuse_cache_mb, live_prefixes=args.live_prefixes)
    overrides: dict = {"n_ctx": args.n_ctx, "n_seq_max": args.n_seq_max, "max_running": args.max_running,
                       "n_batch": args.batch,
                       "n_ubatch": args.batch, "verbose": args.verbose, "progress": False,
                       "kv_type": args.kv_type, "exact": args.exact,
                       "flash_attn": args.flash_attn or (None if args.exact else "auto")}
    if args.threads:
        overrides["n_threads"] = args.threads
    if args.chat_template:
        overrides["chat_template"] = args.chat_template
    budgets = {k: v << 20 for k, v in (("ram_bytes", args.store_ram_mb), ("disk_bytes", args.store_disk_mb))
               if v is not None}
    if budgets.get("disk_bytes") is not None and not args.store:
        raise KvforkError("--store-disk-mb needs --store DIR")
    if any(v < 0 for v in budgets.values()):
        raise KvforkError(f"--store-ram-mb and --store-disk-mb must be >= 0, got {args.store_ram_mb} and"
                          f" {args.store_disk_mb}")
    # NOTE: a host-RAM tier by default, as llama-server's --cache-ram: idle prefixes wait there rather than in
    # the context, where every other request's attention reads them (Scheduler.park_idle); 0 turns it off
    ram_tier = args.store_ram_mb is None or args.store_ram_mb > 0
    store = SnapshotStore(args.store, url=args.snapshot_url, **budgets) \
        if args.store or args.snapshot_url or ram_tier else None
    engine = Engine(args.model, store=store, **overrides)
    try:
        load_adapters(engine, args.adapter, naive=args.naive_adapters)
    except BaseException:
        engine.close()
        if store is not None:
            store.close()
        raise
    return engine, store, config


def _serve(args: argparse.Namespace) -> int:
    # NOTE: with --replicas or --cluster, kvfork/cli.py hands the options to kvfork.cluster instead
    import uvicorn  # NOTE: imported late so `kvfork --help` works without the server extra's import cost

    from kvfork.server.app import create_app

    engine, store, config = build_server(args)
    app = create_app(engine, config)
    if config.host not in ("127.0.0.1", "localhost", "::1") and config.api_key is None:
        print(f"warning: serving on {config.host} without --api-key: anyone who can reach it can use it")
    print(f"kvfork serve: {engine.model_path.name} on http://{config.host}:{config.port}/v1"
          f" (model id '{app.state.kv.model_id}', {'exact' if engine.config.exact else 'fast'} mode)")
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="info" if args.verbose else "warning")
    finally:
        engine.close()
        if store is not None:
            store.close()  # NOTE: the prefixes close() demoted reach the shared tier before we exit
    return 0
