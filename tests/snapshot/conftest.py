"""Shared fixtures for the snapshot tests: one small sliding-window model, loaded once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvfork import Engine
from kvfork.models import CATALOG, cache_dir
from tests.support.snap import ENGINE_KW, MODEL, text


@pytest.fixture(scope="session")
def model_path() -> Path:
    path = cache_dir() / CATALOG[MODEL].filename
    if not path.exists():
        pytest.skip(f"{MODEL} is not pulled (run `kvfork pull {MODEL}`)")
    return path


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Iterator[Engine]:
    with Engine(MODEL, **ENGINE_KW) as eng:
        yield eng


@pytest.fixture(scope="session")
def short_doc() -> str:
    """About 300 tokens: shorter than gemma's 512-token window, so states can be trimmed."""
    return text(1200)


@pytest.fixture(scope="session")
def long_doc() -> str:
    """About 700 tokens: longer than the sliding window."""
    return text(3000)
