"""Checkable tasks for the PrefillShare evaluation (issue 8): three decoders over one shared document.

Every document is a short synthetic business note (warehouse memo, e-mail, incident note, shift log)
about one *subject order*, named on its `Subject:` line: the order itself (number, customer, units,
agreed unit price, total), the stock of its product (opening stock, shipments out, deliveries in),
one situation that calls for an action (damaged units, stock under the reorder point, a late or lost
parcel, a double charge, a packed order waiting for its carrier), distractor numbers (dock, extension,
ticket, weight, a replaced order, a catalogue price, a first quantity amended later) and a line or two of
other activity (other orders, other products). Templates, names, numbers and the order of the facts vary with the seed.

Three tasks read the SAME document, each with its own fixed instruction after it:

- `extract`: the subject order's fields as JSON, in a fixed key order;
- `arith`:   the product's stock now (opening - shipments + deliveries): a running total, then "Answer: N";
- `tool`:    one tool call in a fixed schema, {"tool": name, "args": {...}}.

A fourth task, held back (issue 21: added after the settings were chosen on the first three, to check that
they generalize), reads the same documents:

- `remain`:  a multi-step word problem: the product's stock now, minus the subject order's units (a
             running total through every move and the order, then "Answer: N"; negative when short).

A seed fixes the documents, so `make_samples(task, n, seed)` gives the three tasks the same n
documents: the three decoders share one prefill and differ only by instruction (and adapter).
`long_document` builds the same kind of note with many lines of other activity (~3,500 tokens) for
the serving benchmark; the three instructions still have one answer there.

    python bench/prefillshare_tasks.py --write DIR --n-train 200 --n-test 60
    python bench/prefillshare_tasks.py --preview
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = [
    "TASKS",
    "HELD_BACK",
    "ALL_TASKS",
    "INSTRUCTIONS",
    "SEEDS",
    "Sample",
    "Note",
    "make_note",
    "make_samples",
    "split",
    "check",
    "write_jsonl",
    "long_document",
    "lengthen",
]

TASKS: tuple[str, ...] = ("extract", "arith", "tool")
HELD_BACK: tuple[str, ...] = ("remain",)  # not used while choosing training settings
ALL_TASKS: tuple[str, ...] = TASKS + HELD_BACK
SEEDS = {"train": 1000, "test": 2000}

INSTRUCTIONS = {
    "extract": (
        "For the order on the Subject line, give its order number, units ordered, agreed unit price and"
        ' order total as JSON with exactly these keys, in this order: {"order": string, "units": integer,'
        ' "unit_price": integer, "total": integer}. Reply with the JSON only.'
    ),
    "arith": (
        "How many units of the Subject order's product are in stock now? Start from its opening stock,"
        " subtract every shipment out and add every delivery in, in the order the note gives them."
        ' Write the running total on one line, like "500 - 120 = 380 + 60 = 440", then "Answer: N" on the next'
        " line."
    ),
    "tool": (
        "The order on the Subject line needs one tool call. Tools: refund(order, units) if units arrived damaged;"
        " reorder(sku, units) if its product is under the reorder point (units: what purchasing asks for);"
        ' escalate(order, reason) with reason "late", "lost" or "billing"; ship(order, carrier) if it is packed'
        ' and awaiting pickup. Reply with JSON only, like {"tool": "ship", "args": {"order": "SO-123", "carrier":'
        ' "Acme"}}.'
    ),
    "remain": (
        "If the Subject order's units are taken from its product's stock now, how many units are left? Start"
        " from the opening stock, subtract every shipment out and add every delivery in, in the order the note"
        " gives them, then subtract the order's units; the result is negative if the stock falls short. Write"
        ' the running total on one line, like "500 - 120 = 380 + 60 = 440 - 300 = 140", then "Answer: N" on'
        " the next line."
    ),
}

# -- vocabulary ---------------------------------------------------------------------------------
_CUSTOMERS = ["Brightway Ltd", "Northgate Supplies", "Kellerman & Co", "Bluefin Retail", "Orchard Hill Farms",
              "Maple Street Hardware", "Vantage Clinics", "Redcliff Builders", "Summit Outdoor", "Lumen Labs",
              "Harbor View Hotel", "Pinecrest School", "Atlas Motors", "Greenleaf Cafe", "Silverline Dental",
              "Copperfield Bikes", "Westbrook Pharmacy", "Ironside Fitness", "Tidewater Marine", "Oakridge Library"]
_PRODUCTS = ["steel brackets", "LED panels", "packing tape", "safety gloves", "printer toner", "oak shelves",
             "copper fittings", "cable ties", "office chairs", "water filters", "ceramic mugs", "hand sanitizer",
             "extension cords", "paint rollers", "label rolls", "storage bins", "desk lamps", "hinge sets",
             "drill bits", "floor mats"]
_PEOPLE = ["Dana Ruiz", "Tomas Berg", "Priya Nair", "Lena Fischer", "Omar Haddad", "Grace Liu", "Marek Novak",
           "Sofia Costa", "Jonas Weber", "Aisha Bello", "Kenji Mori", "Ruth Adler", "Pablo Ortiz", "Nina Petrova"]
_SITES = ["Warehouse B", "the Leeds depot", "Site 3 (Rotterdam)", "the north warehouse", "DC Valencia",
          "the Reno fulfilment centre", "Hall 2", "the Gdansk hub"]
_CARRIERS = ["Nordline", "Bluewake Freight", "Kestrel Express", "Orca Logistics", "Swiftpost", "Harbor & Sons",
             "Polar Cargo", "Redline Couriers"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
_MONTHS = ["March", "April", "May", "June", "September", "October", "November"]
_ORDER_PREFIXES = ["ORD", "PO", "SO"]
_SKU_LETTERS = "ABCDEFGHJKLMNPRSTVWXZ"
_SITUATIONS = ("refund", "reorder", "late", "lost", "billing", "ship")


# -- the facts of one note ------------------------------------------------------------------------
@dataclass(frozen=True)
class Note:
    """The facts of one document and its rendered text; the answers of the three tasks derive from it."""

    order: str
    customer: str
    product: str
    sku: str
    units: int
    unit_price: int
    opening: int
    moves: tuple[tuple[str, int], ...]  # ("out" | "in", units), in the order the note gives them
    situation: str  # one of _SITUATIONS
    args: dict = field(hash=False, compare=False)  # the tool call's arguments, in schema order
    text: str = ""

    @property
    def total(self) -> int:
        return self.units * self.unit_price

    @property
    def stock(self) -> int:
        return self.opening + sum(n if kind == "in" else -n for kind, n in self.moves)

    @property
    def tool(self) -> str:
        return {"late": "escalate", "lost": "escalate", "billing": "escalate"}.get(self.situation, self.situation)

    def answer(self, task: str) -> object:
        if task == "extract":
            return {"order": self.order, "units": self.units, "unit_price": self.unit_price, "total": self.total}
        if task == "arith":
            return self.stock
        if task == "tool":
            return {"tool": self.tool, "args": dict(self.args)}
        if task == "remain":
            return self.stock - self.units
        raise ValueError(f"unknown task {task!r}; tasks are {ALL_TASKS}")

    def response(self, task: str) -> str:
        """The gold reply, in the exact format the fine-tuned decoders learn."""
        if task in ("arith", "remain"):
            moves = self.moves + ((("out", self.units),) if task == "remain" else ())
            steps, running = [str(self.opening)], self.opening  # a running total: "a - b = c + d = e"
            for kind, n in moves:
                running += n if kind == "in" else -n
                steps.append(f"{'+' if kind == 'in' else '-'} {n} = {running}")
            return " ".join(steps) + f"\nAnswer: {self.answer(task)}"
        return json.dumps(self.answer(task), separators=(", ", ": "))


def _order_id(rng: random.Random) -> str:
    return f"{rng.choice(_ORDER_PREFIXES)}-{rng.randint(1000, 99999)}"


def _sku(rng: random.Random) -> str:
    return f"{rng.choice(_SKU_LETTERS)}{rng.choice(_SKU_LETTERS)}-{rng.randint(100, 999)}"


def _money(rng: random.Random, amount: int) -> str:
    grouped = f"{amount:,}" if amount >= 1000 and rng.random() < 0.6 else str(amount)
    return rng.choice([f"${grouped}", f"${grouped}", f"{grouped} USD", f"USD {grouped}"])


def _count(rng: random.Random, n: int) -> str:
    return f"{n:,}" if n >= 1000 and rng.random() < 0.5 else str(n)


def _pick(rng: random.Random, options: list[str], **values: object) -> str:
    return rng.choice(options).format(**values)


class _Ids:
    """Distinct order numbers and SKUs within one note (the subject's never reappear as distractors)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def order(self) -> str:
        return self._new(_order_id)

    def sku(self) -> str:
        return self._new(_sku)

    def _new(self, make: Callable[[random.Random], str]) -> str:
        while True:
            value = make(self.rng)
            if value not in self.used:
                self.used.add(value)
                return value


def _order_sentences(rng: random.Random, n: dict, catalogue: int | None, first_units: int | None) -> list[str]:
    """The order line; with first_units, the line gives that first quantity (and its total) and an
    amendment follows with the final quantity and total."""
    units = n["units"] if first_units is None else first_units
    price = _money(rng, n["unit_price"])
    total = _money(rng, units * n["unit_price"])
    if catalogue is not None:
        price = _pick(rng, ["{p} (catalogue price {c})", "{p}, down from the catalogue price of {c},"],
                      p=price, c=_money(rng, catalogue))
    line = _pick(rng, [
        "{customer} placed order {order} for {units} units of {product} ({sku}) at an agreed {price} per unit,"
        " {total} in total.",
        "Order {order} from {customer}: {units} x {product}, SKU {sku}, agreed price {price} each, order total"
        " {total}.",
        "{customer} ordered {units} units of {sku} ({product}) under {order}; the agreed unit price is {price}"
        " and the total comes to {total}.",
        "The order {order} is {units} units of {product} (SKU {sku}) for {customer}, billed at {price} per unit"
        " for a total of {total}.",
    ], price=price, total=total, **{**n, "units": units})
    if first_units is None:
        return [line]
    change = "raised" if n["units"] > first_units else "cut"
    return [line, _pick(rng, [
        "On {day} {customer} changed the quantity to {units} units, which brings the order total to {total}.",
        "Update: the quantity on {order} was {change} to {units} units; new total {total}.",
        "{customer} later amended the order to {units} units (new total {total}).",
    ], day=rng.choice(_DAYS), change=change, total=_money(rng, n["units"] * n["unit_price"]), **n)]


def _stock_sentences(rng: random.Random, n: dict, moves: list[tuple[str, int, str]]) -> list[str]:
    lines = [_pick(rng, [
        "Opening stock of {sku} on {day} morning was {opening} units.",
        "{site} started the week with {opening} units of {sku} on the shelf.",
        "Stock check on {day}: {opening} units of {sku} ({product}) on hand.",
    ], day="Monday", **n)]
    for kind, units, day in moves:
        u = _count(rng, units)
        if kind == "out":
            lines.append(_pick(rng, [
                "On {day} a shipment of {u} units of {sku} went out.",
                "{day}: {u} units of {sku} shipped out.",
                "A further {u} units of {sku} left the dock on {day}.",
                "{u} units of {sku} were shipped on {day}.",
            ], day=day, u=u, **n))
        else:
            lines.append(_pick(rng, [
                "A delivery of {u} units of {sku} arrived from the supplier on {day}.",
                "{day}: the supplier delivered {u} units of {sku}.",
                "{u} units of {sku} were received into stock on {day}.",
            ], day=day, u=u, **n))
    return lines


def _situation_sentence(rng: random.Random, n: dict, situation: str, args: dict, extra: dict) -> str:
    if situation == "refund":
        return _pick(rng, [
            "{customer} reports that {d} of the units arrived damaged and asks for their money back.",
            "On delivery {d} units were found broken; the customer wants a refund for them.",
            "The customer sent photos of {d} damaged units from {order} and asked to be refunded.",
        ], d=args["units"], **n)
    if situation == "reorder":
        return _pick(rng, [
            "After these movements {sku} is under its reorder point of {rp} units; purchasing asks for {q} more.",
            "Stock of {sku} has fallen below the reorder point ({rp} units). Purchasing wants {q} units ordered.",
            "{sku} is now below its reorder point of {rp}, so purchasing requests a batch of {q} units.",
        ], rp=extra["reorder_point"], q=args["units"], **n)
    if situation == "late":
        return _pick(rng, [
            "The delivery of {order} is {k} days overdue and {customer} has chased it twice.",
            "{customer} says {order} still has not arrived, {k} days after the promised date.",
            "Order {order} missed its delivery date; it is now running {k} days late.",
        ], k=extra["days"], **n)
    if situation == "lost":
        return _pick(rng, [
            "The carrier cannot locate the parcel for {order}; tracking stopped {k} days ago.",
            "The shipment of {order} has gone missing in transit and the carrier has no scan for {k} days.",
            "Nobody can find the consignment for {order}: the carrier lost it after the hub scan {k} days ago.",
        ], k=extra["days"], **n)
    if situation == "billing":
        return _pick(rng, [
            "{customer} was charged twice for {order} (invoice {inv}) and wants it corrected.",
            "The invoice {inv} for {order} was billed two times to {customer}'s card.",
            "Accounts found a duplicate charge on invoice {inv} for {order}; the customer has complained.",
        ], inv=extra["invoice"], **n)
    if situation == "ship":
        return _pick(rng, [
            "{order} is packed on {pl} pallets at dock {dock}, waiting for {carrier} to collect it.",
            "The order is packed and labelled; pickup is booked with {carrier} from dock {dock}.",
            "Packing of {order} finished ({pl} pallets); it awaits collection by {carrier}.",
        ], carrier=args["carrier"], pl=extra["pallets"], dock=extra["dock"], **n)
    raise ValueError(situation)


def _distractors(rng: random.Random, n: dict, ids: _Ids, situation: str, reorder_point: int | None,
                 stock: int) -> list[str]:
    pool = [
        _pick(rng, ["Questions to {who} on extension {ext}.", "Contact: {who}, ext. {ext}."],
              who=rng.choice(_PEOPLE), ext=rng.randint(200, 899)),
        _pick(rng, ["This order replaces {old}, which was cancelled with {k} units outstanding.",
                    "It supersedes order {old} ({k} units), now closed."], old=ids.order(), k=rng.randint(5, 400)),
        _pick(rng, ["Helpdesk ticket {t} is linked to this note.", "Ref. ticket {t}."], t=rng.randint(10000, 99999)),
        _pick(rng, ["The gross weight on the packing list is {w} kg.", "Packed weight: {w} kg."],
              w=rng.randint(40, 9000)),
        _pick(rng, ["The customer account number is {a}.", "Account no. {a} ({customer})."],
              a=rng.randint(100000, 999999), **n),
    ]
    if situation != "reorder" and reorder_point is not None:
        pool.append(_pick(rng, ["The reorder point for {sku} is {rp} units.", "{sku} reorders below {rp} units."],
                          rp=reorder_point, **n))
    if situation != "ship":
        pool.append(_pick(rng, ["Loading bay {dock} is closed for repairs until {day}.",
                                "Dock {dock} handles returns this week."],
                          dock=rng.randint(1, 24), day=rng.choice(_DAYS)))
    rng.shuffle(pool)
    return pool[: rng.randint(1, 2)]


def _activity_line(rng: random.Random, ids: _Ids) -> str:
    """One line about another order or another product (never the subject's)."""
    other = {"order": ids.order(), "sku": ids.sku(), "customer": rng.choice(_CUSTOMERS),
             "product": rng.choice(_PRODUCTS), "day": rng.choice(_DAYS), "carrier": rng.choice(_CARRIERS)}
    return _pick(rng, [
        "{order} ({customer}): {u} units of {sku} at {price} each.",
        "{sku} ({product}): {u} units shipped on {day}.",
        "{sku}: opening stock {u} units, {v} received on {day}.",
        "{order} for {customer} reported {d} damaged units.",
        "{order} is packed and waiting for {carrier}.",
        "{order} is {d} days late; {customer} informed.",
        "Purchasing ordered {u} units of {sku} ({product}).",
        "{customer} paid invoice INV-{inv} for {order}.",
    ], u=rng.randint(10, 900), v=rng.randint(20, 600), d=rng.randint(2, 14), price=_money(rng, rng.randint(3, 240)),
        inv=rng.randint(10000, 99999), **other)


def _header(rng: random.Random, n: dict, kind: int) -> str:
    date = f"{rng.randint(1, 28)} {rng.choice(_MONTHS)}"
    who = rng.choice(_PEOPLE)
    return [
        f"Warehouse memo, {n['site']}\nDate: {date}\nSubject: order {n['order']}",
        f"From: {who}\nTo: fulfilment team\nSubject: {n['order']} ({n['customer']})",
        f"INCIDENT NOTE {rng.randint(100, 999)}\nSubject: order {n['order']}\nLogged by {who}, {date}",
        f"Shift log, {n['site']}, {date}\nSubject: {n['order']}",
    ][kind]


def make_note(rng: random.Random, *, n_activity: int | None = None, tokenize: Callable[[str], list[int]] | None = None,
              target_tokens: int | None = None) -> Note:
    """One document and its facts. Short by default (1-2 activity lines); with tokenize + target_tokens,
    activity lines are added until the text reaches target_tokens."""
    ids = _Ids(rng)
    n = {"order": ids.order(), "sku": ids.sku(), "customer": rng.choice(_CUSTOMERS), "product": rng.choice(_PRODUCTS),
         "site": rng.choice(_SITES), "units": rng.randint(8, 480), "unit_price": rng.randint(3, 240)}
    # stock movements: two shipments out, sometimes a delivery in, on increasing weekdays
    n_moves = rng.choice([2, 2, 3])
    kinds = ["out", "out"] + (["in"] if n_moves == 3 else [])
    rng.shuffle(kinds)
    days = sorted(rng.sample(range(1, 5), n_moves))
    # NOTE: multiples of 5 under 1000: the 0.5B model adds and subtracts those reliably (~90% a step
    # against ~60% for arbitrary 3-digit numbers), so the task tests reading, not the model's arithmetic
    moves = [(k, 5 * rng.randint(2, 50) if k == "out" else 5 * rng.randint(10, 60), _DAYS[d])
             for k, d in zip(kinds, days, strict=True)]
    out = sum(u for k, u, _ in moves if k == "out")
    delivered = sum(u for k, u, _ in moves if k == "in")
    n["opening"] = 5 * rng.randint(max(20, out // 5 + 2), (999 - delivered) // 5)  # every running total < 1000
    stock = n["opening"] + sum(u if k == "in" else -u for k, u, _ in moves)

    tool = rng.choice(["refund", "reorder", "escalate", "ship"])  # the four tools about equally often
    situation = rng.choice(["late", "lost", "billing"]) if tool == "escalate" else tool
    extra: dict = {"days": rng.randint(2, 21), "invoice": f"INV-{rng.randint(10000, 99999)}",
                   "pallets": rng.randint(1, 12), "dock": rng.randint(1, 24)}
    reorder_point = None
    if situation == "reorder":
        reorder_point = stock + rng.randint(5, 300)
        extra["reorder_point"] = reorder_point
        args = {"sku": n["sku"], "units": rng.choice(range(100, 2001, 50))}
    else:
        if stock > 20 and rng.random() < 0.5:
            reorder_point = rng.randint(5, stock - 5)
        if situation == "refund":
            args = {"order": n["order"], "units": rng.randint(1, max(1, min(n["units"], 40)))}
        elif situation == "ship":
            args = {"order": n["order"], "carrier": rng.choice(_CARRIERS)}
        else:
            args = {"order": n["order"], "reason": situation}

    catalogue = n["unit_price"] + rng.randint(1, 30) if rng.random() < 0.4 else None
    first_units = None
    if rng.random() < 0.4:
        first_units = n["units"] + rng.choice([-1, 1]) * rng.randint(5, 100)
        if first_units < 5:
            first_units = n["units"] + rng.randint(5, 100)
    blocks = [_order_sentences(rng, n, catalogue, first_units), _stock_sentences(rng, n, moves),
              [_situation_sentence(rng, n, situation, args, extra)],
              _distractors(rng, n, ids, situation, reorder_point, stock)]
    first = blocks.pop(0) if rng.random() < 0.6 else None  # the order line usually leads
    rng.shuffle(blocks)
    if first is not None:
        blocks.insert(0, first)
    kind = rng.randrange(4)
    bullets = kind == 3 or rng.random() < 0.2
    facts = [s for block in blocks for s in block]
    body = "\n".join(f"- {s}" for s in facts) if bullets else " ".join(facts)
    header = _header(rng, n, kind)
    heading = rng.choice(["Other activity:", "Also on the board:", "Other lines this week:"])
    signoff = rng.choice(["Thanks,\n", "Regards,\n", "-- "]) + rng.choice(_PEOPLE)

    def render(before: list[str], after: list[str]) -> str:
        parts = [header]
        if before:
            parts.append(heading + "\n" + "\n".join(f"- {a}" for a in before))
        parts.append(body)
        if after:
            parts.append(heading + "\n" + "\n".join(f"- {a}" for a in after))
        parts.append(signoff)
        return "\n\n".join(parts)

    if target_tokens is None:
        count = rng.randint(1, 2) if n_activity is None else n_activity
        lines = [_activity_line(rng, ids) for _ in range(count)]
    else:
        if tokenize is None:
            raise ValueError("target_tokens needs tokenize")
        lines = []
        while True:
            probe = render(lines, [])
            if len(tokenize(probe)) >= target_tokens:
                break
            lines.extend(_activity_line(rng, ids) for _ in range(8))
        # NOTE: trim back to the target: the per-line token cost is about constant
        while len(lines) > 1 and len(tokenize(render(lines[:-1], []))) >= target_tokens:
            lines.pop()
    cut = rng.randint(0, len(lines))
    text = render(lines[:cut], lines[cut:])
    return Note(order=n["order"], customer=n["customer"], product=n["product"], sku=n["sku"], units=n["units"],
                unit_price=n["unit_price"], opening=n["opening"], moves=tuple((k, u) for k, u, _ in moves),
                situation=situation, args=args, text=text)


# -- samples ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    task: str
    document: str
    instruction: str
    response: str  # the gold reply, in the exact format
    answer: object  # what check compares against


def _notes(seed: int) -> Iterable[Note]:
    rng = random.Random(seed)
    while True:
        yield make_note(rng)


def _sample(task: str, note: Note) -> Sample:
    return Sample(task, note.text, INSTRUCTIONS[task], note.response(task), note.answer(task))


def make_samples(task: str, n: int, seed: int) -> list[Sample]:
    """n samples of `task`; the same seed gives every task the same n documents."""
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {ALL_TASKS}")
    notes = _notes(seed)
    return [_sample(task, next(notes)) for _ in range(n)]


_HELD_OUT_GUARD = 5000  # test documents avoid the orders of the first this-many train documents


@lru_cache(maxsize=1)
def _train_orders() -> frozenset[str]:
    notes = _notes(SEEDS["train"])
    return frozenset(next(notes).order for _ in range(_HELD_OUT_GUARD))


def split(task: str, which: str, n: int) -> list[Sample]:
    """The train or test split (seeds 1000 / 2000). No test document is about an order that any of the
    first 5,000 train documents is about, so test documents never equal train documents."""
    if which == "train":
        return make_samples(task, n, SEEDS["train"])
    if which != "test":
        raise ValueError(f"split is 'train' or 'test', not {which!r}")
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {ALL_TASKS}")
    seen = _train_orders()
    out: list[Sample] = []
    for note in _notes(SEEDS["test"]):
        if len(out) == n:
            break
        if note.order not in seen:
            out.append(_sample(task, note))
    return out


def lengthen(samples: list[Sample], share: float, tokens: tuple[int, int], seed: int,
             tokenize: Callable[[str], list[int]]) -> list[Sample]:
    """The samples with a `share` of them (chosen by `seed`) replaced by samples of the same task on long
    notes, of a length drawn uniformly in `tokens` (activity lines around the subject order, as in the
    serving benchmark's documents): a mix of prompt lengths for training (issue 21's length-mix lever).
    The long notes are new notes (seeded by `seed` and the sample's index), not the short ones padded."""
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    lo, hi = tokens
    if not 0 < lo <= hi:
        raise ValueError(f"tokens must be 0 < lo <= hi, got {tokens}")
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(samples)), round(share * len(samples))))
    out = []
    for i, s in enumerate(samples):
        if i in chosen:
            note = make_note(random.Random(seed * 1_000_003 + i), tokenize=tokenize, target_tokens=rng.randint(lo, hi))
            s = _sample(s.task, note)
        out.append(s)
    return out


