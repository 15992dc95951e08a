"""The restore measurements each arm's child answers (bench/arms.py): a prefix prefilled once, then restored
instead of prefilled again, by kvfork (its snapshot store: a disk folder, or the shared tier replicas read)
and by llama.cpp (its own state file: `llama_state_save_file` / `llama_state_load_file`, what a
llama-cpp-python user has today).

Each kvfork restore is measured as a second replica would see it: engine A (the child's engine) prefills a
new document and its store writes it; engine B (a second context in the same child, same settings, a store
of its own on the same folder or the same shared URL) then gets the same document and restores it instead
of computing it (B never saw it: a new document per repeat, so nothing is live in B's prefix cache).
`side_by_side`, `summarize` and `table` are the parent's side, shared by bench/snapshot_restore.py (tier
"disk") and bench/shared_restore.py (tier "shared").
"""

from __future__ import annotations

import ctypes
import random
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["ASK", "KvforkRestore", "LlamaCppRestore", "side_by_side", "summarize", "table"]

ASK = "Summarize the incident in one sentence."


class KvforkRestore:
    """Mixed into KvforkChild: `self.engine` is A; B and the stores are made on first use, per tier."""

    engine: Any
    make_engine: Any  # (store) -> Engine with the child's own settings

    def restore(self, doc: str, system: str | None, tier: str, max_tokens: int = 24) -> dict[str, Any]:
        """A prefills `doc` and stores it (tier "disk": a folder; "shared": the shared tier behind fsspec);
        B restores it. Times, tokens computed on B, the file's bytes, and whether B's greedy reply is A's."""
        from kvfork import SnapshotStore, StoreConfig

        if not hasattr(self, "_tiers"):
            self._tiers: dict[str, tuple[Any, Any, Any]] = {}
            self._tmp = tempfile.TemporaryDirectory(prefix="kvfork-bench-restore-")
        if tier not in self._tiers:
            root = Path(self._tmp.name) / tier
            if tier == "disk":  # NOTE: B's RAM tier off, so every restore reads, checks and loads the file
                a_store, b_store = SnapshotStore(root / "a"), SnapshotStore(root / "a", ram_bytes=0)
            else:
                url = (root / "shared").as_uri()
                a_store, b_store = (SnapshotStore(root / n, config=StoreConfig(url=url, shared_refresh_s=0.0))
                                    for n in ("a", "b"))
            self._tiers[tier] = (a_store, b_store, self.make_engine(b_store))
        a_store, b_store, b = self._tiers[tier]
        a = self.engine
        a.store = a_store
        try:
            t0 = time.perf_counter()
            with a.prefill(doc, system=system) as snap:
                prefill_s = time.perf_counter() - t0
                tokens = list(snap.tokens)
                want = list(snap.fan_out([ASK], max_tokens=max_tokens, temperature=0)[0].tokens)
            assert a_store.flush(timeout=120), "A's store did not write the snapshot"
        finally:
            a.store = None
        before = b_store.stats()
        t0 = time.perf_counter()
        with b.prefill(doc, system=system) as snap:
            restore_s = time.perf_counter() - t0
            computed = snap.sequence.n_prompt_computed
            got = list(snap.fan_out([ASK], max_tokens=max_tokens, temperature=0)[0].tokens)
        after = b_store.stats()
        hits = (after.hits_disk - before.hits_disk) if tier == "disk" else (after.hits_shared - before.hits_shared)
        return {"prefill_s": prefill_s, "restore_s": restore_s, "n_tokens": len(tokens), "tokens": tokens,
                "computed_on_b": computed, "hits": hits, "same_reply": got == want, "reply": want,
                "file_bytes": a_store.stats().bytes_disk}

    def lookup(self, doc: str, system: str | None, n_lookups: int) -> dict[str, Any]:
        """Longest-prefix lookup of a 32,000-token request in a store of 11 entries up to 32k tokens, one of
        which shares the document's prefix (16k tokens in all): seconds per lookup, and the match."""
        from kvfork import SnapshotStore
        from kvfork.store.host import HostSnapshot

        e = self.engine
        layout = e.state_layout
        doc_tokens = e.tokenize(e.layout(doc, system=system).prefix, add_bos=True, special=True)
        rng = random.Random(0)
        fill = [rng.randrange(e.model.n_vocab) for _ in range(32_000)]
        with tempfile.TemporaryDirectory() as folder:
            store = SnapshotStore(folder)
            for n in (1_000, 2_000, 4_000, 8_000, 12_000, 16_000, 20_000, 24_000, 28_000, 32_000):
                store.put(HostSnapshot(tuple(rng.randrange(1000) for _ in range(n)), b"x", layout))
            store.put(HostSnapshot(tuple(doc_tokens + fill[: 16_000 - len(doc_tokens)]), b"x", layout))
            request = doc_tokens + fill[len(doc_tokens):32_000][::-1]
            seconds = []
            for _ in range(n_lookups):
                t0 = time.perf_counter()
                match = store.lookup(layout, request)
                seconds.append(time.perf_counter() - t0)
            entries = len(store.entries())
            store.close()
        return {"seconds": seconds, "request_tokens": len(request), "entries": entries,
                "match_tokens": match.n_shared if match else 0}


