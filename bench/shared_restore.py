"""Issue 20: a prefix prefilled on one replica, restored on another from the shared snapshot tier.

    python bench/shared_restore.py [--repeats 3] [--url file:///tmp/kvfork-shared]

Two engines in this process stand for two replicas: each has its own context and its own store (RAM and
disk folders of its own) and both name the same shared tier (a local folder by default; any fsspec URL).
Per repeat, a document with a new first line (~3,500 tokens of the bundled report): replica A prefills it
(timed) and its store writes it to the shared tier; replica B then prefills the same document, which
finds it in the shared tier and restores it instead (timed: lookup, read, checks, state load). Reported:
both times, their ratio (target <= 2%), and whether B's greedy reply equals A's. Default model, fast mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from workload import document

from kvfork import Engine, SnapshotStore, StoreConfig, resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--url", default=None, help="the shared tier (default: a new local folder)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/shared_restore.json"))
    args = ap.parse_args()
    path = resolve_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or (Path(tmp) / "shared").as_uri()
        stores = [SnapshotStore(Path(tmp) / name, config=StoreConfig(url=url, shared_refresh_s=0.0))
                  for name in ("a", "b")]
        with Engine(path, n_ctx=8192, store=stores[0], progress=False) as a, \
                Engine(path, n_ctx=8192, store=stores[1], progress=False) as b:
            for r in range(args.repeats):
                doc = document(f"shared-{r}-{time.time_ns()}")
                t0 = time.perf_counter()
                with a.prefill(doc) as snap:
                    t_prefill = time.perf_counter() - t0
                    n_tokens = snap.n_tokens
                    want = snap.fan_out(["Summarize the incident in one sentence."], max_tokens=16)[0].tokens
                assert stores[0].flush(timeout=120)
                t0 = time.perf_counter()
                with b.prefill(doc) as snap:
                    t_restore = time.perf_counter() - t0
                    computed = snap.sequence.n_prompt_computed
                    got = snap.fan_out(["Summarize the incident in one sentence."], max_tokens=16)[0].tokens
                rows.append({"repeat": r, "tokens": n_tokens, "prefill_s": t_prefill, "restore_s": t_restore,
                             "ratio": t_restore / t_prefill, "computed_on_b": computed, "same_reply": got == want})
                print(f"repeat {r}: {n_tokens} tokens, prefill on A {t_prefill:.2f} s, restore on B "
                      f"{t_restore:.3f} s ({100 * t_restore / t_prefill:.2f}%), B computed {computed} tokens, "
                      f"same reply: {got == want}", flush=True)
        shared = stores[1].stats()
        for store in stores:
            store.close()
    ratios = [row["ratio"] for row in rows]
    summary = {"model": args.model, "url_scheme": url.split("://")[0], "rows": rows,
               "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "hits_shared_on_b": shared.hits_shared}
    print(f"restore / prefill: {100 * summary['ratio_median']:.2f}% (median; {100 * min(ratios):.2f}-"
          f"{100 * max(ratios):.2f}), B's shared hits {shared.hits_shared}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
