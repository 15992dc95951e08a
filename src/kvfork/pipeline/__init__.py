"""Multi-agent pipelines over shared snapshots: declarative agents, a DAG runner, a layout planner."""

from kvfork.pipeline.agent import Agent
from kvfork.pipeline.definition import LAYOUTS, Pipeline
from kvfork.pipeline.graph import Graph
from kvfork.pipeline.loader import PipelineFile, load_pipeline
from kvfork.pipeline.planner import Plan, SnapshotPlan, common_prefix, plan, shareable_fraction
from kvfork.pipeline.result import AgentResult, PipelineResult, ToolRound, ToolUse
from kvfork.pipeline.runner import Runner
from kvfork.pipeline.shapes import chain, debate, map_reduce, review_board, split_document
from kvfork.pipeline.tools import Tool

__all__ = [
    "Agent",
    "Pipeline",
    "LAYOUTS",
    "Graph",
    "PipelineFile",
    "load_pipeline",
    "Plan",
    "SnapshotPlan",
    "plan",
    "common_prefix",
    "shareable_fraction",
    "AgentResult",
    "PipelineResult",
    "Tool",
    "ToolRound",
    "ToolUse",
    "Runner",
    "review_board",
    "chain",
    "debate",
    "map_reduce",
    "split_document",
]
