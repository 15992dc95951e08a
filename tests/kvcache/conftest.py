"""Fixtures for the kvcache tests: the two catalog models loaded once, as bare llama.cpp models."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kvfork.engine.llama import LlamaModel


@pytest.fixture(scope="session")
def load_model(gemma_path, qwen_path) -> Iterator[Callable[[str], LlamaModel]]:
    """load_model("gemma" | "qwen"): the model, loaded on first use and freed at the end of the session."""
    paths = {"gemma": gemma_path, "qwen": qwen_path}
    loaded: dict[str, LlamaModel] = {}

    def load(name: str) -> LlamaModel:
        if name not in loaded:
            loaded[name] = LlamaModel(paths[name])
        return loaded[name]

    yield load
    for model in loaded.values():
        model.close()