class LlamaCppRestore:
    """Mixed into LlamaCppChild: llama.cpp's own way to skip a prefill it has done before."""

    llm: Any

    def state_file(self, prefix: list[int], prompt: list[int], max_tokens: int = 24) -> dict[str, Any]:
        """Prefill `prefix`, save the context's state to a file, clear the cache, load the file back: the
        times and the file's bytes; and whether the greedy reply to `prompt` (prefix + an agent's own part)
        after the load, where Llama computes only the own part, equals the reply computed from scratch."""
        import llama_cpp

        llm, n = self.llm, len(prefix)
        want, _, _ = self._one(prompt, max_tokens, reset=True)  # type: ignore[attr-defined]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prefix)
        prefill_s = time.perf_counter() - t0
        arr = (llama_cpp.llama_token * n)(*prefix)
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "state.bin").encode()
            t0 = time.perf_counter()
            assert llama_cpp.llama_state_save_file(llm.ctx, path, arr, n)
            save_s = time.perf_counter() - t0
            file_bytes = Path(path.decode()).stat().st_size
            llm.reset()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
            out = (llama_cpp.llama_token * llm.n_ctx())()
            n_out = ctypes.c_size_t()
            t0 = time.perf_counter()
            assert llama_cpp.llama_state_load_file(llm.ctx, path, out, llm.n_ctx(), ctypes.byref(n_out))
            load_s = time.perf_counter() - t0
        assert list(out[: n_out.value]) == prefix
        llm.input_ids[:n] = prefix  # NOTE: as Llama.load_state does: generate() then reuses these cells
        llm.n_tokens = n
        got, ttft_after_load, _ = self._one(prompt, max_tokens, reset=False)  # type: ignore[attr-defined]
        return {"prefill_s": prefill_s, "save_s": save_s, "load_s": load_s, "file_bytes": file_bytes,
                "ttft_after_load_s": ttft_after_load, "same_reply": got == want, "reply": want}


# -- the parent's side: bench/snapshot_restore.py and bench/shared_restore.py ------------------------
def side_by_side(tier: str, model: str, repeats: int, threads: int,
                 after: Any = None) -> tuple[dict[str, list[dict]], list[int], dict, Any]:
    """Per repeat a document with a new first line; every arm in rotated order. kvfork fast and exact:
    A prefills, B restores through `tier`. llama.cpp: tier "disk", its own state file saved and loaded;
    tier "shared", a prefill of the same tokens (what a replica without the shared tier does).
    Returns each arm's rows, the prefix tokens, each arm's settings, and `after(arms, doc)` (run last)."""
    from arms import Arms, rotate  # NOTE: here, not at the top: arms.py imports this module for its children
    from workload import SYSTEM, document

    from kvfork.models import resolve_model

    rows: dict[str, list[dict]] = {}
    with Arms(resolve_model(model), threads=threads, n_ctx=8192, n_seq_max=4) as arms:
        settings = {kind: arm.info for kind, arm in arms.items()}
        for r in range(repeats):
            doc = document(f"{tier}-{r}-{time.time_ns()}")
            given = arms["kvfork"].call("prompts", doc=doc, system=SYSTEM, instructions=[ASK])
            prefix, (prompt,) = given["prefix"], given["prompts"]
            for kind in rotate(list(arms), r):
                if kind != "llama.cpp":
                    row = arms[kind].call("restore", doc=doc, system=SYSTEM, tier=tier)
                    assert row.pop("tokens") == prefix, "the arms prefilled different tokens"
                    assert row["hits"] == 1 and row["computed_on_b"] < 64, row  # B restored it
                elif tier == "disk":
                    row = arms[kind].call("state_file", prefix=prefix, prompt=prompt)
                    row["restore_s"] = row["load_s"]
                else:
                    row = arms[kind].call("prefill", tokens=prefix)
                rows.setdefault(kind, []).append(row)
                print(f"repeat {r + 1} {kind:12s} prefill {row['prefill_s']:6.2f} s"
                      + (f"  restore {row['restore_s']:.3f} s" if "restore_s" in row else "")
                      + (f"  same reply {row['same_reply']}" if "same_reply" in row else ""), flush=True)
        extra = after(arms, doc) if after else None
    return rows, prefix, settings, extra


def summarize(rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Per arm: prefill and restore times, restore over the arm's own prefill and over llama.cpp's (within
    each repeat), the file's size, and how many replies after a restore matched."""
    from workload import stats

    base = rows["llama.cpp"]
    out: dict[str, dict] = {}
    for kind, runs in rows.items():
        s: dict[str, Any] = {"prefill_s": stats([x["prefill_s"] for x in runs]), "repeats": len(runs)}
        if "restore_s" in runs[0]:
            s["restore_s"] = stats([x["restore_s"] for x in runs])
            s["restore_over_own_prefill"] = stats([x["restore_s"] / x["prefill_s"] for x in runs])
            s["restore_over_llamacpp_prefill"] = stats([x["restore_s"] / b["prefill_s"]
                                                        for x, b in zip(runs, base, strict=True)])
            s["file_mb"] = runs[0]["file_bytes"] / 1e6
            s["same_reply"] = sum(x["same_reply"] for x in runs)
        out[kind] = s
    return out


def table(summary: dict[str, dict], n_tokens: int) -> str:
    """The markdown table of `summarize`'s figures."""
    from workload import fmt

    lines = [f"{n_tokens} prefix tokens, median (min-max)",
             "| arm | prefill | restore | file | restore / own prefill | restore / llama.cpp prefill | same reply |",
             "|---|---|---|---|---|---|---|"]
    for kind, s in summary.items():
        if "restore_s" not in s:
            lines.append(f"| {kind} (prefills) | {fmt(s['prefill_s'], ' s')} | | | | | |")
            continue
        lines.append(f"| {kind} | {fmt(s['prefill_s'], ' s')} | {fmt(s['restore_s'], ' s', digits=3)}"
                     f" | {s['file_mb']:.1f} MB | {fmt(s['restore_over_own_prefill'], '%', 100, 2)}"
                     f" | {fmt(s['restore_over_llamacpp_prefill'], '%', 100, 2)} | {s['same_reply']}/{s['repeats']} |")
    return "\n".join(lines)
