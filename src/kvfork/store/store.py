"""SnapshotStore: content-addressed snapshots in tiers (host RAM, disk folder, shared URL) with prefix lookup."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvfork.config import StoreConfig
from kvfork.errors import InvalidParameter, SnapshotMismatch
from kvfork.scheduler.prefix_cache import can_trim
from kvfork.store.disk import DiskTier
from kvfork.store.host import HostSnapshot
from kvfork.store.index import PrefixIndex, PrefixMatch
from kvfork.store.keys import as_array, entry_key
from kvfork.store.layout import StateLayout
from kvfork.store.ram import RamTier
from kvfork.store.shared import SharedEntry, SharedTier
from kvfork.store.stats import StoreStats
from kvfork.store.writer import SharedWriter

__all__ = ["SnapshotStore", "StoreStats", "EntryInfo"]

RELIST_TOKENS = 512  # a lookup that leaves this much to prefill lists the shared tier again first

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EntryInfo:
    """One stored snapshot, as `entries()` lists it."""

    key: str
    tiers: tuple[str, ...]  # some of "ram", "disk", "shared"
    n_tokens: int
    nbytes: int
    created: float
    model_desc: str


class SnapshotStore:
    """Snapshots keyed by (state layout incl. model fingerprint, token ids); lookup finds the longest prefix.

    >>> store = SnapshotStore("~/.cache/kvfork/snapshots")
    >>> engine = Engine("qwen2.5-coder-0.5b", store=store)   # prefill() now restores what it can

    Tiers: RAM (always) and a disk folder (when `folder` is given), each with a byte budget and
    LRU eviction; a disk hit is promoted to RAM, a RAM eviction is demoted to disk. Thread-safe
    (one lock); any number of processes may share the folder.

    With `config.url`, a third tier every replica reads (store/shared.py): lookup goes RAM -> disk
    -> shared, a shared hit is promoted into the local tiers, and every new entry is also written
    there (write-behind on a writer thread unless `shared_async` is off; `flush` waits for it).
    The shared tier has no budget: no replica evicts it, and `remove` leaves it unless asked.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str] | None = None,
        config: StoreConfig | None = None,
        **overrides: Any,
    ) -> None:
        if config is None:
            config = StoreConfig(**overrides)
        elif overrides:
            raise InvalidParameter("pass either config or keyword overrides, not both")
        self.config = config
        self.ram: RamTier[str, HostSnapshot] = RamTier(config.ram_bytes)
        self.disk = None if folder is None else DiskTier(
            os.path.expanduser(folder), config.disk_bytes, config.stale_tmp_s
        )
        self.shared = None if config.url is None else SharedTier(
            config.url, config.storage_options, refresh_s=config.shared_refresh_s, stale_tmp_s=config.stale_tmp_s
        )
        self._writer = None if self.shared is None else SharedWriter(self.shared, self._published, self._unpublished)
        self._index = PrefixIndex(config.block_size)
        self._stats = StoreStats()
        self._lock = threading.RLock()
        self._refresh(force=True)

    # -- lookup and load ------------------------------------------------------------------------
    def matches(self, layout: StateLayout, tokens: Sequence[int] | np.ndarray) -> Iterator[PrefixMatch]:
        """Usable stored prefixes of `tokens` for an engine of `layout`, longest first."""
        with self._lock:
            self._refresh()
            found = list(self._index.matches(layout.root, as_array(tokens), self._usable(layout)))
        yield from found

    def lookup(self, layout: StateLayout, tokens: Sequence[int] | np.ndarray) -> PrefixMatch | None:
        """The longest usable stored prefix of `tokens`, or None. Token ids are compared, not just hashed.

        NOTE: where what is known leaves RELIST_TOKENS or more to prefill, the shared tier is listed again
        first (at most every 0.25 s): one LIST costs milliseconds, the prefill it may save seconds, and a
        replica spilled a request moments after another wrote its prefix would otherwise compute it again.
        """
        arr = as_array(tokens)
        with self._lock:
            self._refresh()
            hit = next(self._index.matches(layout.root, arr, self._usable(layout)), None)
            if self.shared is not None and len(arr) - (hit.n_shared if hit else 0) >= RELIST_TOKENS:
                self._apply(*self.shared.refresh_now())
                hit = next(self._index.matches(layout.root, arr, self._usable(layout)), None)
            return hit

    def _usable(self, layout: StateLayout) -> Any:
        def usable(n_entry: int, shared: int) -> bool:
            if shared < self.config.min_tokens:
                return False
            if not can_trim(layout.n_swa, n_entry, shared):
                self._stats.swa_skips += 1
                return False
            return True

        return usable

    def get(self, key: str, layout: StateLayout | None = None) -> HostSnapshot | None:
        """The snapshot of `key` from RAM, else disk, else the shared tier (a hit below RAM is promoted to
        RAM); None if gone or unreadable."""
        with self._lock:
            snap = self.ram.get(key)
            if snap is not None:
                self._stats.hits_ram += 1
                return snap
            self._stats.misses_ram += 1
            snap = self._get_disk(key, layout)
            if snap is not None:
                self._stats.hits_disk += 1
            else:
                snap = self._get_shared(key, layout)
                if snap is None:
                    return None
                self._stats.hits_shared += 1
            # NOTE: to RAM only, a shared hit too: the shared tier keeps the file already, and a local disk
            # copy written here would sit on the request's path (0.16 s of a 0.28 s restore for ~3,500 tokens
            # of qwen's f16 cache, bench/shared_restore.py); RAM's own eviction may demote it later.
            self._put_ram(key, snap)
            if key in self.ram:
                self._stats.promotions += 1
            return snap

    def _get_disk(self, key: str, layout: StateLayout | None) -> HostSnapshot | None:
        if self.disk is None or key not in self.disk.entries:
            return None
        entry = self.disk.entries[key]
        try:
            return self.disk.get(key, layout or entry.header.layout)
        except SnapshotMismatch as exc:
            self._stats.misses_disk += 1
            # NOTE: a file that vanished was evicted by another process (a plain miss); one that is
            # there but fails its checks is damaged, since files only appear by atomic rename.
            if self.disk.path(key).exists():
                log.warning("skipping unreadable snapshot %s: %s", key, exc)
                self._stats.corrupt += 1
                self.disk.quarantine(key)
            else:
                self.disk.entries.pop(key, None)
            self._drop_if_unheld(key)
            return None

    def _get_shared(self, key: str, layout: StateLayout | None) -> HostSnapshot | None:
        if self.shared is None or key not in self.shared.entries:
            return None
        entry = self.shared.entries[key]
        try:
            return self.shared.get(key, layout or entry.header.layout)
        except FileNotFoundError:  # someone cleaned the shared tier: a plain miss
            self.shared.entries.pop(key, None)
        except SnapshotMismatch as exc:  # files appear whole (rename or one PUT): this one is damaged
            log.warning("skipping unreadable shared snapshot %s: %s", key, exc)
            self._stats.corrupt += 1
            self.shared.quarantine(key)
        except Exception as exc:  # noqa: BLE001 - network or driver error: keep the entry, prefill now
            log.warning("cannot read shared snapshot %s from %s: %s", key, self.shared.url, exc)
            self._stats.misses_shared += 1
            return None
        self._stats.misses_shared += 1
        self._drop_if_unheld(key)
        return None

    # -- insert and remove ----------------------------------------------------------------------
    def put(self, snap: HostSnapshot) -> str:
        """Store `snap` (RAM, disk when write_through, the shared tier when configured); return its key.

        Idempotent per key.
        """
        arr = as_array(snap.tokens)
        key = entry_key(snap.layout.root, arr)
        with self._lock:
            self._index.add(key, snap.layout.root, arr)
            if self.disk is not None and self.config.write_through and key not in self.disk.entries:
                self._put_disk(key, snap)
            self._put_ram(key, snap)
            self._put_shared(key, snap)
            self._drop_if_unheld(key)  # too large for every local tier, and not (yet) shared
        return key

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write to the shared tier queued so far has finished; False on timeout.

        NOTE: not under the store's lock: the writer thread takes it to record what it wrote.
        """
        return True if self._writer is None else self._writer.flush(timeout)

    def close(self) -> None:
        """Finish the queued shared-tier writes and stop the writer thread (the store stays usable)."""
        if self._writer is not None:
            self._writer.close()

    def key_of(self, layout: StateLayout, tokens: Sequence[int] | np.ndarray) -> str:
        return entry_key(layout.root, as_array(tokens))

    def touch(self, key: str) -> bool:
        """Mark `key` as just used in every tier holding it; False if it is not stored (or being shared)."""
        with self._lock:
            held = self.ram.get(key) is not None
            if self.disk is not None and key in self.disk.entries:
                self.disk.touch(key)
                held = True
            return held or self._in_shared(key)

    def remove(self, key: str, *, shared: bool = False) -> bool:
        """Delete `key` from the local tiers (and from the shared tier with `shared`); False if it was not there.

        NOTE: without `shared` a shared entry stays (other replicas use it), and a later lookup finds it there.
        """
        with self._lock:
            self._refresh()
            held = self.ram.pop(key) is not None
            if self.disk is not None and key in self.disk.entries:
                self.disk.remove(key)
                held = True
            if shared and self.shared is not None and key in self.shared.entries:
                try:
                    self.shared.remove(key)
                except Exception as exc:  # noqa: BLE001 - report it; the local tiers are done
                    log.warning("could not delete shared snapshot %s: %s", key, exc)
                held = True
            self._drop_if_unheld(key)
            return held

    def entries(self) -> list[EntryInfo]:
        """Every stored snapshot (all models), in no particular order."""
        with self._lock:
            self._refresh()
            out: dict[str, EntryInfo] = {}
            for key in self.ram.keys():
                s = self.ram.get(key)
                assert s is not None
                out[key] = EntryInfo(key, ("ram",), s.n_tokens, s.nbytes, s.created, s.layout.model_desc)
            for key, e in (self.disk.entries.items() if self.disk else ()):
                tiers: tuple[str, ...] = ("ram", "disk") if key in out else ("disk",)
                h = e.header
                out[key] = EntryInfo(key, tiers, h.n_tokens, e.size, h.created, h.layout.model_desc)
            for key, se in (self.shared.entries.items() if self.shared else ()):
                tiers = (*out[key].tiers, "shared") if key in out else ("shared",)
                h = se.header
                out[key] = EntryInfo(key, tiers, h.n_tokens, se.size, h.created, h.layout.model_desc)
            return list(out.values())

    def stats(self) -> StoreStats:
        """A copy of the counters, with the current bytes and entries per tier."""
        with self._lock:
            self._refresh()
            s = StoreStats(**self._stats.as_dict())
            s.bytes_ram, s.entries_ram = self.ram.nbytes, len(self.ram)
            if self.disk is not None:
                s.bytes_disk, s.entries_disk = self.disk.nbytes, len(self.disk.entries)
            if self.shared is not None:
                s.bytes_shared, s.entries_shared = self.shared.nbytes, len(self.shared.entries)
                s.refused_shared = self.shared.refused
            return s

    def count(self, **deltas: float) -> None:
        """Add to the statistics (hits, misses, tokens and seconds saved): the engine's warm starts report here."""
        with self._lock:
            for name, value in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)

    # -- tier moves -------------------------------------------------------------------------------
    def _put_ram(self, key: str, snap: HostSnapshot) -> None:
        for old_key, old in self.ram.put(key, snap):
            if old_key != key:
                self._stats.evictions_ram += 1
            if self.disk is not None and old_key not in self.disk.entries:
                self._stats.demotions += 1
                self._put_disk(old_key, old)
            self._drop_if_unheld(old_key)

    def _put_disk(self, key: str, snap: HostSnapshot) -> None:
        assert self.disk is not None
        try:
            evicted = self.disk.put(key, snap)
        except OSError as exc:
            log.warning("could not write snapshot %s to %s: %s", key, self.disk.folder, exc)
            return
        for old_key in evicted:
            self._stats.evictions_disk += 1
            self._drop_if_unheld(old_key)

    def _put_shared(self, key: str, snap: HostSnapshot) -> None:
        if self.shared is None or self._in_shared(key):
            return
        assert self._writer is not None
        if not self.config.shared_async:
            try:
                self._published(self.shared.publish(key, snap))
            except Exception as exc:  # noqa: BLE001 - the tier is a cache: a failed write is only logged
                self._unpublished(key, exc)
        elif not self._writer.submit(key, snap):
            self._stats.skips_shared += 1  # NOTE: the writer is backed up; the local tiers hold it

    def _published(self, entry: SharedEntry) -> None:
        with self._lock:
            assert self.shared is not None
            self.shared.entries[entry.key] = entry
            self._index.add(entry.key, entry.header.layout.root, as_array(entry.tokens))
            self._stats.writes_shared += 1

    def _unpublished(self, key: str, exc: BaseException) -> None:
        log.warning("could not write snapshot %s to the shared tier: %s", key, exc)
        with self._lock:
            self._stats.write_errors_shared += 1

    def _in_shared(self, key: str) -> bool:
        if self.shared is None:
            return False
        return key in self.shared.entries or (self._writer is not None and key in self._writer)

    def _drop_if_unheld(self, key: str) -> None:
        """Forget `key` in the index unless some tier holds it (or will: a queued shared write re-adds it)."""
        if key in self.ram or (self.disk is not None and key in self.disk.entries):
            return
        if self.shared is not None and key in self.shared.entries:
            return
        self._index.remove(key)

    def _refresh(self, force: bool = False) -> None:
        for tier in (self.disk, self.shared):
            if tier is not None:
                self._apply(*tier.refresh(force))

    def _apply(self, added: Sequence[Any], gone: Sequence[str]) -> None:
        """A tier's listing changed: index the new entries, drop what no tier holds any more."""
        for entry in added:
            self._index.add(entry.key, entry.header.layout.root, as_array(entry.tokens))
        for key in gone:
            self._drop_if_unheld(key)
