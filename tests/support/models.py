"""The catalog models' settings the tests use, and adapter loading."""

from __future__ import annotations

from kvfork import Engine

# NOTE: gemma3-270m has no chat template in its GGUF (a base model); llama.cpp's built-in "gemma"
# template is the one its instruct sibling uses, and it exercises the same layout code as qwen's.
# The tests that compare forks with from-scratch runs bit for bit run in exact mode.
GEMMA = dict(chat_template="gemma", exact=True)
GEMMA_FAST = dict(chat_template="gemma")


def load_all(engine: Engine, files, prefill: str) -> None:
    """Load every adapter of `files` (name -> GGUF path) the engine does not hold yet."""
    for name, path in files.items():
        if name not in engine.adapters.names():
            engine.load_adapter(name, path, prefill=prefill)
