"""Issue 3's measurement: restoring a ~3,500-token snapshot from disk vs prefilling it, and lookup latency.

In one run, on one engine:
  prefill:  engine.prefill(document) without a store, `--repeats` times
  restore:  engine.prefill(document) with a fresh SnapshotStore on the folder holding the snapshot
            (RAM tier empty, so each run reads, verifies and restores the file: a disk hit)
  lookup:   SnapshotStore.lookup of a 32,000-token request against a store holding several entries
Reports median/min/max, the restore/prefill ratio, and whether greedy answers are token-identical.
Targets: restore <= 2% of prefill; lookup < 5 ms. The file is read through the OS page cache.

    python bench/snapshot_restore.py [--model qwen2.5-coder-0.5b] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import tempfile
import time
from importlib import resources

from workload import stats

from kvfork import Engine
from kvfork.config import default_threads
from kvfork.store.host import HostSnapshot
from kvfork.store.store import SnapshotStore

ASK = "Summarize the incident in one sentence."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--lookups", type=int, default=200)
    args = ap.parse_args()
    doc = resources.files("kvfork").joinpath("data/sample_report.txt").read_text(encoding="utf-8")
    folder = tempfile.mkdtemp(prefix="kvfork-bench-")
    engine = Engine(args.model, n_ctx=8192, n_threads=args.threads, progress=False)
    n_tokens = len(engine.tokenize(engine.layout(doc).prefix, add_bos=True, special=True))

    prefill_s, restore_s, answers = [], [], []
    for _ in range(args.repeats):
        engine.store = None
        t0 = time.perf_counter()
        snap = engine.prefill(doc)
        prefill_s.append(time.perf_counter() - t0)
        answers.append(snap.fan_out([ASK], max_tokens=24, temperature=0)[0].tokens)
        SnapshotStore(folder).put(snap.to_host())
        snap.close()
    file_bytes = SnapshotStore(folder).stats().bytes_disk
    restored_answers = []
    for _ in range(args.repeats):
        engine.store = SnapshotStore(folder, ram_bytes=0)
        t0 = time.perf_counter()
        snap = engine.prefill(doc)
        restore_s.append(time.perf_counter() - t0)
        assert engine.store.stats().hits_disk == 1, engine.store.stats()
        restored_answers.append(snap.fan_out([ASK], max_tokens=24, temperature=0)[0].tokens)
        snap.close()
    engine.store = None

    # lookup: the stored document, a 16k entry sharing it, and ten unrelated entries up to 32k tokens
    layout = engine.state_layout
    doc_tokens = engine.tokenize(engine.layout(doc).prefix, add_bos=True, special=True)
    rng = random.Random(0)
    lookup_store = SnapshotStore(folder)
    fill = [rng.randrange(engine.model.n_vocab) for _ in range(32_000)]
    for n in (1_000, 2_000, 4_000, 8_000, 12_000, 16_000, 20_000, 24_000, 28_000, 32_000):
        lookup_store.put(HostSnapshot(tuple(rng.randrange(1000) for _ in range(n)), b"x", layout))
    lookup_store.put(HostSnapshot(tuple(doc_tokens + fill[: 16_000 - len(doc_tokens)]), b"x", layout))
    request = doc_tokens + fill[len(doc_tokens) : 32_000][::-1]
    lookup_s = []
    for _ in range(args.lookups):
        t0 = time.perf_counter()
        match = lookup_store.lookup(layout, request)
        lookup_s.append(time.perf_counter() - t0)
    assert match is not None
    engine.close()
    shutil.rmtree(folder, ignore_errors=True)

    p, r = stats(prefill_s), stats(restore_s)
    print(json.dumps({
        "model": args.model,
        "threads": args.threads,
        "machine": platform.machine(),
        "document_tokens": n_tokens,
        "snapshot_file_bytes": file_bytes,
        "prefill_s": p,
        "restore_from_disk_s": r,
        "restore_over_prefill": r["median"] / p["median"],
        "restore_target_met": r["median"] <= 0.02 * p["median"],
        "greedy_identical": all(a == answers[0] for a in answers + restored_answers),
        "lookup_request_tokens": len(request),
        "lookup_store_entries": len(lookup_store.entries()),
        "lookup_match_tokens": match.n_shared,
        "lookup_ms": {k: (v * 1000 if k != "n" else v) for k, v in stats(lookup_s).items()},
        "lookup_target_met": statistics.median(lookup_s) < 0.005,
    }, indent=2))


if __name__ == "__main__":
    main()
