"""DiskTier: snapshot files in one folder, shared by processes, under a byte budget with LRU eviction."""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kvfork.errors import SnapshotMismatch
from kvfork.store.fileformat import (
    TMP_SUFFIX,
    FileHeader,
    encode_snapshot,
    parse_header,
    read_header,
    read_snapshot,
    write_encoded,
)
from kvfork.store.host import HostSnapshot
from kvfork.store.layout import StateLayout

__all__ = ["DiskTier", "DiskEntry", "SUFFIX", "reconcile"]

log = logging.getLogger(__name__)

SUFFIX = ".kvs"
E = TypeVar("E")
F = TypeVar("F")


def reconcile(entries: dict[str, E], present: Mapping[str, F],
              scan: Callable[[str, F], E | None]) -> tuple[list[E], list[str]]:
    """Bring a tier's `entries` in line with a listing of the files `present`: forget the keys whose files
    went, `scan` the new ones (None: unreadable, left out). Returns (new entries, keys that went)."""
    gone = [k for k in entries if k not in present]
    for key in gone:
        del entries[key]
    added = []
    for key, found in present.items():
        if key not in entries:
            entry = scan(key, found)
            if entry is not None:
                entries[key] = entry
                added.append(entry)
    return added, gone


@dataclass(frozen=True)
class DiskEntry:
    """One complete snapshot file, as a scan found it."""

    key: str
    path: Path
    size: int
    header: FileHeader
    tokens: tuple[int, ...]


class DiskTier:
    """Files `<key>.kvs` in `folder`; any number of processes may read and write the folder at once.

    Contract: not thread-safe (the store locks around it). Recency is the file mtime (a hit touches
    it), so processes sharing the folder share one LRU order. Files appear only by atomic rename, so
    a scan sees complete files; temp files of writers that died are removed once stale.
    """

    def __init__(self, folder: str | os.PathLike[str], budget: int, stale_tmp_s: float = 3600.0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self.stale_tmp_s = stale_tmp_s
        self.entries: dict[str, DiskEntry] = {}
        self._bad: set[tuple[str, int, int]] = set()  # (name, size, mtime) of unreadable files, skipped
        self._dir_mtime = -1

    @property
    def nbytes(self) -> int:
        return sum(e.size for e in self.entries.values())

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def refresh(self, force: bool = False) -> tuple[list[DiskEntry], list[str]]:
        """Rescan the folder if it changed: return (new entries, keys whose files disappeared)."""
        try:
            mtime = self.folder.stat().st_mtime_ns
        except FileNotFoundError:  # someone deleted the folder: start over, empty
            self.folder.mkdir(parents=True, exist_ok=True)
            mtime = self.folder.stat().st_mtime_ns
        if mtime == self._dir_mtime and not force:
            return [], []
        self._dir_mtime = mtime
        present: dict[str, os.DirEntry[str]] = {}
        with os.scandir(self.folder) as it:
            for d in it:
                if d.name.endswith(SUFFIX) and not d.name.startswith("."):
                    present[d.name[: -len(SUFFIX)]] = d
                elif d.name.startswith(".") and d.name.endswith(TMP_SUFFIX):
                    self._maybe_clean_tmp(d)
        return reconcile(self.entries, present, self._scan)

    def _scan(self, key: str, d: os.DirEntry[str]) -> DiskEntry | None:
        try:
            st = d.stat()
        except OSError:
            return None
        sig = (d.name, st.st_size, st.st_mtime_ns)
        if sig in self._bad:
            return None
        try:
            header, tokens = read_header(d.path, with_tokens=True)
        except SnapshotMismatch as exc:  # also SnapshotCorrupt: a foreign or damaged file is skipped
            if isinstance(exc.__cause__, FileNotFoundError):
                return None  # NOTE: removed since the listing (another process evicted it): not damaged
            log.warning("skipping snapshot file %s: %s", d.path, exc)
            self._bad.add(sig)
            return None
        return DiskEntry(key, Path(d.path), st.st_size, header, tokens)

    def _maybe_clean_tmp(self, d: os.DirEntry[str]) -> None:
        # NOTE: ".<name>.<pid>.<rand>.tmp": a temp file whose writer is gone (or that is very old) can
        # never be renamed into place; one whose writer is alive may be half-written right now.
        parts = d.name.split(".")
        try:
            pid = int(parts[-3])
            age = time.time() - d.stat().st_mtime
        except (ValueError, IndexError, OSError):
            return
        if age > self.stale_tmp_s or not _pid_alive(pid):
            try:
                os.unlink(d.path)
            except OSError:
                pass

    def get(self, key: str, expect: StateLayout) -> HostSnapshot:
        """Load and verify the file of `key` (SnapshotMismatch/SnapshotCorrupt on failure) and touch it."""
        snap = read_snapshot(self.path(key), expect)
        self.touch(key)
        return snap

    def quarantine(self, key: str) -> None:
        """Forget `key` and skip its file in later scans (until it changes): it failed to load."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        try:
            st = entry.path.stat()
        except OSError:
            return
        self._bad.add((entry.path.name, st.st_size, st.st_mtime_ns))

    def touch(self, key: str) -> None:
        try:
            os.utime(self.path(key))
        except OSError:
            pass

    def put(self, key: str, snap: HostSnapshot) -> list[str]:
        """Write the file of `key` (atomically), then evict least recently used files over budget."""
        if 4 * snap.n_tokens + len(snap.state) > self.budget:
            return []
        parts = encode_snapshot(snap)
        path = write_encoded(self.path(key), parts)
        # NOTE: the header comes from the bytes just written, not from the file: another process
        # sharing the folder may already have removed or replaced it.
        size = sum(map(len, parts))
        header, _ = parse_header(io.BytesIO(parts[0]), path.name, size)
        self.entries[key] = DiskEntry(key, path, size, header, snap.tokens)
        return self.evict(keep=key)

    def evict(self, keep: str | None = None) -> list[str]:
        """Delete least recently used files until the folder is within budget; return their keys."""
        evicted: list[str] = []
        if self.nbytes <= self.budget:
            return evicted
        by_age = sorted(self.entries.values(), key=lambda e: _mtime(e.path))
        total = self.nbytes
        for entry in by_age:
            if total <= self.budget:
                break
            if entry.key == keep:
                continue
            self.remove(entry.key)
            total -= entry.size
            evicted.append(entry.key)
        return evicted

    def remove(self, key: str) -> None:
        self.entries.pop(key, None)
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
