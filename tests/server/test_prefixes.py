"""Which live prefix a prompt forks, and where: no model needed."""

from __future__ import annotations

import pytest

from kvfork.scheduler.sequence import Sequence
from kvfork.server.prefixes import MIN_SUFFIX, LivePrefixes


@pytest.mark.parametrize("exact", [True, False])
def test_the_short_suffix_rule_holds_in_exact_mode_only(exact):
    """A prompt 3 tokens longer than a live prefix: exact mode forks earlier so that MIN_SUFFIX tokens are
    prefilled together (a 3-row ubatch rounds unlike the same rows in a long prompt); fast mode forks it all."""
    node = Sequence(tokens=list(range(100)), n_in_kv=100)
    prefixes = LivePrefixes(4, 0, 16, exact=exact)
    prefixes.add(node)
    hit = prefixes.best(list(range(103)))
    assert hit is not None and hit.node is node
    assert hit.n == (103 - MIN_SUFFIX if exact else 100)
