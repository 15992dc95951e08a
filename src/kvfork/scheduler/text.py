"""TurnText: one turn's generated text, decoded from token bytes and cut at the first stop string."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TurnText"]


@dataclass
class TurnText:
    """The text of the tokens generated so far in a turn.

    NOTE: decoded from the turn's bytes as a whole, not piece by piece: a token's piece may be half of
    a UTF-8 character. A stop string may span several pieces; the text ends right before it.
    """

    stop: tuple[str, ...] = ()
    text: str = ""
    stopped: bool = False
    _bytes: bytearray = field(default_factory=bytearray, repr=False)

    def add(self, piece: bytes) -> bool:
        """Append one token's bytes; True when a stop string has appeared (the text is cut before it)."""
        if self.stopped:
            raise ValueError("this turn's text already ended at a stop string")
        self._bytes += piece
        self.text = self._bytes.decode("utf-8", errors="replace")
        cuts = [cut for cut in (self.text.find(s) for s in self.stop) if cut >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.stopped = True
        return self.stopped
