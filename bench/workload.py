"""What every benchmark shares: the agents' instructions, the documents, and how figures are summarized."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["SYSTEM", "INSTRUCTIONS", "report", "document", "stats", "provenance", "fmt", "save"]

SYSTEM = "You are a careful analyst. Answer from the report only, briefly and precisely."

# NOTE: ~20 tokens each, as a real agent's instruction; 16 so that the scaling grid has one per agent.
INSTRUCTIONS = [
    "Summarize the incident in three short bullet points, each with the most important number.",
    "List the three biggest risks that remain open after this incident, one line each please.",
    "Ask three sharp questions that a reviewer should put to the authors of this review.",
    "Check the figures in the summary against the appendix tables and name any inconsistency.",
    "Write a two-sentence status update for customers affected by the outage, in plain words.",
    "Which action item matters most for preventing a repeat, and why? Answer in two sentences.",
    "Estimate the total cost of the incident from the report's figures, showing the arithmetic.",
    "Describe the timeline of detection and recovery in four short steps with their timestamps.",
    "Which monitoring alert should have fired first, and how much earlier would it have helped?",
    "Name the teams involved in the response and say in one line what each of them did.",
    "Rate the quality of the communication during the incident from 1 to 10 and justify it.",
    "What single configuration change would have prevented the outage? Answer in one sentence.",
    "List every number in the report that describes customer impact, with its unit and meaning.",
    "Draft three follow-up tickets for the engineering backlog, each with a title and an owner.",
    "Which part of the report is least convincing, and what evidence would make it stronger?",
    "Explain the root cause to a new engineer in three plain sentences without any jargon.",
]


def report() -> str:
    """The bundled ~3,500-token incident report."""
    return resources.files("kvfork").joinpath("data/sample_report.txt").read_text()


def document(tag: str, n_chars: int | None = None) -> str:
    """The report (cut or repeated to n_chars) under a first line unique to `tag`.

    NOTE: a new tag per repeat means no system under test finds the previous repeat's document in
    a cache: every repeat measures a cold shared prefill.
    """
    text = report()
    if n_chars is not None:  # NOTE: longer documents repeat the report as an appendix
        while len(text) < n_chars:
            text += "\n\nAppendix (continued from the start):\n" + report()
        text = text[:n_chars]
    return f"Document {tag}\n\n{text}"


def stats(values: list[float]) -> dict[str, float]:
    """Median, min, max and count: the only way a figure is reported."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: dict[str, float], unit: str = "", scale: float = 1.0, digits: int = 1) -> str:
    return (f"{s['median'] * scale:.{digits}f}{unit} ({s['min'] * scale:.{digits}f}-"
            f"{s['max'] * scale:.{digits}f})")


def provenance() -> dict[str, str]:
    """The commit, machine and CPU a result came from."""
    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True).stdout.strip()

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    dirty = bool(run("git", "status", "--porcelain", "--untracked-files=no"))
    return {"commit": run("git", "rev-parse", "--short", "HEAD"), "dirty": str(dirty),
            "machine": platform.machine(), "cpu": cpu, "python": platform.python_version()}


def save(out: Path, settings: dict[str, Any], rows: Any, t0: float) -> None:
    """Write a run's settings, rows, wall time since `t0` (perf_counter) and provenance to `out` as JSON."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "rows": rows, "wall_s": time.perf_counter() - t0,
                               "provenance": provenance()}, indent=2))
    print(f"wrote {out} ({(time.perf_counter() - t0) / 60:.1f} min)")
