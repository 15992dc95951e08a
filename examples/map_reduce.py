"""Map-reduce over a document longer than one agent's budget: chunks, mappers per chunk, one reducer.

The report (~3,500 tokens) is split at paragraph boundaries into chunks of at most --budget tokens;
two mappers read each chunk (they share its snapshot), and a reducer combines all their notes.

    python examples/map_reduce.py [--budget 1200] [--compare]
"""

from __future__ import annotations

import sys

from _show import engine, options, report, run

from kvfork.pipeline import map_reduce, split_document

if __name__ == "__main__":
    budget = 1200
    if "--budget" in sys.argv:
        i = sys.argv.index("--budget")
        budget = int(sys.argv[i + 1])
        del sys.argv[i:i + 2]
    args = options(__doc__.splitlines()[0])
    e = engine(args)
    chunks = split_document(report(), budget, lambda text: len(e.tokenize(text)))
    print(f"{len(chunks)} chunks of at most {budget} tokens")
    pipeline = map_reduce(
        chunks,
        mapper={"summary": "Summarize this part of the report in 2 sentences.",
                "figures": "List the key numbers in this part of the report, one per line."},
        reducer="Combine the notes above into one summary of the whole report: 4 bullet points.",
        sampling={"max_tokens": args.max_tokens},
    )
    run(pipeline, args, e)
