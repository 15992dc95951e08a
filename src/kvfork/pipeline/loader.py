"""Loader: a pipeline file (TOML; YAML when PyYAML is installed) -> Pipeline and engine settings.

```toml
[pipeline]                      # all optional
name = "review-board"
system = "You are a careful reviewer."
layout = "exact"                # or "shared-first" (opt-in: roles move after the shared document)
model = "qwen2.5-coder-0.5b"    # the CLI's default; --model overrides it
n_ctx = 8192
chat_template = "gemma"         # only for models without a template of their own

[documents]                     # name = inline text | { file = "path" } | { resource = "data/x.txt" }
report = { resource = "data/sample_report.txt" }

[sampling]                      # defaults for every agent
max_tokens = 64

[adapters]                      # optional LoRA decoders: name = GGUF path (relative to this file)
security = "decoders/security.gguf"

[[agents]]
name = "security"
instruction = "List the security findings."
inputs = ["report"]
adapter = "security"            # optional: decoded by this LoRA over the shared prefill
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kvfork.engine.sampling import SamplingParams
from kvfork.errors import KvforkError, PipelineError
from kvfork.pipeline.agent import Agent
from kvfork.pipeline.definition import Pipeline
from kvfork.reuse.config import REUSE_MODES

__all__ = ["PipelineFile", "load_pipeline"]

_TOP = {"pipeline", "documents", "sampling", "agents", "adapters"}
_SETTINGS = {"name", "system", "layout", "chat", "model", "n_ctx", "chat_template", "reuse", "exact"}
_AGENT = {"name", "instruction", "role", "inputs", "sampling", "turns", "peers", "followup", "adapter"}


@dataclass(frozen=True)
class PipelineFile:
    """A loaded pipeline file: the pipeline and the engine settings it asks for."""

    path: Path
    pipeline: Pipeline
    model: str | None = None
    n_ctx: int | None = None
    chat_template: str | None = None  # for models without one in their GGUF (e.g. "gemma")
    reuse: str = "exact"  # reuse mode of the run (kvfork.reuse; anything but "exact" is approximate)
    adapters: Mapping[str, Path] = field(default_factory=dict)  # LoRA decoders to load: name -> GGUF
    exact: bool = False  # run the engine in exact mode (EngineConfig.exact)


def load_pipeline(path: str | os.PathLike[str]) -> PipelineFile:
    """Read and validate a pipeline file; every problem is a PipelineError naming the file."""
    path = Path(path)
    try:
        raw = _parse(path)
        return _build(path, raw)
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from exc
    except (KvforkError, TypeError, ValueError) as exc:
        raise PipelineError(f"{path}: {exc}") from exc


def _parse(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineError(f"cannot read the pipeline file: {exc}") from exc
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml  # NOTE: optional: TOML needs nothing beyond the standard library
        except ImportError as exc:
            raise PipelineError("YAML pipeline files need PyYAML (pip install pyyaml); or write TOML") from exc
        data = yaml.safe_load(text)
    else:
        try:
            import tomllib
        except ImportError:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError as exc:
                raise PipelineError("TOML pipeline files need Python 3.11+ or `pip install tomli`") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PipelineError(f"not valid TOML: {exc}") from exc
    if not isinstance(data, dict):
        raise PipelineError("the file must hold a table with [pipeline], [documents], [sampling] and [[agents]]")
    return data


def _build(path: Path, raw: Mapping[str, Any]) -> PipelineFile:
    _no_unknown("the file", raw, _TOP)
    settings = _table(raw, "pipeline")
    _no_unknown("[pipeline]", settings, _SETTINGS)
    documents = {name: _document(path, name, spec) for name, spec in _table(raw, "documents").items()}
    agents_raw = raw.get("agents", [])
    if not isinstance(agents_raw, list) or not all(isinstance(a, dict) for a in agents_raw):
        raise PipelineError("agents must be an array of tables: [[agents]]")
    agents = []
    for i, spec in enumerate(agents_raw):
        _no_unknown(f"agent #{i + 1}", spec, _AGENT)
        agents.append(Agent(**spec))
    pipeline = Pipeline(
        tuple(agents),
        documents,
        system=settings.get("system"),
        layout=settings.get("layout", "exact"),
        sampling=SamplingParams().with_overrides(**_table(raw, "sampling")),
        chat=settings.get("chat", True),
        name=settings.get("name", path.stem),
    )
    reuse = settings.get("reuse", "exact")
    if reuse not in REUSE_MODES:
        raise PipelineError(f"reuse must be one of {', '.join(REUSE_MODES)}; got {reuse!r}")
    exact = settings.get("exact", False)
    if not isinstance(exact, bool):
        raise PipelineError(f"exact must be true or false; got {exact!r}")
    adapters = {}
    for name, file in _table(raw, "adapters").items():
        if not isinstance(file, str):
            raise PipelineError(f"[adapters] {name}: give the adapter's GGUF path as a string")
        adapters[name] = (path.parent / file).resolve()
    for agent in agents:
        if agent.adapter is not None and agent.adapter not in adapters:
            raise PipelineError(f"agent {agent.name!r}: adapter {agent.adapter!r} is not in [adapters]")
    return PipelineFile(path, pipeline, settings.get("model"), settings.get("n_ctx"), settings.get("chat_template"),
                        reuse, adapters, exact)


def _document(path: Path, name: str, spec: Any) -> str:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, dict) and len(spec) == 1 and "file" in spec:
        doc = (path.parent / spec["file"]).resolve()
        try:
            return doc.read_text(encoding="utf-8")
        except OSError as exc:
            raise PipelineError(f"document {name!r}: cannot read {doc}: {exc}") from exc
    if isinstance(spec, dict) and len(spec) == 1 and "resource" in spec:
        try:
            return resources.files("kvfork").joinpath(spec["resource"]).read_text(encoding="utf-8")
        except OSError as exc:
            raise PipelineError(f"document {name!r}: no kvfork resource {spec['resource']!r}") from exc
    raise PipelineError(f"document {name!r} must be text, {{ file = \"path\" }} or {{ resource = \"data/...\" }}")


def _table(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise PipelineError(f"[{key}] must be a table")
    return value


def _no_unknown(where: str, table: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise PipelineError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
