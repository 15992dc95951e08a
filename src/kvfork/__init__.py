"""kvfork: prefill shared context once, fork the KV cache to every agent, decode all branches in one batch."""

from kvfork.config import EngineConfig, StoreConfig
from kvfork.engine.adapters import Adapter
from kvfork.engine.sampling import SamplingParams
from kvfork.errors import (
    ContextOverflow,
    EngineError,
    InvalidModelFile,
    InvalidParameter,
    KvforkError,
    ModelIntegrityError,
    ModelNotFound,
    PipelineError,
    SnapshotCorrupt,
    SnapshotMismatch,
    ToolError,
    ToolRoundsExceeded,
)
from kvfork.models import CATALOG, DEFAULT_MODEL, pull, resolve_model
from kvfork.pipeline import Agent, AgentResult, Pipeline, PipelineResult, Tool, load_pipeline
from kvfork.result import Completion
from kvfork.reuse import ReuseConfig, ReuseReport, Segment
from kvfork.runtime import Engine
from kvfork.runtime.branch import Branch
from kvfork.runtime.snapshot import Snapshot
from kvfork.store.host import HostSnapshot
from kvfork.store.store import SnapshotStore

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "EngineConfig",
    "Snapshot",
    "HostSnapshot",
    "SnapshotStore",
    "StoreConfig",
    "Branch",
    "Adapter",
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
    "SnapshotCorrupt",
    "PipelineError",
    "ToolError",
    "ToolRoundsExceeded",
    "Pipeline",
    "Agent",
    "Tool",
    "AgentResult",
    "PipelineResult",
    "load_pipeline",
    "ReuseConfig",
    "ReuseReport",
    "Segment",
]
