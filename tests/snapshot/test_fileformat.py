"""Snapshot files: round trip, and a clear error for every kind of bad file."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from kvfork import Engine
from kvfork.errors import SnapshotCorrupt, SnapshotMismatch
from kvfork.store.fileformat import FORMAT_VERSION, MAGIC, read_header, read_snapshot, write_snapshot
from tests.support.snap import fake_layout, fake_snapshot

TOKENS = list(range(2, 202))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return write_snapshot(tmp_path / "a.kvs", fake_snapshot(TOKENS, payload=5000))


def test_round_trip(tmp_path: Path) -> None:
    snap = fake_snapshot(TOKENS, payload=5000)
    path = write_snapshot(tmp_path / "a.kvs", snap)
    assert read_snapshot(path, expect=snap.layout) == snap
    head, tokens = read_header(path, with_tokens=True)
    assert tokens == tuple(TOKENS) and head.n_pos == len(TOKENS) and head.payload_size == 5000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_truncated_file(saved: Path) -> None:
    data = saved.read_bytes()
    for cut in (3, 15, 40, len(data) - 1):
        saved.write_bytes(data[:cut])
        with pytest.raises(SnapshotCorrupt, match="truncated|too short|damaged"):
            read_snapshot(saved)


def test_corrupt_payload_and_tokens(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[-10] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt, match=r"payload is damaged \(xxh3_128 mismatch\)"):
        read_snapshot(saved)
    head, _ = read_header(saved)
    data[-10] ^= 0xFF
    data[head.data_offset + 8] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt, match="token ids are damaged"):
        read_snapshot(saved)


def test_foreign_files(tmp_path: Path) -> None:
    for name, blob in {"empty": b"", "text": b"hello world" * 10, "gguf": b"GGUF" + bytes(100)}.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(SnapshotCorrupt):
            read_snapshot(path)
    garbage_header = MAGIC + struct.pack("<II", 1, 5) + b"{nope" + bytes(10)
    (tmp_path / "g").write_bytes(garbage_header)
    with pytest.raises(SnapshotCorrupt, match="damaged header"):
        read_snapshot(tmp_path / "g")


def _as_version_1(path: Path) -> None:
    """Rewrite a snapshot file as kvfork wrote it before format version 2: sha256 digests."""
    data = path.read_bytes()
    size = struct.unpack("<I", data[12:16])[0]
    header = json.loads(data[16 : 16 + size])
    tokens = data[16 + size : 16 + size + 4 * header["n_tokens"]]
    payload = data[16 + size + 4 * header["n_tokens"] :]
    del header["payload_xxh3_128"], header["tokens_xxh3_128"]
    header.update(format=1, payload_sha256=hashlib.sha256(payload).hexdigest(),
                  tokens_sha256=hashlib.sha256(tokens).hexdigest())
    blob = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<II", 1, len(blob)) + blob + tokens + payload)


def test_version_1_files_are_still_read_and_checked(tmp_path: Path) -> None:
    snap = fake_snapshot(TOKENS, payload=5000)
    saved = write_snapshot(tmp_path / "a.kvs", snap)
    _as_version_1(saved)
    assert read_snapshot(saved, expect=snap.layout) == snap and read_header(saved)[0].version == 1
    data = bytearray(saved.read_bytes())
    data[-10] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorrupt, match=r"payload is damaged \(sha256 mismatch\)"):
        read_snapshot(saved)


def test_other_format_version(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[8:12] = struct.pack("<I", 99)
    saved.write_bytes(bytes(data))
    with pytest.raises(SnapshotMismatch, match="format version 99"):
        read_snapshot(saved)


def test_other_model_or_layout(saved: Path) -> None:
    with pytest.raises(SnapshotMismatch, match="another model"):
        read_snapshot(saved, expect=fake_layout(model="0" * 64))
    with pytest.raises(SnapshotMismatch, match="n_swa"):
        read_snapshot(saved, expect=fake_layout(n_swa=512))


def test_header_field_missing(saved: Path) -> None:
    data = saved.read_bytes()
    size = struct.unpack("<I", data[12:16])[0]
    header = json.loads(data[16 : 16 + size])
    del header["layout"]["kv_type"]
    blob = json.dumps(header).encode()
    saved.write_bytes(data[:8] + struct.pack("<II", FORMAT_VERSION, len(blob)) + blob + data[16 + size :])
    with pytest.raises(SnapshotMismatch, match="kv_type"):
        read_snapshot(saved)


def test_engine_refuses_a_snapshot_of_another_model(engine: Engine, tmp_path: Path) -> None:
    snap = fake_snapshot(TOKENS)
    with pytest.raises(SnapshotMismatch, match="another model"):
        engine.restore(snap)
    path = write_snapshot(tmp_path / "x.kvs", snap)
    with pytest.raises(SnapshotMismatch):
        engine.restore(read_snapshot(path))


def test_real_snapshot_file_round_trip(engine: Engine, short_doc: str, tmp_path: Path) -> None:
    with engine.prefill(short_doc, chat=False) as live:
        want = live.fan_out(["\n\nIn short,"], max_tokens=8, temperature=0)[0].tokens
        path = write_snapshot(tmp_path / "doc.kvs", live.to_host())
    with engine.restore(read_snapshot(path)) as back:
        assert back.fan_out(["\n\nIn short,"], max_tokens=8, temperature=0)[0].tokens == want
