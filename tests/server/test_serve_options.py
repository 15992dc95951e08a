"""`kvfork serve`'s options: the engine settings they give (build_server, what `serve` and a cluster replica run)."""

from __future__ import annotations

import pytest

from kvfork.cli import build_parser
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
        assert store is None and config.host == "127.0.0.1"
    finally:
        engine.close()
