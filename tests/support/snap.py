"""Helpers shared by the snapshot tests."""

from __future__ import annotations

import os
from pathlib import Path

from kvfork.store.host import HostSnapshot
from kvfork.store.layout import StateLayout

MODEL = "gemma3-270m"
# NOTE: one thread: on a shared 2-core machine llama.cpp's spinning thread barrier slows decode 50x
# when a second thread is preempted; one thread is also deterministic across runs.
ENGINE_KW = {"n_ctx": 2048, "n_threads": 1, "progress": False, "exact": True}
GPL = Path("/usr/share/common-licenses/GPL-3")


def text(n_chars: int) -> str:
    if GPL.exists():
        return GPL.read_text()[:n_chars]
    words = "the quick brown fox jumps over the lazy dog and keeps running through the field".split()
    return " ".join(words[i % len(words)] for i in range(n_chars // 5))


def fake_layout(model: str = "f" * 64, n_swa: int = 0) -> StateLayout:
    return StateLayout(model, "fake model", "q8_0", "on", True, n_swa, "0.3.36")


def fake_snapshot(tokens: list[int], payload: int = 1000, n_swa: int = 0) -> HostSnapshot:
    """A HostSnapshot with a synthetic payload: for store tests that never reach llama.cpp."""
    return HostSnapshot(tuple(tokens), os.urandom(payload), fake_layout(n_swa=n_swa), None, 1.0, 0.5)
