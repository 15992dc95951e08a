"""long_text: a deterministic document for the tests."""

from __future__ import annotations


def long_text(n_sentences: int) -> str:
    """A deterministic document with varied content, so greedy decoding has something to say."""
    subjects = ["The pump", "Station four", "The night crew", "Valve 12", "The backup line", "The operator"]
    verbs = ["reported", "measured", "restarted", "flagged", "inspected", "logged"]
    objects = ["a pressure drop", "high turbidity", "a sensor fault", "the chlorine dose", "a leak", "the flow rate"]
    out = []
    for i in range(n_sentences):
        s, v, o = subjects[i % 6], verbs[(i * 5 + 1) % 6], objects[(i * 7 + 2) % 6]
        out.append(f"{s} {v} {o} at {8 + i % 12}:{(i * 13) % 60:02d} on day {1 + i // 9}.")
    return " ".join(out)
