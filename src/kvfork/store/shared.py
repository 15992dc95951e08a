"""SharedTier: snapshot files every replica reads, behind an fsspec URL (a shared folder, an S3 bucket).

    file:///mnt/nfs/kvfork     a folder on a shared (or local) file system
    s3://bucket/kvfork         an S3-compatible bucket (needs s3fs: the `s3` extra)

The files are today's snapshot files (store/fileformat.py: magic, version, layout fingerprint,
token ids, checksums), named `<key>.kvs` by the same content key a SnapshotStore uses, so any replica
finds any other's prefixes. The tier has no budget and evicts nothing: it is shared, and one
replica cannot know what the others still use (clean it up out of band, e.g. a bucket lifecycle rule).
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from kvfork.config import check_url
from kvfork.errors import SnapshotMismatch
from kvfork.store.disk import SUFFIX, reconcile
from kvfork.store.fileformat import (
    TMP_SUFFIX,
    FileHeader,
    decode_snapshot,
    encode_snapshot,
    parse_header,
    write_encoded,
)
from kvfork.store.host import HostSnapshot
from kvfork.store.keys import as_array, entry_key
from kvfork.store.layout import StateLayout

__all__ = ["SharedTier", "SharedEntry"]

log = logging.getLogger(__name__)

# NOTE: object stores where one PUT makes a whole object appear at once (multipart uploads too, at
# their completion): no temp name and rename there, which S3 cannot do atomically anyway.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})
_HEAD_BLOCK = 1 << 16  # a header and a few thousand token ids: one ranged read for most files


@dataclass(frozen=True)
class SharedEntry:
    """One complete snapshot file of the shared tier, as a listing and its header found it."""

    key: str
    path: str  # the filesystem's own path (no scheme)
    size: int
    header: FileHeader
    tokens: tuple[int, ...]


class SharedTier:
    """Files `<key>.kvs` under one fsspec URL, read and written by any number of replicas.

    Contract: `refresh`, `get`, `quarantine` and `entries` are not thread-safe (the store locks
    around them); `publish` touches no state of this object, so it may run on a writer thread.
    The index is the listing itself (one LIST, at most every `refresh_s`) plus each new file's
    header and token ids (one ranged read); a file that fails its checks is refused, counted in
    `refused` and skipped until it changes, and never raises out of `refresh`.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, *, refresh_s: float = 2.0,
                 stale_tmp_s: float = 3600.0) -> None:
        from fsspec.core import url_to_fs
        from fsspec.implementations.local import LocalFileSystem

        check_url(url)
        self.url = url
        self.fs, root = url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple | list) else (self.fs.protocol,)
        self.object_store = bool(_OBJECT_STORES.intersection(protocols))
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)
        self.refresh_s = refresh_s
        self.stale_tmp_s = stale_tmp_s
        self.entries: dict[str, SharedEntry] = {}
        self.refused = 0  # files refused at scan time: damaged, foreign, misnamed
        self._bad: set[tuple[str, int, str]] = set()  # (name, size, version) of refused files
        self._due = float("-inf")  # monotonic time of the next listing
        self._listed = float("-inf")  # monotonic time of the last listing
        self._backoff = 0.0  # seconds between listings while the tier cannot be reached

    @property
    def nbytes(self) -> int:
        return sum(e.size for e in self.entries.values())

    def path(self, key: str) -> str:
        return f"{self.root}/{key}{SUFFIX}"

    # -- index --------------------------------------------------------------------------------
    def refresh_now(self, min_age_s: float = 0.25) -> tuple[list[SharedEntry], list[str]]:
        """List now, unless listed in the last `min_age_s` or backing off after a failure: a prompt about to
        be prefilled asks, since another replica may have written its prefix since the last listing."""
        if self._backoff or time.monotonic() - self._listed < min_age_s:
            return [], []
        return self.refresh(force=True)

    def refresh(self, force: bool = False) -> tuple[list[SharedEntry], list[str]]:
        """List the tier if `refresh_s` passed (or `force`): return (new entries, keys whose files went).

        NOTE: a listing that fails (network, permissions) keeps the entries known so far: the tier
        is a cache, and a replica that cannot reach it just prefills. It is tried again after a
        growing pause (1 s doubling to 60 s), since each try may wait for the driver's timeouts on
        the caller's thread.
        """
        now = time.monotonic()
        if not force and now < self._due:
            return [], []
        self._due = now + self.refresh_s
        self._listed = now
        try:
            self.fs.invalidate_cache(self.root)  # NOTE: s3fs caches listings; we want the bucket's now
            infos = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            infos = []  # an empty prefix of a bucket does not exist until something is written under it
        except Exception as exc:  # noqa: BLE001 - any driver's error: keep serving from what we know
            if not self._backoff:
                log.warning("cannot list the shared snapshot tier %s: %s", self.url, exc)
            self._backoff = min(max(2 * self._backoff, 1.0), 60.0)
            self._due = time.monotonic() + max(self.refresh_s, self._backoff)
            return [], []
        self._backoff = 0.0
        present: dict[str, dict[str, Any]] = {}
        for info in infos:
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if info.get("type") != "file":
                continue
            if name.endswith(SUFFIX) and not name.startswith("."):
                present[name[: -len(SUFFIX)]] = info
            elif name.startswith(".") and name.endswith(TMP_SUFFIX):
                self._maybe_clean_tmp(info)
        return reconcile(self.entries, present, self._scan)

    def _scan(self, key: str, info: dict[str, Any]) -> SharedEntry | None:
        path, size = info["name"], int(info.get("size") or 0)
        sig = (path, size, _version(info))
        if sig in self._bad:
            return None
        try:
            with self.fs.open(path, "rb", block_size=_HEAD_BLOCK) as fh:
                header, tokens = parse_header(fh, path, size, with_tokens=True)
            # NOTE: the name must be the content's key: a misnamed file would otherwise shadow
            # (and, once promoted, replace) the real entry of that key in every replica.
            if entry_key(header.layout.root, as_array(tokens)) != key:
                raise SnapshotMismatch(f"{path}: the file name is not the key of its contents")
        except FileNotFoundError:
            return None  # removed between the listing and the read
        except SnapshotMismatch as exc:  # also SnapshotCorrupt
            log.warning("refusing shared snapshot %s: %s", path, exc)
            self._refuse(sig)
            return None
        except Exception as exc:  # noqa: BLE001 - a read that failed: try again at the next listing
            log.warning("cannot read shared snapshot %s: %s", path, exc)
            return None
        return SharedEntry(key, path, size, header, tokens)

    def _refuse(self, sig: tuple[str, int, str]) -> None:
        self.refused += 1
        self._bad.add(sig)

    def _maybe_clean_tmp(self, info: dict[str, Any]) -> None:
        # NOTE: only by age: on a shared file system the writer's pid means nothing on this host.
        age = _age(info)
        if age is not None and age > self.stale_tmp_s:
            try:
                self.fs.rm_file(info["name"])
            except Exception:  # noqa: BLE001 - someone else cleaned it, or we may not
                pass

    def quarantine(self, key: str) -> None:
        """Forget `key` and skip its file in later listings (until it changes): it failed to load."""
        entry = self.entries.pop(key, None)
        if entry is not None:
            self._bad.add((entry.path, entry.size, _version_of(self.fs, entry.path)))

    # -- data ---------------------------------------------------------------------------------
    def get(self, key: str, expect: StateLayout) -> HostSnapshot:
        """Load and verify the file of `key`: SnapshotMismatch/SnapshotCorrupt if it fails a check,
        FileNotFoundError if it is gone, the driver's own error if the tier cannot be reached."""
        path = self.path(key)
        return decode_snapshot(self.fs.cat_file(path), path, expect)

    def publish(self, key: str, snap: HostSnapshot) -> SharedEntry:
        """Write `snap` as the file of `key`, atomically; return its entry (for the caller to add).

        NOTE: readers see no file or a complete one: a local folder gets a temp file, fsync and a
        rename (fileformat.write_snapshot); an object store one PUT (an object appears whole); any
        other filesystem a temp name and fs.mv. Two replicas writing one key write the same content
        (the key hashes the layout and the tokens; llama.cpp's state of a prefix is deterministic up
        to its own float paths, and either copy is a valid state of that prefix), so the last
        writer winning is safe.
        """
        path = self.path(key)
        parts = encode_snapshot(snap)
        if self.local:
            write_encoded(path, parts)
        elif self.object_store:
            self.fs.pipe_file(path, b"".join(parts))
        else:
            tmp = f"{self.root}/.{key}{SUFFIX}.{secrets.token_hex(4)}{TMP_SUFFIX}"
            try:
                self.fs.pipe_file(tmp, b"".join(parts))
                self.fs.mv(tmp, path)
            except BaseException:
                try:
                    self.fs.rm_file(tmp)
                except Exception:  # noqa: BLE001 - nothing was written
                    pass
                raise
        header, _ = parse_header(io.BytesIO(parts[0]), path, sum(map(len, parts)))
        return SharedEntry(key, path, header.file_size, header, snap.tokens)

    def remove(self, key: str) -> None:
        """Delete the file of `key` from the shared tier (an explicit act: replicas never evict it)."""
        self.entries.pop(key, None)
        try:
            self.fs.rm_file(self.path(key))
        except FileNotFoundError:
            pass


def _version(info: dict[str, Any]) -> str:
    """What changes when a file is rewritten: an ETag, else a modification time."""
    for name in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(name) is not None:
            return str(info[name])
    return ""


def _version_of(fs: Any, path: str) -> str:
    try:
        return _version(fs.info(path))
    except Exception:  # noqa: BLE001 - gone: nothing to skip
        return ""


def _age(info: dict[str, Any]) -> float | None:
    stamp = info.get("mtime", info.get("LastModified", info.get("created")))
    if isinstance(stamp, dt.datetime):
        stamp = stamp.timestamp()
    if isinstance(stamp, int | float):
        return time.time() - float(stamp)
    return None
