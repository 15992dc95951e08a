"""StoreStats: what a SnapshotStore did (hits, misses, savings) and holds (bytes and entries per tier)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["StoreStats"]


@dataclass
class StoreStats:
    """Counters of one store object (this process), and what its tiers hold now."""

    hits_ram: int = 0
    hits_disk: int = 0
    hits_shared: int = 0  # restored from the shared tier (another replica's prefill)
    misses_ram: int = 0  # looked for in RAM, not there (then disk was asked)
    misses_disk: int = 0
    misses_shared: int = 0  # listed in the shared tier but gone, damaged or unreachable when loaded
    misses: int = 0  # no usable stored prefix at all: a full prefill
    corrupt: int = 0  # files that failed their checks (skipped from then on)
    swa_skips: int = 0  # matches passed over because a sliding window forbids trimming them
    promotions: int = 0  # disk -> RAM, shared -> RAM/disk
    demotions: int = 0  # RAM -> disk on eviction
    evictions_ram: int = 0
    evictions_disk: int = 0
    writes_shared: int = 0  # snapshots this store wrote to the shared tier
    write_errors_shared: int = 0
    skips_shared: int = 0  # not written: the writer thread had too many queued
    refused_shared: int = 0  # shared files refused when listed (damaged, foreign, misnamed)
    tokens_saved: int = 0
    seconds_saved: float = 0.0  # estimated prefill time avoided, minus the restores
    restore_s: float = 0.0
    bytes_ram: int = 0
    bytes_disk: int = 0
    entries_ram: int = 0
    entries_disk: int = 0
    bytes_shared: int = 0
    entries_shared: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
