"""SnapshotStore without a model: prefix lookup, budgets and LRU, tiers, crash and concurrency safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvfork.store import disk
from kvfork.store.store import SnapshotStore
from tests.support.snap import fake_layout, fake_snapshot

LAYOUT = fake_layout()
DOC = list(range(1000, 1300))  # 300 tokens


def test_longest_prefix_lookup_compares_tokens() -> None:
    store = SnapshotStore(block_size=16, min_tokens=16)
    short, long = store.put(fake_snapshot(DOC[:100])), store.put(fake_snapshot(DOC))
    other = store.put(fake_snapshot([7] * 50 + DOC[50:]))
    m = store.lookup(LAYOUT, DOC + [1, 2, 3])
    assert m is not None and (m.key, m.n_shared, m.n_tokens) == (long, 300, 300)
    m = store.lookup(LAYOUT, DOC[:250] + [5] * 40)  # diverges inside block 15 of the long entry
    assert m is not None and (m.key, m.n_shared) == (long, 250)
    m = store.lookup(LAYOUT, DOC[:120])
    assert m is not None and m.key == long and m.n_shared == 120
    assert store.lookup(LAYOUT, [7] * 50 + DOC[50:60]) is not None
    assert store.lookup(LAYOUT, [9] * 300) is None
    assert store.lookup(fake_layout(model="0" * 64), DOC) is None  # other model: other keys
    assert store.lookup(LAYOUT, DOC[:10]) is None  # shorter than min_tokens
    assert [x.key for x in store.matches(LAYOUT, DOC)] == [long, short]
    assert other not in [x.key for x in store.matches(LAYOUT, DOC)]


def test_sliding_window_cannot_be_trimmed_so_a_shorter_entry_is_used() -> None:
    store = SnapshotStore(block_size=16, min_tokens=16)
    swa = fake_layout(n_swa=128)
    short = store.put(fake_snapshot(DOC[:64], n_swa=128))
    store.put(fake_snapshot(DOC, n_swa=128))  # 300 tokens > window: cannot be cut back
    m = store.lookup(swa, DOC[:200] + [1] * 10)
    assert m is not None and (m.key, m.n_shared) == (short, 64)
    assert store.stats().swa_skips >= 1
    small = store.put(fake_snapshot(DOC[:120], n_swa=128))  # within the window: can be cut
    m = store.lookup(swa, DOC[:100] + [1] * 10)
    assert m is not None and (m.key, m.n_shared) == (small, 100)


def test_ram_eviction_is_lru_and_demotes_to_disk(tmp_path: Path) -> None:
    snaps = [fake_snapshot([i] * 64, payload=10_000) for i in range(4)]
    store = SnapshotStore(tmp_path, ram_bytes=25_000, disk_bytes=10**9, write_through=False, block_size=16)
    keys = [store.put(s) for s in snaps[:2]]
    store.get(keys[0])  # 0 is now the most recently used
    keys.append(store.put(snaps[2]))  # evicts 1 to disk
    st = store.stats()
    assert st.entries_ram == 2 and st.demotions == 1 and st.entries_disk == 1
    assert (tmp_path / f"{keys[1]}.kvs").exists()
    assert store.get(keys[1]) == snaps[1]  # disk hit, promoted to RAM: evicts the LRU entry (0)
    st = store.stats()
    assert st.hits_disk == 1 and st.promotions == 1 and st.hits_ram == 1 and st.demotions == 2
    assert store.ram.keys() == [keys[2], keys[1]]
    assert {p.stem for p in tmp_path.glob("*.kvs")} == {keys[0], keys[1]}


def test_disk_eviction_order_under_budget(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, ram_bytes=0, disk_bytes=35_000, block_size=16)
    keys = []
    for i in range(3):
        keys.append(store.put(fake_snapshot([i] * 64, payload=10_000)))
        time.sleep(0.01)
    store.touch(keys[0])
    keys.append(store.put(fake_snapshot([3] * 64, payload=10_000)))
    left = {p.stem for p in tmp_path.glob("*.kvs")}
    assert left == {keys[0], keys[2], keys[3]}  # keys[1] was the least recently used
    assert store.stats().evictions_disk == 1
    assert store.lookup(LAYOUT, [1] * 64) is None


def test_a_second_store_on_the_folder_sees_the_entries(tmp_path: Path) -> None:
    key = SnapshotStore(tmp_path).put(fake_snapshot(DOC))
    other = SnapshotStore(tmp_path)
    m = other.lookup(LAYOUT, DOC)
    assert m is not None and m.key == key and other.get(key) is not None
    later = SnapshotStore(tmp_path).put(fake_snapshot([5] * 100))
    assert other.lookup(LAYOUT, [5] * 100) is not None  # picked up without reopening
    assert SnapshotStore(tmp_path).remove(later) and other.lookup(LAYOUT, [5] * 100) is None


def test_corrupt_file_in_the_folder_is_skipped(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, ram_bytes=0)
    key = store.put(fake_snapshot(DOC))
    (tmp_path / ("ab" * 32 + ".kvs")).write_bytes(b"not a snapshot")
    path = tmp_path / f"{key}.kvs"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = SnapshotStore(tmp_path, ram_bytes=0)
    assert fresh.get(key) is None  # payload checksum fails: a miss, not a crash
    assert fresh.stats().corrupt == 1
    assert fresh.lookup(LAYOUT, DOC) is None


_WRITER = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {here!r})
    from tests.support.snap import fake_snapshot
    import kvfork.store.fileformat as ff
    from kvfork.store.store import SnapshotStore
    mode = sys.argv[1]
    if mode == "hang":
        ff.os.fsync = lambda fd: (print("writing", flush=True), time.sleep(60))
        SnapshotStore(sys.argv[2], ram_bytes=0).put(fake_snapshot([1] * 64, payload=2_000_000))
    else:
        store = SnapshotStore(sys.argv[2], ram_bytes=0)
        for i in range(15):
            key = store.put(fake_snapshot([2] * 64, payload=500_000))
            if i % 3 == 2:
                store.remove(key)
    """
)


