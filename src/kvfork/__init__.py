"""kvfork: prefill shared context once, fork the KV cache to every agent, decode all branches in one batch."""

from kvfork.branch import Branch
from kvfork.config import EngineConfig
from kvfork.engine.sampling import SamplingParams
from kvfork.errors import (
    ContextOverflow,
    EngineError,
    InvalidModelFile,
    InvalidParameter,
    KvforkError,
    ModelIntegrityError,
    ModelNotFound,
    SnapshotMismatch,
)
from kvfork.models import CATALOG, DEFAULT_MODEL, pull, resolve_model
from kvfork.result import Completion
from kvfork.runtime import Engine
from kvfork.snapshot.base import Snapshot

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "EngineConfig",
    "Snapshot",
    "Branch",
    "SamplingParams",
    "Completion",
    "CATALOG",
    "DEFAULT_MODEL",
    "pull",
    "resolve_model",
    "KvforkError",
    "ContextOverflow",
    "EngineError",
    "InvalidModelFile",
    "InvalidParameter",
    "ModelIntegrityError",
    "ModelNotFound",
    "SnapshotMismatch",
]
