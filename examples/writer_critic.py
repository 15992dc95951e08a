"""A writer -> critic -> reviser chain over the incident report; each stage forks the report's snapshot.

    python examples/writer_critic.py [--compare]
"""

from __future__ import annotations

from _show import options, report, run

from kvfork.pipeline import chain

if __name__ == "__main__":
    args = options(__doc__.splitlines()[0])
    run(chain(report(), sampling={"max_tokens": args.max_tokens}), args)
