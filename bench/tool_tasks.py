"""Issue 18's tool-calling set: 20 requests with a known right call among five tools.

Each task is (user message, expected function name, expected arguments). A call is right when it names
the expected function and every expected argument matches (strings compared case-insensitively and
trimmed, numbers by value); arguments not listed are free. Written once for the evaluation.
"""

from __future__ import annotations

from typing import Any


def _fn(name: str, description: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": required}}}


_S = {"type": "string"}
TOOLS = [
    _fn("get_weather", "Current weather in a city.",
        {"city": _S, "unit": {"enum": ["celsius", "fahrenheit"]}}, ["city"]),
    _fn("convert_currency", "Convert an amount of money between currencies (ISO codes such as USD).",
        {"amount": {"type": "number"}, "from_currency": _S, "to_currency": _S},
        ["amount", "from_currency", "to_currency"]),
    _fn("create_event", "Add an event to the calendar. Dates are YYYY-MM-DD, times HH:MM (24 h).",
        {"title": _S, "date": _S, "time": _S}, ["title", "date"]),
    _fn("search_flights", "Search flights between two cities on a date (YYYY-MM-DD).",
        {"origin": _S, "destination": _S, "date": _S}, ["origin", "destination", "date"]),
    _fn("send_email", "Send an email.", {"to": _S, "subject": _S, "body": _S}, ["to", "subject", "body"]),
]

TASKS: list[tuple[str, str, dict[str, Any]]] = [
    ("What's the weather in Paris right now?", "get_weather", {"city": "Paris"}),
    ("Is it cold in Oslo today? Give me the temperature in celsius.", "get_weather",
     {"city": "Oslo", "unit": "celsius"}),
    ("Tell me the weather in Chicago in fahrenheit.", "get_weather", {"city": "Chicago", "unit": "fahrenheit"}),
    ("Do I need an umbrella in Tokyo?", "get_weather", {"city": "Tokyo"}),
    ("Convert 100 US dollars to euros.", "convert_currency",
     {"amount": 100, "from_currency": "USD", "to_currency": "EUR"}),
    ("How many Japanese yen is 250 GBP?", "convert_currency",
     {"amount": 250, "from_currency": "GBP", "to_currency": "JPY"}),
    ("I have 42.5 EUR, how much is that in CHF?", "convert_currency",
     {"amount": 42.5, "from_currency": "EUR", "to_currency": "CHF"}),
    ("Convert 1000 CAD into USD please.", "convert_currency",
     {"amount": 1000, "from_currency": "CAD", "to_currency": "USD"}),
    ("Put 'Dentist' on my calendar for 2026-03-14 at 09:30.", "create_event",
     {"title": "Dentist", "date": "2026-03-14", "time": "09:30"}),
    ("Add an event called Team sync on 2026-05-02.", "create_event", {"title": "Team sync", "date": "2026-05-02"}),
    ("Schedule 'Launch review' for 2026-11-20 at 16:00.", "create_event",
     {"title": "Launch review", "date": "2026-11-20", "time": "16:00"}),
    ("Create a calendar entry 'Mom birthday' on 2026-07-08.", "create_event",
     {"title": "Mom birthday", "date": "2026-07-08"}),
    ("Find flights from Berlin to Madrid on 2026-06-01.", "search_flights",
     {"origin": "Berlin", "destination": "Madrid", "date": "2026-06-01"}),
    ("Are there flights from New York to London on 2026-09-15?", "search_flights",
     {"origin": "New York", "destination": "London", "date": "2026-09-15"}),
    ("I need to fly Sydney to Auckland on 2026-12-24.", "search_flights",
     {"origin": "Sydney", "destination": "Auckland", "date": "2026-12-24"}),
    ("Search for a flight to Rome from Vienna, date 2026-04-10.", "search_flights",
     {"origin": "Vienna", "destination": "Rome", "date": "2026-04-10"}),
    ("Email bob@example.com with subject 'Lunch' and say 'See you at noon'.", "send_email",
     {"to": "bob@example.com", "subject": "Lunch"}),
    ("Send an email to ana@example.org, subject Report, body: The report is attached.", "send_email",
     {"to": "ana@example.org", "subject": "Report"}),
    ("Write to team@example.com: subject 'Outage', body 'The API is down since 10:00'.", "send_email",
     {"to": "team@example.com", "subject": "Outage"}),
    ("Let li@example.net know the meeting moved; subject 'Meeting moved', body 'Now at 3pm'.", "send_email",
     {"to": "li@example.net", "subject": "Meeting moved"}),
]

assert len(TASKS) == 20


def matches(expected: Any, got: Any) -> bool:
    if isinstance(expected, str):
        return isinstance(got, str) and got.strip().lower() == expected.lower()
    if isinstance(expected, (int, float)):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and float(got) == float(expected)
    return bool(expected == got)