# -- checking --------------------------------------------------------------------------------
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)


def _json_reply(reply: str) -> object:
    text = reply.strip()
    m = _FENCE.match(text)
    if m:  # one markdown code fence around the JSON is tolerated, nothing else
        text = m.group(1).strip()
    try:
        return json.loads(text)
    except ValueError:
        return None


def _same(a: object, b: object) -> bool:
    """Equal with the same types (1680 is not 1680.0 nor "1680") and, for objects, the same key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)  # type: ignore[index]
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b


_ANSWER = re.compile(r"Answer:\s*(-?\d+)\s*$")


def check(task: str, reply: str, answer: object) -> bool:
    """Strict checks: extract and tool parse the whole reply as JSON (one code fence tolerated) and
    compare keys (in order), values and types; arith and remain want the reply to end with "Answer: N"."""
    if task in ("extract", "tool"):
        return _same(_json_reply(reply), answer)
    if task in ("arith", "remain"):
        m = _ANSWER.search(reply.strip())
        return m is not None and int(m.group(1)) == answer
    raise ValueError(f"unknown task {task!r}; tasks are {ALL_TASKS}")


# -- files and the serving benchmark's document -------------------------------------------------
def write_jsonl(samples: Iterable[Sample], path: str | Path) -> None:
    """Lines {"document", "instruction", "response"}: the training data of `kvfork train-decoder`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"document": s.document, "instruction": s.instruction, "response": s.response},
                               ensure_ascii=False) + "\n")


