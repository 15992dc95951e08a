"""coalesce: prompts that arrived together, grouped by a common prefix worth prefilling once."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from kvfork.scheduler.prefix_cache import common_prefix

__all__ = ["coalesce"]


def coalesce(prompts: Seq[Seq[int]], live: Seq[int], min_shared: int) -> list[tuple[int, list[int]]]:
    """Group prompts that arrived together by a common token prefix worth prefilling once.

    `live[i]` is how many tokens of prompt i a live prefix already covers. Returns (prefix length,
    member indices) per group; a group of one (length 0) has nothing to share with the others.
    """
    remaining = list(range(len(prompts)))
    groups: list[tuple[int, list[int]]] = []
    while remaining:
        i = remaining.pop(0)
        partners = []
        for j in remaining:
            n = common_prefix(prompts[i], prompts[j])
            if n >= min_shared and n > max(live[i], live[j]):
                partners.append((j, n))
        if not partners:
            groups.append((0, [i]))
            continue
        length = min(n for _, n in partners)
        members = [i] + [j for j, _ in partners]
        remaining = [j for j in remaining if j not in members]
        groups.append((length, members))
    return groups
