"""A document review board: 4 reviewers read the incident report, a chair merges their reviews.

The report is prefilled once; the reviewers fork it and decode in one batch; the chair forks the
same snapshot and prefills only the four reviews and its instruction.

    python examples/review_board.py [--compare]
"""

from __future__ import annotations

from _show import options, report, run

from kvfork.pipeline import review_board

if __name__ == "__main__":
    args = options(__doc__.splitlines()[0])
    pipeline = review_board(report(), sampling={"max_tokens": args.max_tokens},
                            chair_sampling={"max_tokens": args.max_tokens + 32})
    run(pipeline, args)
