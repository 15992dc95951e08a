"""Issue 20: a prefix prefilled on one replica, restored on another from the shared snapshot tier, against
llama.cpp prefilling it (issue 16): kvfork fast, kvfork exact and llama.cpp side by side, each in its own
process (bench/arms.py).

    python bench/shared_restore.py [--repeats 3] [--threads 2]

In each kvfork process two engines stand for two replicas: each has its own context and its own store (RAM
and disk folders of its own), and both name the same shared tier (a local folder, `file://`). Per repeat, a
document with a new first line (~3,500 tokens of the bundled report under the benchmarks' system prompt), the
arms in rotated order: replica A prefills it (timed) and its store writes it to the shared tier; replica B
then gets the same document, finds it in the shared tier and restores it (timed: lookup, read, checks, state
load); B's greedy reply must equal A's. llama.cpp (llama-cpp-python's Llama, its defaults) prefills the same
tokens: what a replica without the shared tier computes. Reported: median (min-max) of each time, restore /
prefill within an arm (target <= 2%), and restore / llama.cpp's prefill within each repeat.
"""

from __future__ import annotations

import argparse
import json

from arms import OUT
from restore_ops import side_by_side, summarize, table
from workload import provenance

from kvfork.config import default_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args()
    rows, prefix, settings, _ = side_by_side("shared", args.model, args.repeats, args.threads)
    summary = summarize(rows)
    out = {"provenance": provenance(), "settings": settings, "document_tokens": len(prefix), "url_scheme": "file",
           "summary": summary, "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "shared_restore.json").write_text(json.dumps(out, indent=1))
    print("\n" + table(summary, len(prefix)))


if __name__ == "__main__":
    main()