def _spawn(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    script = _WRITER.format(here=str(Path(__file__).parents[2]))
    cmd = [sys.executable, "-c", script, mode, str(tmp_path)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def test_writer_killed_half_way_leaves_a_readable_store(tmp_path: Path) -> None:
    key = SnapshotStore(tmp_path).put(fake_snapshot(DOC))
    proc = _spawn(tmp_path, "hang")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].stat().st_size > 1_000_000
    store = SnapshotStore(tmp_path)  # the scan skips the temp file and removes it (its writer is dead)
    assert [e.key for e in store.entries()] == [key]
    assert store.lookup(LAYOUT, [1] * 64) is None and store.get(key) is not None
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_file_removed_by_another_process_right_after_its_write_is_not_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The race test_concurrent_writers_and_readers hit in CI: the writer read its file back after the
    # rename, and another writer sharing the folder had already removed it. The write itself worked.
    write = disk.write_encoded

    def write_then_lose(path: Path, parts: list[bytes]) -> Path:
        final = write(path, parts)
        final.unlink()
        return final

    monkeypatch.setattr(disk, "write_encoded", write_then_lose)
    store = SnapshotStore(tmp_path, ram_bytes=0)
    key = store.put(fake_snapshot(DOC))
    assert not caplog.records  # not "could not write", and no SnapshotCorrupt out of put
    assert store.get(key) is None and store.stats().corrupt == 0  # a miss, as after any removal
    monkeypatch.undo()
    assert store.get(store.put(fake_snapshot(DOC))) is not None  # and the store goes on working


def test_a_file_removed_between_the_listing_and_its_read_is_skipped_silently(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    key = SnapshotStore(tmp_path).put(fake_snapshot(DOC))
    read = disk.read_header

    def lose_then_read(path: str, **kw: bool) -> object:
        os.unlink(path)  # another process evicts it after this one listed the folder
        return read(path, **kw)

    monkeypatch.setattr(disk, "read_header", lose_then_read)
    store = SnapshotStore(tmp_path, ram_bytes=0)
    assert store.entries() == [] and not caplog.records  # gone, not "skipping" a damaged file
    monkeypatch.undo()
    assert store.put(fake_snapshot(DOC)) == key and store.get(key) is not None  # not remembered as bad


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    writers = [_spawn(tmp_path, "churn") for _ in range(2)]
    reader = SnapshotStore(tmp_path, ram_bytes=0)
    while any(w.poll() is None for w in writers):  # a reader never sees a partial or damaged file
        m = reader.lookup(LAYOUT, [2] * 64)
        if m is not None:
            reader.get(m.key)
    assert reader.stats().corrupt == 0  # misses are fine: the writers also remove the entry
    assert all(w.returncode == 0 for w in writers)
    final = SnapshotStore(tmp_path, ram_bytes=0)
    assert all(final.get(e.key) is not None for e in final.entries())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
