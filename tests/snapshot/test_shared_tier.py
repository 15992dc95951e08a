"""The shared snapshot tier: the same files behind file:// and s3:// (a moto server on loopback), and replicas."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvfork import Engine
from kvfork.config import StoreConfig
from kvfork.errors import InvalidParameter
from kvfork.store.fileformat import encode_snapshot
from kvfork.store.keys import as_array, entry_key
from kvfork.store.shared import SharedTier
from kvfork.store.store import SnapshotStore
from tests.support.snap import ENGINE_KW, MODEL, fake_snapshot

TOKENS = list(range(2, 202))
Where = tuple[str, dict[str, Any]]  # (url, storage_options)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 (no cloud); yields the storage options that reach it."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    import fsspec

    fsspec.filesystem("s3", **options).mkdir("kvfork-test")
    yield options
    server.stop()


@pytest.fixture(params=["file", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    """A fresh, empty location of the shared tier: a local folder, or a prefix of the moto bucket."""
    if request.param == "file":
        return (tmp_path / "shared").as_uri(), {}
    options = request.getfixturevalue("s3_server")
    return f"s3://kvfork-test/{uuid.uuid4().hex[:12]}", options


def _tier(where: Where, **kw: Any) -> SharedTier:
    return SharedTier(where[0], where[1], refresh_s=0.0, **kw)


def _key(snap: Any) -> str:
    return entry_key(snap.layout.root, as_array(snap.tokens))


def _store(where: Where, **kw: Any) -> SnapshotStore:
    return SnapshotStore(config=StoreConfig(url=where[0], storage_options=where[1], shared_refresh_s=0.0, **kw))


def test_publish_then_another_replica_reads(where: Where) -> None:
    snap = fake_snapshot(TOKENS, payload=5000)
    a, b = _tier(where), _tier(where)
    entry = a.publish(_key(snap), snap)
    added, gone = b.refresh()
    assert [e.key for e in added] == [entry.key] and gone == []
    assert b.entries[entry.key].tokens == tuple(TOKENS) and b.entries[entry.key].size == entry.size
    assert b.get(entry.key, snap.layout) == snap
    assert b.refresh() == ([], [])  # nothing new: no header is read again
    assert [e.key for e in a.refresh()[0]] == [entry.key]  # publish leaves the bookkeeping to the store
    b.remove(entry.key)
    assert a.refresh() == ([], [entry.key])


def test_damaged_foreign_and_misnamed_files_are_refused(where: Where) -> None:
    tier = _tier(where)
    good = fake_snapshot(TOKENS, payload=3000)
    tier.publish(_key(good), good)
    other = fake_snapshot(list(range(5, 105)))
    data = b"".join(encode_snapshot(other))
    fs = tier.fs
    fs.pipe_file(f"{tier.root}/{'0' * 64}.kvs", data)  # a valid file under another key's name
    fs.pipe_file(f"{tier.root}/{_key(other)}.kvs", data[: len(data) // 2])  # truncated
    fs.pipe_file(f"{tier.root}/{'1' * 64}.kvs", b"PK\x03\x04 not a snapshot at all")
    fs.pipe_file(f"{tier.root}/notes.txt", b"ignored: not a .kvs name")
    added, _ = tier.refresh()
    assert [e.key for e in added] == [_key(good)] and tier.refused == 3
    tier.refresh()
    assert tier.refused == 3  # refused files are skipped until they change, not read again
    fs.pipe_file(f"{tier.root}/{_key(other)}.kvs", data)  # repaired by a writer: read again, accepted
    added, _ = tier.refresh()
    assert [e.key for e in added] == [_key(other)]


def test_damaged_payload_is_a_miss_not_a_crash(where: Where) -> None:
    snap = fake_snapshot(TOKENS, payload=4000)
    writer = _store(where, shared_async=False)
    key = writer.put(snap)
    tier = writer.shared
    assert tier is not None
    raw = bytearray(tier.fs.cat_file(tier.path(key)))
    raw[-5] ^= 0xFF  # header and tokens intact (listed fine); the payload fails its sha256 on load
    tier.fs.pipe_file(tier.path(key), bytes(raw))
    reader = _store(where)
    assert reader.lookup(snap.layout, TOKENS) is not None
    assert reader.get(key, snap.layout) is None
    st = reader.stats()
    assert st.corrupt == 1 and st.misses_shared == 1 and st.hits_shared == 0
    assert reader.lookup(snap.layout, TOKENS) is None  # quarantined


def test_file_removed_by_another_replica_is_a_plain_miss(where: Where) -> None:
    snap = fake_snapshot(TOKENS)
    a, b = _store(where, shared_async=False), _store(where, shared_async=False)
    key = a.put(snap)
    assert b.lookup(snap.layout, TOKENS) is not None
    a.shared.remove(key)  # type: ignore[union-attr]
    assert b.get(key, snap.layout) is None
    st = b.stats()
    assert st.misses_shared == 1 and st.corrupt == 0 and b.lookup(snap.layout, TOKENS) is None


def test_two_writers_race_on_one_key(where: Where) -> None:
    snap = fake_snapshot(TOKENS, payload=200_000)
    key = _key(snap)
    tiers = [_tier(where), _tier(where)]
    start = threading.Barrier(len(tiers))
    errors: list[BaseException] = []

    def write(tier: SharedTier) -> None:
        try:
            start.wait()
            for _ in range(5):
                tier.publish(key, snap)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in tiers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    reader = _tier(where)
    reader.refresh()
    assert list(reader.entries) == [key] and reader.refused == 0
    assert reader.get(key, snap.layout) == snap
    if where[0].startswith("file:"):
        assert [p.name for p in Path(reader.root).iterdir()] == [f"{key}.kvs"]  # no temp file left


def test_store_restores_from_the_shared_tier_and_promotes(where: Where, tmp_path: Path) -> None:
    snap = fake_snapshot(TOKENS, payload=5000)
    a = _store(where)
    key = a.put(snap)
    assert a.flush(timeout=30)
    assert a.stats().writes_shared == 1 and a.put(snap) == key and a.stats().writes_shared == 1
    b = SnapshotStore(tmp_path / "b-disk", config=StoreConfig(url=where[0], storage_options=where[1]))
    match = b.lookup(snap.layout, TOKENS + [7, 8, 9])
    assert match is not None and match.key == key and match.n_shared == len(TOKENS)
    assert b.get(key, snap.layout) == snap
    st = b.stats()
    assert (st.hits_shared, st.promotions, st.entries_ram, st.entries_disk, st.entries_shared) == (1, 1, 1, 0, 1)
    assert b.get(key, snap.layout) == snap and b.stats().hits_ram == 1
    assert b.touch(key) and b.remove(key)  # local tiers only: the shared file stays for the others
    info = {e.key: e.tiers for e in b.entries()}
    assert info == {key: ("shared",)}
    assert b.remove(key, shared=True) and b.entries() == []
    a.close()


def test_listing_is_cached_for_refresh_s(tmp_path: Path) -> None:
    url = (tmp_path / "shared").as_uri()
    slow, writer = SharedTier(url, refresh_s=3600.0), SharedTier(url)
    slow.refresh()
    snap = fake_snapshot(TOKENS)
    writer.publish(_key(snap), snap)
    assert slow.refresh() == ([], [])  # within refresh_s: no listing
    assert [e.key for e in slow.refresh(force=True)[0]] == [_key(snap)]


def test_a_long_prefill_lists_the_shared_tier_again_first(tmp_path: Path) -> None:
    """Between periodic listings, a prompt that would prefill RELIST_TOKENS or more looks again (another
    replica may have just written its prefix); a short one does not, and neither does one every 0.25 s."""
    from kvfork.store.store import RELIST_TOKENS

    url = (tmp_path / "shared").as_uri()
    reader = SnapshotStore(config=StoreConfig(url=url, shared_refresh_s=3600.0))
    writer = SharedTier(url)
    long_tokens = list(range(1, RELIST_TOKENS + 100))
    assert reader.lookup(fake_snapshot(long_tokens).layout, long_tokens) is None  # the first listing: empty
    short, long = fake_snapshot(TOKENS), fake_snapshot(long_tokens)
    writer.publish(_key(short), short)
    writer.publish(_key(long), long)
    time.sleep(0.3)
    assert reader.lookup(short.layout, TOKENS + [1, 2]) is None  # short: the hour-old listing stands
    match = reader.lookup(long.layout, long_tokens + [5])
    assert match is not None and match.n_shared == len(long_tokens)
    assert reader.lookup(short.layout, TOKENS + [1, 2]) is not None  # that listing found both


def test_cli_lists_a_shared_tier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvfork.cli import main

    url = (tmp_path / "shared").as_uri()
    snap = fake_snapshot(TOKENS)
    SharedTier(url).publish(_key(snap), snap)
    assert main(["snapshot", "ls", "--snapshot-url", url]) == 0
    out = capsys.readouterr().out
    assert _key(snap)[:16] in out and "fake model" in out and url in out
    assert main(["snapshot", "ls"]) == 2  # nothing to list


def test_local_folder_cleans_stale_temp_files(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    tier = SharedTier(folder.as_uri(), stale_tmp_s=60.0)
    old, fresh = folder / ".abc.kvs.1234.deadbeef.tmp", folder / ".abd.kvs.1234.deadbeef.tmp"
    old.write_bytes(b"half a file")
    fresh.write_bytes(b"being written")
    os.utime(old, (time.time() - 120, time.time() - 120))
    tier.refresh(force=True)
    assert not old.exists() and fresh.exists() and tier.entries == {}


def test_other_filesystems_publish_by_temp_name_and_move() -> None:
    snap = fake_snapshot(TOKENS, payload=1000)
    root = f"memory://kvfork-{uuid.uuid4().hex[:8]}"
    tier = SharedTier(root, refresh_s=0.0)
    assert not tier.local and not tier.object_store
    entry = tier.publish(_key(snap), snap)
    assert [i.rsplit("/", 1)[-1] for i in tier.fs.ls(tier.root, detail=False)] == [f"{entry.key}.kvs"]
    assert SharedTier(root).refresh(force=True)[0][0].tokens == tuple(TOKENS)


def test_unreachable_tier_never_fails_the_store() -> None:
    pytest.importorskip("s3fs")
    options = {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}, "retries": 1}
    snap = fake_snapshot(TOKENS)
    store = SnapshotStore(config=StoreConfig(url="s3://nowhere/kvfork", storage_options=options,
                                             shared_async=False, shared_refresh_s=0.0))
    key = store.put(snap)  # the write fails and is counted; the RAM tier has it
    assert store.lookup(snap.layout, TOKENS) is not None and store.get(key) == snap
    assert store.stats().write_errors_shared == 1
    assert store.shared is not None and store.shared.refresh() == ([], [])  # backing off: no new try now


def test_config_checks_the_url() -> None:
    for bad in ("/no/scheme", "nosuchscheme://x", "simplecache::s3://b/k"):
        with pytest.raises(InvalidParameter):
            StoreConfig(url=bad)
    assert StoreConfig(url="file:///tmp/kvfork").url == "file:///tmp/kvfork"


# -- two engines, one shared tier ----------------------------------------------------------------

ASK = "\n\nIn short,"


def test_second_replica_restores_instead_of_prefilling(model_path: Path, short_doc: str, tmp_path: Path) -> None:
    url = (tmp_path / "shared").as_uri()

    def replica(name: str) -> SnapshotStore:
        return SnapshotStore(tmp_path / name, config=StoreConfig(url=url, shared_refresh_s=0.0))

    store_a = replica("a")
    with Engine(MODEL, store=store_a, **ENGINE_KW) as a, a.prefill(short_doc, chat=False) as snap:
        want = snap.fan_out([ASK], max_tokens=8, temperature=0)[0].tokens
        assert snap.sequence.n_prompt_computed == snap.n_tokens
    assert store_a.flush(timeout=60)
    store_b = replica("b")
    with Engine(MODEL, store=store_b, **ENGINE_KW) as b, b.prefill(short_doc, chat=False) as snap:
        assert snap.sequence.n_prompt_computed <= 1  # restored, not prefilled
        assert snap.fan_out([ASK], max_tokens=8, temperature=0)[0].tokens == want
    st = store_b.stats()
    assert st.hits_shared == 1 and st.tokens_saved >= snap.n_tokens - 1 and st.misses == 0
