"""Issue 18's held-in JSON schemas: 30 extraction and generation tasks over the bundled incident report.

Each is (name, instruction, schema). They cover nested objects, arrays (bounded and not), enums,
required fields, numbers and integers with bounds, booleans, nullable fields and string patterns:
what agent frameworks ask of a structured-output call. Written once for the evaluation; none is tuned
to what the model answers.
"""

from __future__ import annotations

from typing import Any

_S = {"type": "string"}
_N = {"type": "number"}
_B = {"type": "boolean"}


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            **extra}


def _arr(items: dict[str, Any], lo: int | None = None, hi: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "array", "items": items}
    if lo is not None:
        out["minItems"] = lo
    if hi is not None:
        out["maxItems"] = hi
    return out


_SEVERITY = {"enum": ["low", "medium", "high", "critical"]}
_PERSON = _obj({"name": _S, "role": _S})

TASKS: list[tuple[str, str, dict[str, Any]]] = [
    ("severity", "Rate the incident's severity.", _obj({"severity": _SEVERITY})),
    ("title", "Give the incident a short title.", _obj({"title": {"type": "string", "maxLength": 80}})),
    ("summary", "Summarize the incident.", _obj({"summary": _S, "severity": _SEVERITY})),
    ("duration", "How long did the incident last, in minutes?",
     _obj({"minutes": {"type": "integer", "minimum": 0, "maximum": 100000}})),
    ("resolved", "Was the incident resolved?", _obj({"resolved": _B, "how": _S})),
    ("people", "List the people involved.", _obj({"people": _arr(_PERSON, 1, 6)})),
    ("timeline", "Give a timeline of up to 5 events.",
     _obj({"events": _arr(_obj({"time": _S, "event": _S}), 1, 5)})),
    ("causes", "List the root causes.", _obj({"causes": _arr(_S, 1, 4)})),
    ("actions", "List follow-up actions with owners and priorities.",
     _obj({"actions": _arr(_obj({"action": _S, "owner": _S, "priority": {"enum": ["P1", "P2", "P3"]}}), 1, 4)})),
    ("confidence", "Give your confidence that the root cause is known.",
     _obj({"confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("scores", "Score detection, response and communication from 1 to 10.",
     _obj({"detection": {"type": "integer", "minimum": 1, "maximum": 10},
           "response": {"type": "integer", "minimum": 1, "maximum": 10},
           "communication": {"type": "integer", "minimum": 1, "maximum": 10}})),
    ("nested", "Describe the affected system.",
     _obj({"system": _obj({"name": _S, "component": _obj({"name": _S, "failed": _B})})})),
    ("optional", "Give the incident's ticket and, if known, its customer impact.",
     _obj({"ticket": _S, "customer_impact": _S}, required=["ticket"])),
    ("nullable", "Give the estimated cost of the incident in dollars, or null if unknown.",
     _obj({"cost_usd": {"type": ["number", "null"]}})),
    ("tags", "Tag the incident with 2 to 4 lowercase tags.",
     _obj({"tags": _arr({"type": "string", "pattern": "^[a-z]+$"}, 2, 4)})),
    ("metrics", "Report up to 4 measurements from the report with units.",
     _obj({"metrics": _arr(_obj({"name": _S, "value": _N, "unit": _S}), 1, 4)})),
    ("classification", "Classify the incident.",
     _obj({"category": {"enum": ["hardware", "software", "process", "human", "external"]},
           "subcategory": _S})),
    ("yesno", "Should the incident be escalated to management?", _obj({"escalate": _B, "reason": _S})),
    ("questions", "Ask up to 3 questions an investigator would ask.", _obj({"questions": _arr(_S, 1, 3)})),
    ("matrix", "Give a 2x2 risk matrix of likelihood and impact scores from 1 to 5.",
     _obj({"matrix": _arr(_arr({"type": "integer", "minimum": 1, "maximum": 5}, 2, 2), 2, 2)})),
    ("status", "Give the incident's status report.",
     _obj({"status": {"enum": ["open", "mitigated", "closed"]}, "updated_by": _S,
           "next_update_hours": {"type": "integer", "minimum": 1, "maximum": 72}})),
    ("lessons", "List lessons learned, each with whether it is already addressed.",
     _obj({"lessons": _arr(_obj({"lesson": _S, "addressed": _B}), 1, 3)})),
    ("contact", "Give an on-call contact card.",
     _obj({"name": _S, "email": {"type": "string", "pattern": "^[a-z.]+@[a-z]+\\.[a-z]+$"},
           "shift": {"enum": ["day", "night"]}})),
    ("percent", "Estimate the share of users affected, as a percentage.",
     _obj({"percent_affected": {"type": "number", "minimum": 0, "maximum": 100}})),
    ("unbounded", "List the systems the report mentions.", _obj({"systems": {"type": "array", "items": _S}})),
    ("deep", "Give the incident's postmortem header.",
     _obj({"postmortem": _obj({"incident": _obj({"id": _S, "severity": _SEVERITY}),
                               "authors": _arr(_S, 1, 3), "reviewed": _B})})),
    ("choice", "Pick the single best next step.",
     _obj({"next_step": {"enum": ["rollback", "patch", "monitor", "replace hardware", "escalate"]},
           "why": _S})),
    ("counts", "Count the alerts, pages and tickets the report mentions.",
     _obj({"alerts": {"type": "integer", "minimum": 0}, "pages": {"type": "integer", "minimum": 0},
           "tickets": {"type": "integer", "minimum": 0}})),
    ("mixed", "Give one finding with its evidence and a confidence.",
     _obj({"finding": _S, "evidence": _arr(_S, 1, 3),
           "confidence": {"enum": ["low", "medium", "high"]}, "verified": _B})),
    ("anyof", "Give the incident's impact as either a number of minutes of downtime or a text description.",
     _obj({"impact": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}]}})),
]

assert len(TASKS) == 30 and len({name for name, _, _ in TASKS}) == 30
