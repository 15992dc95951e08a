"""The snapshot file: magic, version, a length-prefixed JSON header, int32 token ids, the raw state blob.

    offset 0   8 bytes  MAGIC
           8   u32 LE   FORMAT_VERSION
          12   u32 LE   header length H
          16   H bytes  header, UTF-8 JSON (layout, counts, checksums, chat layout, times)
      16 + H   4*n      token ids, int32 LE
               P bytes  llama.cpp seq-state blob

No pickle: a file from anywhere can be inspected without running its code. Every check that can
fail on a foreign, truncated or damaged file raises SnapshotCorrupt; a file of another model,
layout or version raises SnapshotMismatch; llama.cpp never sees bytes that failed a check.

Checksums: version 2 files carry XXH3-128 digests of the token ids and of the payload, version 1 files
sha256 ones; both are read. They catch damage, not tampering: whoever can write a file can write its digest.
NOTE: XXH3-128 checks a 43.8 MB payload in ~1.6 ms where sha256 took ~37 ms, the largest part of a disk
restore (docs/benchmarks.md). A kvfork before version 2 refuses version 2 files as a format mismatch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from kvfork.errors import SnapshotCorrupt, SnapshotMismatch
from kvfork.store.host import HostSnapshot
from kvfork.store.layout import StateLayout

__all__ = [
    "MAGIC", "FORMAT_VERSION", "TMP_SUFFIX", "FileHeader", "write_snapshot", "read_header", "read_snapshot",
    "encode_snapshot", "write_encoded", "decode_snapshot", "parse_header", "load_snapshot",
]

MAGIC = b"KVFORK\x00S"
FORMAT_VERSION = 2
# NOTE: each format version this kvfork reads, with the checksum its digests use (version 1: sha256)
_CHECKSUMS: dict[int, tuple[str, Callable[[bytes], str]]] = {
    1: ("sha256", lambda data: hashlib.sha256(data).hexdigest()),
    2: ("xxh3_128", xxhash.xxh3_128_hexdigest),
}
TMP_SUFFIX = ".tmp"
_PRELUDE = struct.Struct("<8sII")
_MAX_HEADER = 64 << 20  # a header is a few KiB (more with a long chat prefix); larger means garbage


@dataclass(frozen=True)
class FileHeader:
    """What a snapshot file says about itself, readable without loading the payload."""

    layout: StateLayout
    n_tokens: int
    n_pos: int  # positions 0..n_pos-1 are in the state
    payload_size: int
    payload_digest: str
    tokens_digest: str
    version: int  # FORMAT_VERSION or an older one this kvfork reads (its checksum: _CHECKSUMS)
    created: float
    prefill_s: float
    chat: dict[str, Any] | None
    data_offset: int  # where the token ids start
    file_size: int

    @property
    def payload_offset(self) -> int:
        return self.data_offset + 4 * self.n_tokens

    def check(self, data: bytes, size: int, digest: str, name: str, what: str, then: str = "") -> None:
        """Raise SnapshotCorrupt ("`name`: `what` damaged (why)", and `then`) unless `data` is the `size`
        bytes whose checksum is `digest`."""
        algorithm, hexdigest = _CHECKSUMS[self.version]
        if len(data) != size:
            why = "truncated"
        elif hexdigest(data) != digest:
            why = f"{algorithm} mismatch"
        else:
            return
        raise SnapshotCorrupt(f"{name}: {what} damaged ({why}){then}")


def _tokens_bytes(tokens: tuple[int, ...]) -> bytes:
    return struct.pack(f"<{len(tokens)}i", *tokens)


def encode_snapshot(snap: HostSnapshot) -> list[bytes]:
    """The bytes of `snap`'s file, in parts (prelude + header, token ids, payload): join or write them in order.

    NOTE: parts, not one bytes object, so a writer streaming to a file does not copy the payload.
    """
    tokens = _tokens_bytes(snap.tokens)
    hexdigest = _CHECKSUMS[FORMAT_VERSION][1]
    header = {
        "format": FORMAT_VERSION,
        "layout": snap.layout.to_dict(),
        "n_tokens": snap.n_tokens,
        "n_pos": snap.n_tokens,
        "payload_size": len(snap.state),
        "payload_xxh3_128": hexdigest(snap.state),
        "tokens_xxh3_128": hexdigest(tokens),
        "created": snap.created,
        "prefill_s": snap.prefill_s,
        "chat": snap.chat_dict(),
    }
    blob = json.dumps(header, sort_keys=True).encode("utf-8")
    return [_PRELUDE.pack(MAGIC, FORMAT_VERSION, len(blob)) + blob, tokens, snap.state]


def write_snapshot(path: str | os.PathLike[str], snap: HostSnapshot) -> Path:
    """Write `snap` to `path` atomically: a temp file in the same folder, fsync, rename, fsync the folder.

    NOTE: readers see either no file or a complete one; two writers of one path each rename a
    complete file (the last wins). A writer killed half-way leaves only `.<name>.<pid>.<rand>.tmp`,
    which readers skip and DiskTier cleans up.
    """
    return write_encoded(path, encode_snapshot(snap))


def write_encoded(path: str | os.PathLike[str], parts: list[bytes]) -> Path:
    """Write the parts `encode_snapshot` made to `path`, atomically (see `write_snapshot`)."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            for part in parts:
                fh.write(part)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)
    return final


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_header(fh: BinaryIO, name: str, file_size: int, *, with_tokens: bool = False
                 ) -> tuple[FileHeader, tuple[int, ...]]:
    """The header (and the token ids if asked) of a snapshot read from `fh`, positioned at its start.

    `file_size` is the whole file's size (from a stat or a listing): the header must account for
    every byte of it. For files not on a local disk (see store/shared.py). Raises SnapshotCorrupt or
    SnapshotMismatch like `read_header`.
    """
    head = _read_header(fh, name, file_size)
    return head, (_read_tokens(fh, head, name) if with_tokens else ())


