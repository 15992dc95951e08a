"""SharedWriter: publishes snapshots to the shared tier on one background thread, a few at a time."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections.abc import Callable

from kvfork.store.host import HostSnapshot
from kvfork.store.shared import SharedEntry, SharedTier

__all__ = ["SharedWriter"]

log = logging.getLogger(__name__)


class SharedWriter:
    """Write-behind for a SharedTier: `submit` returns at once, the PUT runs on a writer thread.

    Contract: thread-safe. `done(entry)` or `failed(key, error)` is called on the writer thread once
    per accepted key; they may take the store's lock, so never wait in `flush` while holding it.
    At most `max_pending` snapshots wait (each holds its whole blob in memory); beyond that `submit`
    refuses (the tier is a cache: the snapshot is still in the local tiers).
    """

    def __init__(self, tier: SharedTier, done: Callable[[SharedEntry], None],
                 failed: Callable[[str, BaseException], None], max_pending: int = 4) -> None:
        self.tier = tier
        self._done = done
        self._failed = failed
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: dict[str, cf.Future[None]] = {}
        self._pool: cf.ThreadPoolExecutor | None = None

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._pending

    def submit(self, key: str, snap: HostSnapshot) -> bool:
        """Queue `snap` for the tier; False if it is queued already or the queue is full."""
        with self._lock:
            if key in self._pending or len(self._pending) >= self.max_pending:
                return False
            if self._pool is None:
                # NOTE: non-daemon worker: the interpreter waits for queued writes at exit, so the
                # snapshots an engine demotes at close still reach the other replicas.
                self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvfork-shared")
            self._pending[key] = self._pool.submit(self._run, key, snap)
            return True

    def _run(self, key: str, snap: HostSnapshot) -> None:
        # NOTE: the key leaves the queue only after the store heard of the outcome, so a `put` in
        # between finds it queued or held, never neither (which would write it twice).
        try:
            try:
                entry = self.tier.publish(key, snap)
            except Exception as exc:  # noqa: BLE001 - any driver's error: the write is lost, nothing else
                self._failed(key, exc)
                return
            self._done(entry)
        finally:
            self._forget(key)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write has finished; False if `timeout` passed first."""
        with self._lock:
            futures = list(self._pending.values())
        _, not_done = cf.wait(futures, timeout=timeout)
        return not not_done

    def close(self) -> None:
        """Finish the queued writes and stop the writer thread."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
