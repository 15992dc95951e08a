"""The KvforkError family: every error kvfork raises on purpose, each with a message that says what to do."""

from __future__ import annotations

__all__ = [
    "KvforkError",
    "ModelNotFound",
    "ModelIntegrityError",
    "InvalidModelFile",
    "ContextOverflow",
    "InvalidParameter",
    "SnapshotMismatch",
    "SnapshotCorrupt",
    "EngineError",
    "PipelineError",
    "ToolError",
    "ToolRoundsExceeded",
]


class KvforkError(Exception):
    """Base of every error kvfork raises deliberately."""


class ModelNotFound(KvforkError):
    """The name is neither a catalog model nor the path of an existing file."""


class ModelIntegrityError(KvforkError):
    """A downloaded model does not match the catalog's size or sha256."""


class InvalidModelFile(KvforkError):
    """The file exists but is not a GGUF model llama.cpp can load."""


class ContextOverflow(KvforkError):
    """The tokens asked for do not fit in the context's KV cache."""


class InvalidParameter(KvforkError, ValueError):
    """A parameter is out of range or of the wrong kind."""


class SnapshotMismatch(KvforkError):
    """A snapshot does not belong to this engine, model or layout, or was already released."""


class SnapshotCorrupt(SnapshotMismatch):
    """A snapshot file is truncated, damaged, or not a kvfork snapshot file at all."""


class EngineError(KvforkError):
    """llama.cpp reported a failure the engine could not recover from for this request."""


class PipelineError(KvforkError, ValueError):
    """A pipeline definition is invalid (a cycle, a missing input, a duplicate name, a bad file)."""


class ToolError(PipelineError):
    """An agent's tools cannot be used: a duplicate name, not a callable, a parameter schema kvfork cannot
    constrain, or a model whose chat template has no tool-call format kvfork knows."""


class ToolRoundsExceeded(KvforkError):
    """An agent still called tools after its `max_tool_rounds` rounds (a per-agent failure, not a hang)."""
