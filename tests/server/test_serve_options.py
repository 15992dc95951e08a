"""`kvfork serve`'s options: the engine settings they give (build_server, what `serve` and a cluster replica run)."""

from __future__ import annotations

import pytest

from kvfork.cli import build_parser
from kvfork.errors import KvforkError
from kvfork.server.cli import build_server


@pytest.mark.parametrize(("extra", "want"), [([], "auto"), (["--flash-attn", "off"], "off")])
def test_fast_mode_serves_with_llama_servers_flash_attention_default(gemma_path, extra, want):
    # a server's pool holds other requests' prefixes: flash attention skips their masked cells
    # (bench/pool_attention.py), so fast mode takes llama-server's "auto" unless told otherwise
    args = build_parser().parse_args(["serve", "--model", str(gemma_path), "--chat-template", "gemma",
                                      "--n-ctx", "1024", *extra])
    engine, store, config = build_server(args)
    try:
        assert engine.config.flash_attn == want and not engine.config.exact and engine.config.kv_type == "f16"
        assert config.host == "127.0.0.1"
    finally:
        engine.close()
        if store is not None:
            store.close()


@pytest.mark.parametrize(("extra", "ram"),
                         [([], 1 << 30), (["--store-ram-mb", "64"], 64 << 20), (["--store-ram-mb", "0"], None)])
def test_serve_keeps_a_host_ram_tier_by_default_as_llama_servers_cache_ram(gemma_path, extra, ram):
    # idle prefixes wait there instead of in the context (Scheduler.park_idle); 0 turns it off
    args = build_parser().parse_args(["serve", "--model", str(gemma_path), "--chat-template", "gemma",
                                      "--n-ctx", "1024", *extra])
    engine, store, _ = build_server(args)
    try:
        if ram is None:
            assert store is None and engine.scheduler.prefixes.lower is None
        else:
            assert store is not None and store.config.ram_bytes == ram and store.disk is None and store.shared is None
            assert engine.scheduler.prefixes.lower is not None
    finally:
        engine.close()
        if store is not None:
            store.close()


def test_a_negative_store_budget_is_refused_not_read_as_none(gemma_path):
    args = build_parser().parse_args(["serve", "--model", str(gemma_path), "--store-ram-mb", "-1"])
    with pytest.raises(KvforkError, match="--store-ram-mb"):
        build_server(args)
