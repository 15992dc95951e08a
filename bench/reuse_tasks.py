"""Checkable tasks for the reuse evaluation: shipping logs with one question each, answers known.

Each sample is a log of `n_records` shipments generated from a seed (carriers, ports, dates,
crate counts, weights) and a question about one record whose answer is a number. The records
vary per sample, so each sample's document is new content that no cache has seen before.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["Task", "make_tasks", "answer_of"]

_PORTS = ["Rotterdam", "Hamburg", "Antwerp", "Gdansk", "Valencia", "Genoa", "Piraeus", "Le Havre", "Felixstowe",
          "Algeciras", "Marseille", "Bremen", "Lisbon", "Tallinn", "Riga", "Oslo", "Gothenburg", "Aarhus"]
_CARRIERS = ["Nordline", "Bluewake", "Seacrest", "Harbor & Sons", "Kestrel Freight", "Orca Lines", "Tidewater"]
_GOODS = ["machine parts", "coffee beans", "ceramic tiles", "bicycle frames", "solar panels", "textiles",
          "olive oil", "paper rolls", "copper wire", "glassware", "furniture kits", "medical gloves"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
_FIELDS = {
    "crates": ("How many crates did shipment {id} carry?", "crates"),
    "weight": ("What was the total weight of shipment {id}, in kilograms?", "kg"),
    "day": ("On which day of the month did shipment {id} depart?", "day"),
    "delay": ("By how many hours was shipment {id} delayed?", "delay"),
}


@dataclass(frozen=True)
class Task:
    document: str
    question: str
    answer: int


def _record(rng: random.Random, sid: str) -> tuple[str, dict[str, int]]:
    values = {"crates": rng.randint(12, 980), "weight": rng.randint(1_000, 48_000), "day": rng.randint(1, 28),
              "delay": rng.randint(0, 72)}
    src, dst = rng.sample(_PORTS, 2)
    text = (f"Shipment {sid}: {rng.choice(_CARRIERS)} carried {values['crates']} crates of {rng.choice(_GOODS)}"
            f" from {src} to {dst}, departing on {values['day']} {rng.choice(_MONTHS)}; total weight"
            f" {values['weight']} kg; delayed by {values['delay']} hours.")
    return text, values


def make_tasks(n: int, n_records: int = 16, seed: int = 7) -> list[Task]:
    """n tasks, each a fresh log of n_records shipments and one question with a numeric answer."""
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        ids = [f"{rng.choice('ABCDEFGHKLMNPRSTVXZ')}{rng.choice('ABCDEFGHKLMNPRSTVXZ')}-{rng.randint(1000, 9999)}"
               for _ in range(n_records)]
        lines, answers = [], []
        for sid in ids:
            line, values = _record(rng, sid)
            lines.append(line)
            answers.append(values)
        pick = rng.randrange(n_records)
        field = rng.choice(list(_FIELDS))
        question = _FIELDS[field][0].format(id=ids[pick])
        doc = f"Shipping log, week {i + 1}\n\n" + "\n".join(lines)
        tasks.append(Task(doc, question, answers[pick][field]))
    return tasks


def answer_of(text: str) -> int | None:
    """The number after the last 'Answer:' (or the last number in the text), without thousands separators."""
    m = re.findall(r"Answer:\s*\**\s*([\d][\d,]*)", text)
    numbers = m or re.findall(r"\d[\d,]*", text)
    if not numbers:
        return None
    try:
        return int(numbers[-1].replace(",", ""))
    except ValueError:
        return None
