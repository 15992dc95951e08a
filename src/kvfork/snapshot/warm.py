"""Warm starts: how an engine's prefill uses a SnapshotStore (restore the longest prefix, remember after)."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from kvfork.errors import ContextOverflow, KvforkError
from kvfork.scheduler.sequence import Sequence
from kvfork.snapshot.host import HostSnapshot
from kvfork.snapshot.layout import StateLayout

if TYPE_CHECKING:
    from kvfork.runtime import Engine
    from kvfork.snapshot.base import Snapshot
    from kvfork.snapshot.store import SnapshotStore

__all__ = ["restore_prefix", "remember"]

log = logging.getLogger(__name__)


def restore_prefix(store: SnapshotStore, engine: Engine, tokens: list[int]) -> Sequence:
    """A Sequence for `tokens` holding the longest usable stored prefix; its tail is left pending.

    Falls back to the next shorter match when one cannot be loaded or restored, and to a fresh
    Sequence (a full prefill) when none can: a store problem never fails the prefill.
    """
    layout = StateLayout.of(engine)
    for match in store.matches(layout, tokens):
        snap = store.get(match.key, layout)
        if snap is None:
            continue
        keep = match.n_shared
        if list(snap.tokens[:keep]) != tokens[:keep]:  # NOTE: the file's own tokens decide, not its name
            log.warning("snapshot %s does not hold the tokens its index promised; skipped", match.key)
            continue
        t0 = time.perf_counter()
        try:
            seq = snap.adopt(engine, keep if keep < snap.n_tokens else None)
        except ContextOverflow as exc:
            log.info("no room to restore a stored prefix (%s); prefilling instead", exc)
            break
        except KvforkError as exc:
            log.warning("could not restore snapshot %s: %s", match.key, exc)
            continue
        seconds = time.perf_counter() - t0
        seq.tokens.extend(tokens[keep:])
        per_token = snap.prefill_s / snap.n_tokens if snap.n_tokens else 0.0
        store._count(tokens_saved=keep, restore_s=seconds, seconds_saved=per_token * keep - seconds)
        return seq
    store._count(misses=1)
    return Sequence(tokens=list(tokens))


def remember(store: SnapshotStore, snapshot: Snapshot) -> None:
    """Put `snapshot` in the store unless its exact tokens are stored already (then mark it used)."""
    seq = snapshot._seq
    layout = StateLayout.of(snapshot._engine)
    if store.touch(store.key_of(layout, seq.tokens[: seq.n_in_kv])):
        return
    try:
        host = HostSnapshot.capture(snapshot)
    except KvforkError as exc:
        log.warning("could not copy the snapshot out of the context: %s", exc)
        return
    # NOTE: prefill_s of an entry estimates a from-scratch prefill of all its tokens; when part of it
    # was restored, scale the measured time of the computed part.
    computed = seq.n_prompt_computed
    if 0 < computed < host.n_tokens:
        host = dataclasses.replace(host, prefill_s=snapshot.prefill_s * host.n_tokens / computed)
    store.put(host)