def long_document(seed: int, target_tokens: int, tokenize: Callable[[str], list[int]]) -> tuple[str, dict[str, object]]:
    """A note of about target_tokens tokens (the subject order among many lines of other activity) and
    the answer of each task for it."""
    note = make_note(random.Random(seed), tokenize=tokenize, target_tokens=target_tokens)
    return note.text, {task: note.answer(task) for task in TASKS}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", metavar="DIR", help="write DIR/{task}.train.jsonl and DIR/{task}.test.jsonl")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--preview", action="store_true", help="print one test sample per task")
    args = ap.parse_args(argv)
    if not args.write and not args.preview:
        ap.error("nothing to do: give --write DIR and/or --preview")
    if args.write:
        for task in ALL_TASKS:
            for which, n in (("train", args.n_train), ("test", args.n_test)):
                path = Path(args.write) / f"{task}.{which}.jsonl"
                write_jsonl(split(task, which, n), path)
                print(f"wrote {n} samples to {path}")
    if args.preview:
        samples = [split(task, "test", 1)[0] for task in ALL_TASKS]
        print("=== document (shared by the three tasks) ===")
        print(samples[0].document)
        for s in samples:
            print(f"\n=== {s.task}: instruction ===\n{s.instruction}\n--- gold response ---\n{s.response}")


if __name__ == "__main__":
    main()
