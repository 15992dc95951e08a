"""A 2-agent debate of 3 rounds over the incident report, then a judge.

Each debater keeps its own branch (and KV) for all 3 rounds and reads the other's previous reply;
both debaters decode in one batch per round; the judge forks the report's snapshot and reads all 6 turns.

    python examples/debate.py [--compare]
"""

from __future__ import annotations

from _show import options, report, run

from kvfork.pipeline import debate

if __name__ == "__main__":
    args = options(__doc__.splitlines()[0])
    run(debate(report(), rounds=3, sampling={"max_tokens": args.max_tokens}), args)
