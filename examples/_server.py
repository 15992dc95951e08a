"""What the framework examples share: reading `kvfork serve`'s /metrics and model list, printing what it shared,
and the command line (`--base-url`, `--api-key`, `--model`)."""

from __future__ import annotations

import argparse
import json
import re
import urllib.request
from collections.abc import Callable


def metric(base_url: str, name: str) -> float:
    """A counter of the server's /metrics (0 when it has not counted anything yet)."""
    text = urllib.request.urlopen(f"{base_url.rsplit('/v1', 1)[0]}/metrics").read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def served_model(base_url: str, api_key: str) -> str:
    """The id the server lists first (kvfork serves one model)."""
    req = urllib.request.Request(f"{base_url}/models", headers={"Authorization": f"Bearer {api_key}"})
    return json.loads(urllib.request.urlopen(req).read())["data"][0]["id"]


def show_shared(result: dict, line: Callable[[dict], str]) -> None:
    """Each request's line (`line(request)`), then the cached tokens and the /metrics totals."""
    print("\n--- what the server shared ---")
    for i, r in enumerate(result["requests"], 1):
        print(f"request {i}{line(r)}")
    total = result["prefill_computed"] + result["prefill_reused"]
    print(f"cached tokens: {result['cached_tokens']:,.0f}; /metrics: {total:,.0f} prompt tokens, "
          f"{result['prefill_reused']:,.0f} reused from a shared prefix, {result['prefill_computed']:,.0f} prefilled")


def cli(doc: str | None, main: Callable[..., dict], show: Callable[[dict], None]) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--model", default=None, help="model id (default: the one the server lists)")
    args = parser.parse_args()
    show(main(args.base_url, args.api_key, args.model))
