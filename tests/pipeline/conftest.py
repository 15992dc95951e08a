"""Pipelines run on two engines each: the fake backend (the runner's logic, in seconds, no weights) and gemma3-270m
in exact mode (the same logic on real arithmetic, where sharing must not change a bit)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["fake", pytest.param("gemma", marks=pytest.mark.model)])
def engines(request, fake_engine):
    """(engine that shares, reference engine with its own context), configured alike."""
    if request.param == "fake":
        return fake_engine(n_ctx=4096, n_seq_max=8, exact=True), fake_engine(n_ctx=4096, n_seq_max=8, exact=True)
    return request.getfixturevalue("gemma"), request.getfixturevalue("gemma_ref")
