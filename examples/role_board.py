"""Reviewers with their own roles over one report: the document is computed once and placed under
every other role (reuse mode), and the chair gets the reviews placed from the reviewers' branches.

Prefix sharing reuses nothing here (each role is a different system prompt before the report); a
reuse mode does, approximately. The same board runs exactly too, for the time and the answers side by side.

    python examples/role_board.py [--reuse shift|kvcomm|blend]
"""

from __future__ import annotations

from _show import engine, options, report, show

from kvfork import Agent, Pipeline

ROLES = {
    "sre": ("You are a site reliability engineer.", "Which alert should have fired first? Two sentences."),
    "security": ("You are a security auditor; you answer tersely.", "Name the biggest remaining risk."),
    "manager": ("You are a project manager writing for executives.", "State the customer impact in one line."),
}

if __name__ == "__main__":
    args = options(__doc__.splitlines()[0], reuse=True)
    agents = [Agent(name, task, role=role) for name, (role, task) in ROLES.items()]
    agents.append(Agent("chair", "Merge the three notes into one verdict.", role="You chair the incident review.",
                        inputs=("document", *ROLES)))
    board = Pipeline.of(report(), agents, sampling={"max_tokens": args.max_tokens})
    e = engine(args)
    approx = board.run(e, reuse=args.reuse)
    show(approx)
    exact = board.run(e)
    same = sum(exact[a.name].tokens == a.tokens for a in approx if a.ok)
    print(f"\nexact run: {exact.wall_s:.1f} s vs {approx.wall_s:.1f} s with reuse={args.reuse}"
          f" ({exact.wall_s / approx.wall_s:.2f}x); replies identical to exact: {same}/{len(agents)}")
    e.close()