def _read_header(fh: BinaryIO, name: str, file_size: int) -> FileHeader:
    prelude = fh.read(_PRELUDE.size)
    if len(prelude) < _PRELUDE.size:
        raise SnapshotCorrupt(f"{name} is too short to be a kvfork snapshot ({file_size} bytes)")
    magic, version, size = _PRELUDE.unpack(prelude)
    if magic != MAGIC:
        raise SnapshotCorrupt(f"{name} is not a kvfork snapshot file (starts with {magic!r})")
    if version not in _CHECKSUMS:
        raise SnapshotMismatch(
            f"{name} is snapshot format version {version}; this kvfork reads versions"
            f" {', '.join(map(str, sorted(_CHECKSUMS)))}. Save the snapshot again with this kvfork"
        )
    if size > _MAX_HEADER or _PRELUDE.size + size > file_size:
        raise SnapshotCorrupt(f"{name} is truncated or damaged: a {size}-byte header in {file_size} bytes")
    try:
        data = json.loads(fh.read(size).decode("utf-8"))
        algorithm = _CHECKSUMS[version][0]
        head = FileHeader(
            layout=StateLayout.from_dict(data["layout"]),
            n_tokens=int(data["n_tokens"]),
            n_pos=int(data["n_pos"]),
            payload_size=int(data["payload_size"]),
            payload_digest=str(data[f"payload_{algorithm}"]),
            tokens_digest=str(data[f"tokens_{algorithm}"]),
            version=version,
            created=float(data["created"]),
            prefill_s=float(data["prefill_s"]),
            chat=data["chat"],
            data_offset=_PRELUDE.size + size,
            file_size=file_size,
        )
    except SnapshotMismatch:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # bad UTF-8 / JSON / fields
        raise SnapshotCorrupt(f"{name} has a damaged header ({type(exc).__name__}: {exc})") from exc
    expected = head.payload_offset + head.payload_size
    if head.n_tokens < 0 or head.payload_size < 0 or expected != file_size:
        raise SnapshotCorrupt(
            f"{name} is truncated or damaged: {expected:,} bytes promised, {file_size:,} present"
        )
    return head


def read_header(
    path: str | os.PathLike[str], *, with_tokens: bool = False
) -> tuple[FileHeader, tuple[int, ...]]:
    """The header (and the token ids if asked, checked against their checksum) without the payload."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = _read_header(fh, p.name, os.fstat(fh.fileno()).st_size)
            tokens = _read_tokens(fh, head, p.name) if with_tokens else ()
    except OSError as exc:
        raise SnapshotCorrupt(f"cannot read snapshot {p}: {exc}") from exc
    return head, tokens


def _read_tokens(fh: BinaryIO, head: FileHeader, name: str) -> tuple[int, ...]:
    raw = fh.read(4 * head.n_tokens)
    head.check(raw, 4 * head.n_tokens, head.tokens_digest, name, "token ids are")
    return struct.unpack(f"<{head.n_tokens}i", raw)


def read_snapshot(path: str | os.PathLike[str], expect: StateLayout | None = None) -> HostSnapshot:
    """Load and verify a whole snapshot file; with `expect`, also check it fits that layout.

    Raises SnapshotCorrupt (truncated, damaged, foreign) or SnapshotMismatch (other model, layout
    or format version).
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            return load_snapshot(fh, p.name, os.fstat(fh.fileno()).st_size, expect)
    except OSError as exc:
        raise SnapshotCorrupt(f"cannot read snapshot {p}: {exc}") from exc


def decode_snapshot(data: bytes, name: str, expect: StateLayout | None = None) -> HostSnapshot:
    """Verify and decode a whole snapshot file held in memory (`name` is for messages); see `read_snapshot`."""
    return load_snapshot(io.BytesIO(data), name, len(data), expect)


def load_snapshot(fh: BinaryIO, name: str, file_size: int, expect: StateLayout | None = None) -> HostSnapshot:
    """Verify and decode the snapshot `fh` holds from its current position (`file_size` bytes in all).

    Every check of `read_snapshot` applies: the header, the layout (with `expect`), the token ids'
    and the payload's checksums.
    """
    head = _read_header(fh, name, file_size)
    if expect is not None:
        head.layout.check(expect)
    tokens = _read_tokens(fh, head, name)
    state = fh.read(head.payload_size)
    head.check(state, head.payload_size, head.payload_digest, name, "the KV payload is", "; delete the file")
    if head.n_pos != head.n_tokens:
        raise SnapshotCorrupt(f"{name}: {head.n_pos} positions for {head.n_tokens} tokens")
    return HostSnapshot(
        tokens=tokens,
        state=state,
        layout=head.layout,
        chat=HostSnapshot.chat_from(head.chat),
        created=head.created,
        prefill_s=head.prefill_s,
    )
