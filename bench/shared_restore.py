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
import time

from arms import OUT, Arms, rotate
from restore_ops import ASK
from workload import SYSTEM, document, fmt, provenance, stats

from kvfork.config import default_threads
from kvfork.models import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=default_threads())
    args = ap.parse_args()
    rows: dict[str, list[dict]] = {}
    with Arms(resolve_model(args.model), threads=args.threads, n_ctx=8192, n_seq_max=4) as arms:
        settings = {kind: arm.info for kind, arm in arms.items()}
        for r in range(args.repeats):
            doc = document(f"shared-{r}-{time.time_ns()}")
            given = arms["kvfork"].call("prompts", doc=doc, system=SYSTEM, instructions=[ASK])
            prefix = given["prefix"]
            for kind in rotate(list(arms), r):
                if kind == "llama.cpp":
                    row = arms[kind].call("prefill", tokens=prefix)
                else:
                    row = arms[kind].call("restore", doc=doc, system=SYSTEM, tier="shared")
                    assert row.pop("tokens") == prefix, "the arms prefilled different tokens"
                    assert row["hits"] == 1 and row["computed_on_b"] < 64, row  # B restored it
                rows.setdefault(kind, []).append(row)
                print(f"repeat {r + 1} {kind:12s} prefill {row['prefill_s']:6.2f} s"
                      + (f"  restore on B {row['restore_s']:.3f} s, same reply {row['same_reply']}"
                         if "restore_s" in row else ""), flush=True)

    base = rows["llama.cpp"]
    summary: dict = {"llama.cpp": {"prefill_s": stats([b["prefill_s"] for b in base])}}
    for kind in ("kvfork", "kvfork-exact"):
        runs = rows[kind]
        summary[kind] = {
            "prefill_s": stats([x["prefill_s"] for x in runs]),
            "restore_s": stats([x["restore_s"] for x in runs]),
            "restore_over_own_prefill": stats([x["restore_s"] / x["prefill_s"] for x in runs]),
            "restore_over_llamacpp_prefill": stats([x["restore_s"] / b["prefill_s"]
                                                    for x, b in zip(runs, base, strict=True)]),
            "same_reply": sum(x["same_reply"] for x in runs), "repeats": len(runs)}
    out = {"provenance": provenance(), "settings": settings, "document_tokens": len(prefix), "url_scheme": "file",
           "summary": summary, "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "shared_restore.json").write_text(json.dumps(out, indent=1))
    print(f"\n{len(prefix)} prefix tokens, {args.repeats} repeats, median (min-max)")
    print("| arm | prefill on A | restore on B | restore / own prefill | restore / llama.cpp prefill | same reply |")
    print("|---|---|---|---|---|---|")
    print(f"| llama.cpp (prefills on every replica) | {fmt(summary['llama.cpp']['prefill_s'], ' s')} | | | | |")
    for kind in ("kvfork", "kvfork-exact"):
        s = summary[kind]
        print(f"| {kind} | {fmt(s['prefill_s'], ' s')} | {fmt(s['restore_s'], ' s', digits=3)}"
              f" | {fmt(s['restore_over_own_prefill'], '%', 100, 2)}"
              f" | {fmt(s['restore_over_llamacpp_prefill'], '%', 100, 2)} | {s['same_reply']}/{s['repeats']} |")


if __name__ == "__main__":
    main()
